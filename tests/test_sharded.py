"""The sharded strategies, FSDP2 and DeepSpeed ZeRO 1/2/3, against one process.

Two worker processes on the CPU (gloo), tiny models:

- equivalence: the same config (global batch 16, 20 steps, fp32, clipping, warmup
  and cosine schedule, the GPT's (total, count) loss) gives the same loss, grad
  norm and validation loss at every step on 1 process with accumulation 2 and on
  2 processes with accumulation 2 under DDP, FSDP (both reduce modes, CPU
  offload) and ZeRO 1/2/3 (and ZeRO-2/3 with offload);
- bf16 trains under every strategy, fp16 under FSDP with the grad scaler;
- memory: FSDP and ZeRO-3 hold half the parameters per rank, and FSDP and
  ZeRO 1/2/3 half the optimizer state;
- any nn.Module: tied weights and frozen parameters train under every strategy,
  `full_state_dict()` loads into the recipe's model with strict=True and equals
  the one-process weights, tied weights stay one tensor, frozen ones stay
  bit-for-bit unchanged, and `launcher export` reads DeepSpeed's checkpoints.

The DeepSpeed cases skip when deepspeed is not installed; the FSDP ones always run.
Each configuration runs once per module (cached fixtures); the bf16, memory and
any-module tests share one worker launch per strategy, which trains its recipes
one after the other with the real Trainer.

Run as a script (`python -m torch.distributed.run ... tests/test_sharded.py SPEC.json`)
this file is that worker.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import check, losses, max_rel, metrics, outcome, reraise, run, with_sections, write_config

pytestmark = pytest.mark.slow  # multi-process: the full suite, not the fast tier

THIS = Path(__file__).resolve()

# A tiny GPT: 2 layers, width 32, 32-byte windows of the standard library's sources.
GPT = {"name": "recipes.gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "max_chars": 60000}

# name -> (processes, config sections)
STRATEGIES = {
    "single": (1, {"strategy": "single"}),
    "ddp": (2, {"strategy": "ddp"}),
    "fsdp": (2, {"strategy": "fsdp"}),
    "fsdp_reduce_every_microstep": (2, {"strategy": "fsdp", "fsdp": {"reduce_every_microstep": True}}),
    "zero1": (2, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}}),
    "zero2": (2, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}),
    "zero3": (2, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}),
    "fsdp_cpu_offload": (2, {"strategy": "fsdp", "fsdp": {"cpu_offload": True}}),
    "zero2_offload": (2, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_optimizer": True}}),
    "zero3_offload": (2, {"strategy": "deepspeed",
                          "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}}),
}
SHARDED = ["ddp", "fsdp", "zero1", "zero2", "zero3"]  # ddp: the unsharded reference for the memory test

# Float32 with a different reduction order (two ranks' partial sums, reduce-scatter
# buckets, accumulation inside or outside the all-reduce) changes the last bit or two
# of a gradient: ~1e-7 relative. AdamW carries such differences into the weights at
# about the same relative size. Measured over the 20 steps (torch 2.13 CPU, DeepSpeed
# 0.19.8): loss at most 2.3e-7 (FSDP) and 1.2e-7 (DDP, ZeRO 1/2/3, offload), grad norm
# at most 4.1e-7. 1e-5 leaves a margin of 40x for other CPUs and library versions,
# while a real mistake shows at 1e-3 or more (measured: the loss divided by the
# accumulation twice under ZeRO-3: 1.1e-3 on the loss, 0.5 on the grad norm; the
# (total, count) factor left out under ZeRO-2: 255x on the grad norm, which AdamW's
# scale invariance and the clipping hide from the loss, hence the grad norm check).
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4  # the norm of a whole gradient is a sum of squares: more reduction order


def requires(name: str) -> None:
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")


def config_for(name: str, run_dir: Path, recipe: dict | None = None, **sections) -> dict:
    """The config of the equivalence runs for strategy NAME; a section given is merged over its default."""
    nproc, extra = STRATEGIES[name]
    cfg = {
        "recipe": dict(recipe or GPT),
        "run_dir": str(run_dir),
        "precision": "fp32",
        # accumulation 2 on 1 process (micro 8) and on 2 (micro 4): no_sync and its kin in every run
        "train": {"global_batch_size": 16, "micro_batch_size": 8 // nproc, "max_steps": 20, "log_every_steps": 1,
                  "grad_clip": 1.0, "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 5, "decay": "cosine", "min_lr_ratio": 0.1},
        "checkpoint": {"every_steps": 10, "resume": "never"},
        **extra,
    }
    return with_sections(cfg, sections)


def launch(args: list, nproc: int, timeout: float = 600):
    return run(args + (["--nproc", 2] if nproc == 2 else []), timeout=timeout)


# ---------------------------------------------------------------- equivalence


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            run_dir = root / name
            path = write_config(root / f"{name}.yaml", config_for(name, run_dir))
            cache[name] = outcome(lambda: check(launch(["run", path], STRATEGIES[name][0])) and run_dir)
        return reraise(cache[name])

    return get


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "single"])
def test_same_loss_as_one_process(equivalence, name):
    requires(name)
    ref_rows, ref_val = metrics(equivalence("single"))
    rows, val = metrics(equivalence(name))
    assert [r["step"] for r in rows] == list(range(1, 21)) == [r["step"] for r in ref_rows]
    loss_rel = max_rel([r["loss"] for r in ref_rows], [r["loss"] for r in rows])
    norm_rel = max_rel([r["grad_norm"] for r in ref_rows], [r["grad_norm"] for r in rows])
    val_rel = max_rel([r["val_loss"] for r in ref_val], [r["val_loss"] for r in val])
    print(f"{name}: max relative difference to one process: loss {loss_rel:.2e}, grad_norm {norm_rel:.2e}, "
          f"val_loss {val_rel:.2e}")
    assert loss_rel < LOSS_RTOL, (name, [r["loss"] for r in ref_rows], [r["loss"] for r in rows])
    assert norm_rel < GRAD_NORM_RTOL
    assert val_rel < LOSS_RTOL
    assert ref_rows[-1]["loss"] < ref_rows[0]["loss"] - 1.0  # and it did learn something
    assert any(r["grad_norm"] > 1.0 for r in ref_rows)  # so clipping was exercised


# ---------------------------------------------------------------- worker jobs: bf16, memory, any module


def worker_jobs(name: str, root: Path) -> list[dict]:
    """What one worker launch trains for strategy NAME, one job after the other."""
    toy = {"train": {"global_batch_size": 16, "micro_batch_size": 8 // STRATEGIES[name][0], "max_steps": 30,
                     "log_every_steps": 1, "grad_clip": 1.0, "seed": 0},
           "optim": {"name": "adamw", "lr": 1e-2}, "schedule": {"warmup_steps": 0, "decay": "constant"},
           "checkpoint": {"resume": "never"}}
    return [
        {"job": "gpt_bf16", "config": config_for(name, root / "gpt_bf16", precision="bf16", train={"max_steps": 30},
                                                 optim={"lr": 1e-2}, schedule={"warmup_steps": 0})},
        {"job": "tied", "config": config_for(name, root / "tied", recipe={"name": "toy_recipes.tied"}, **toy)},
        {"job": "frozen", "config": config_for(name, root / "frozen", recipe={"name": "toy_recipes.frozen"}, **toy)},
    ] + ([{"job": "gpt_fp16", "config": config_for(name, root / "gpt_fp16", precision="fp16", train={"max_steps": 30},
                                                   optim={"lr": 1e-2}, schedule={"warmup_steps": 0})}]
         if name == "fsdp" else [])


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """name -> (results JSON of the worker, its run root); one launch per strategy, cached."""
    base = tmp_path_factory.mktemp("workers")
    cache: dict[str, tuple[dict, Path]] = {}

    def launch_worker(name: str):
        root = base / name
        root.mkdir()
        spec = root / "spec.json"
        spec.write_text(json.dumps({"out": str(root), "jobs": worker_jobs(name, root)}))
        prefix = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                                     if STRATEGIES[name][0] == 2 else [])
        check(run([THIS, spec], prefix=prefix, timeout=600))
        return json.loads((root / "results.json").read_text()), root

    def get(name: str):
        if name not in cache:
            cache[name] = outcome(lambda: launch_worker(name))
        return reraise(cache[name])

    return get


@pytest.mark.parametrize("name", ["single"] + SHARDED)
def test_bf16_trains(worker, name):
    requires(name)
    _, root = worker(name)
    values = losses(root / "gpt_bf16")
    assert len(values) == 30 and all(math.isfinite(v) for v in values)
    start, end = values[0], min(values[-5:])
    print(f"{name} bf16: loss {start:.3f} -> {end:.3f}")
    assert end < start - 1.5, values  # a byte-level GPT starts near ln(256) = 5.5


def test_fsdp_fp16_trains_with_the_grad_scaler(worker):
    """torch.amp.GradScaler on FSDP's DTensor gradients: its inf check is reduced over the ranks."""
    _, root = worker("fsdp")
    rows = metrics(root / "gpt_fp16")[0]
    values = [r["loss"] for r in rows]
    print(f"fsdp fp16: loss {values[0]:.3f} -> {min(values[-5:]):.3f}, skipped {rows[-1].get('skipped_steps', 0)}")
    assert len(values) == 30 and all(math.isfinite(v) for v in values)
    assert min(values[-5:]) < values[0] - 1.5
    assert rows[-1].get("skipped_steps", 0) < 10  # the scale settles after its first overflows


