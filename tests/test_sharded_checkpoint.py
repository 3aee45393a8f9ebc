"""Exact resume, resume at another world size and export for the sharded strategies.

The tiny GPT on 2 CPU processes: a run stopped mid-epoch (its checkpoint copied into
a fresh run dir, as a crash right after the save leaves it) and resumed reaches the
same loss at every later step and the same final weights as the uninterrupted run.
"""
import pytest
import torch

from helpers import check, run, write_config
from test_checkpoint import assert_same_weights, by_step, start_from_checkpoint, weights

pytestmark = pytest.mark.slow  # multi-process: the full suite, not the fast tier

GPT = {"name": "recipes.gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "max_chars": 40000}
STEPS = 16  # about 1200 windows / 16 a step = 70 steps an epoch: step 7 is mid-epoch


def gpt_config(tmp_path, name, **sections):
    config = {"recipe": GPT, "run_dir": str(tmp_path / name),
              "train": {"global_batch_size": 16, "micro_batch_size": 4, "max_steps": STEPS, "log_every_steps": 1},
              "optim": {"name": "adamw", "lr": 3e-3}, "schedule": {"warmup_steps": 3, "decay": "cosine"},
              "checkpoint": {"every_steps": 7, "keep_last": 5}}
    config.update(sections)
    return write_config(tmp_path / f"{name}.yaml", config)


STRATEGIES = {
    "fsdp": {"strategy": "fsdp"},
    "zero1": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_is_exact_and_exports(tmp_path, name):
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")
    sections = STRATEGIES[name]
    check(run(["run", gpt_config(tmp_path, "full", **sections), "--nproc", 2]))
    start_from_checkpoint(tmp_path / "full", 7, tmp_path / "resumed")
    check(run(["run", gpt_config(tmp_path, "resumed", **sections), "--nproc", 2]))
    assert by_step(tmp_path / "resumed") == by_step(tmp_path / "full")
    exported = weights(tmp_path / "resumed", tmp_path)
    assert_same_weights(exported, weights(tmp_path / "full", tmp_path))
    # The export is the full model: it loads strictly into the recipe's model().
    from recipes import gpt

    model = gpt.model(gpt.Config(**{k: v for k, v in GPT.items() if k != "name"}))
    model.load_state_dict(exported, strict=True)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_fsdp_resumes_at_another_world_size(tmp_path, saved_on, resumed_on):
    """DCP reshards the model and optimizer state; step k is the same samples at any world size."""
    nproc = lambda n: ["--nproc", 2] if n == 2 else []  # noqa: E731
    check(run(["run", gpt_config(tmp_path, "full", strategy="fsdp")] + nproc(saved_on)))
    start_from_checkpoint(tmp_path / "full", 7, tmp_path / "resumed")
    check(run(["run", gpt_config(tmp_path, "resumed", strategy="fsdp")] + nproc(resumed_on)))
    full, resumed = by_step(tmp_path / "full"), by_step(tmp_path / "resumed")
    assert resumed.keys() == full.keys()
    assert [resumed[s] for s in full] == pytest.approx([full[s] for s in full], rel=1e-5)
    a, b = weights(tmp_path / "resumed", tmp_path), weights(tmp_path / "full", tmp_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