@pytest.mark.parametrize("name", SHARDED)
def test_memory_is_sharded(worker, name):
    requires(name)
    results, _ = worker(name)
    job = results["gpt_bf16"]
    params, trainable = job["params_total"], job["params_trainable"]
    state = 2 * trainable  # AdamW: exp_avg and exp_avg_sq per trainable element
    per_rank = job["local_numel"]
    assert len(per_rank) == 2
    print(f"{name}: {params} parameters, {state} optimizer state elements in all; per rank: {per_rank}")

    def about_half(local: int, full: int) -> bool:
        # An even split up to padding (FSDP pads dim 0 per parameter, ZeRO pads its flat partitions).
        return full / 2 <= local <= full / 2 * 1.02 + 64

    sharded_params = name in ("fsdp", "zero3")
    sharded_optim = name != "ddp"
    for rank in per_rank:
        assert about_half(rank["params"], params) if sharded_params else rank["params"] == params, (name, rank)
        assert about_half(rank["optim"], state) if sharded_optim else rank["optim"] == state, (name, rank)


@pytest.mark.parametrize("recipe", ["tied", "frozen"])
@pytest.mark.parametrize("name", ["single"] + SHARDED)
def test_any_module(worker, name, recipe):
    requires(name)
    results, root = worker(name)
    values = losses(root / recipe)
    assert values[-1] < values[0] * 0.8, values
    saved = torch.load(root / f"{recipe}.pt")
    initial, final = saved["initial"], saved["final"]
    from launcher.recipe import Recipe

    model = Recipe.load({"name": f"toy_recipes.{recipe}"}).build_model()
    model.load_state_dict(final, strict=True)  # the module's own names, every key, right shapes
    assert set(final) == set(initial)
    if recipe == "tied":
        assert model.head.weight is model.embed.weight
        assert torch.equal(final["head.weight"], final["embed.weight"])
        assert not torch.equal(final["embed.weight"], initial["embed.weight"])
    else:
        for key in ("features.weight", "features.bias"):
            assert torch.equal(final[key], initial[key]), f"{name}: frozen {key} changed"
        assert not torch.equal(final["layers.0.weight"], initial["layers.0.weight"])
    if name != "single":  # the same weights as one process: full_state_dict is the real, current state
        reference = torch.load(worker("single")[1] / f"{recipe}.pt")["final"]
        for key, value in final.items():
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize("name,recipe", [("zero3", "tied"), ("zero2", "frozen")])
def test_export_deepspeed_checkpoint(worker, tmp_path, name, recipe):
    """`launcher export` reads the layout save_checkpoint wrote (renamed from .tmp) into the same weights."""
    requires(name)
    from safetensors.torch import load_file

    _, root = worker(name)
    out = tmp_path / "model.safetensors"
    check(run(["export", root / recipe, out]))
    exported = load_file(str(out))
    final = torch.load(root / f"{recipe}.pt")["final"]
    assert set(exported) == set(final)
    for key, value in final.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)


def test_deepspeed_config_is_ours_with_the_users_json_merged_last(tmp_path):
    """No DeepSpeed needed: the config DeepSpeedStrategy hands to deepspeed.initialize."""
    from launcher.config import ConfigError, validate
    from launcher.batch import BatchSizes
    from launcher.strategies.deepspeed import ds_config as generated

    def ds_config(user: dict | None, **deepspeed):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user or {}))
        cfg = validate({"recipe": {"name": "recipes.digits"}, "strategy": "deepspeed", "precision": "bf16",
                        "train": {"global_batch_size": 32, "micro_batch_size": 4, "grad_clip": 1.0},
                        "deepspeed": {**deepspeed, "config": str(path) if user else None}}, "test")
        return generated(cfg, BatchSizes(32, 4, 2, 1000), cuda=False)

    ds = ds_config(None, zero_stage=1)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (32, 4, 4)
    assert ds["zero_optimization"] == {"stage": 1} and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}

    ds = ds_config({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5, "bf16": {}},
                   zero_stage=3, offload_optimizer=True, offload_params=True)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": False},
                                       "reduce_bucket_size": 1000}  # nested keys merge
    assert ds["gradient_clipping"] == 0.5  # the user's JSON has the last word
    assert ds["bf16"] == {"enabled": True}

    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8.*needs train_micro_batch_size_per_gpu=4"):
        ds_config({"train_micro_batch_size_per_gpu": 8}, zero_stage=2)
    with pytest.raises(ConfigError, match="zero_stage=0 with precision=bf16"):
        ds_config(None, zero_stage=0)
    with pytest.raises(ConfigError, match="offload_params needs deepspeed.zero_stage=3"):
        ds_config(None, zero_stage=2, offload_params=True)


# ---------------------------------------------------------------- the worker


def worker_main(spec_path: str) -> None:
    """Train each job with the real Trainer, then record what the strategy reports."""
    import torch.distributed as dist

    from helpers import full_state_dict, local_numel
    from launcher import env as env_mod
    from launcher.config import validate
    from launcher.recipe import Recipe
    from launcher.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    env = env_mod.detect()
    device = env_mod.device_for(env)
    env_mod.init_process_group(env, device, timeout_s=300)
    results = {}
    for job in spec["jobs"]:
        cfg = validate(job["config"], job["job"])
        torch.manual_seed(cfg.train.seed)  # the trainer builds its model from the same seed
        reference = Recipe.load(cfg.recipe).build_model()
        initial = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        trainer = Trainer(cfg, env, device)
        trainer.fit()
        numel = local_numel(trainer.strategy)
        final = full_state_dict(trainer.strategy)  # a collective
        per_rank = [numel]
        if dist.is_initialized() and dist.get_world_size() > 1:
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, numel)
        if env.is_main:
            results[job["job"]] = {
                "local_numel": per_rank,
                "params_total": sum(p.numel() for p in reference.parameters()),
                "params_trainable": sum(p.numel() for p in reference.parameters() if p.requires_grad),
            }
            torch.save({"initial": initial, "final": {k: v.detach().cpu() for k, v in final.items()}},
                       out / f"{job['job']}.pt")
        del trainer, final
        gc.collect()
    if env.is_main:
        (out / "results.json").write_text(json.dumps(results))
    env_mod.destroy_process_group()


if __name__ == "__main__":
    # Leave as the CLI does (docs/design.md, Process exit): gloo's threads can abort a finished process in
    # interpreter finalization.
    code = 1
    try:
        worker_main(sys.argv[1])
        code = 0
    except BaseException:  # noqa: BLE001 - shown by the test that started it
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
