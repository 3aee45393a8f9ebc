"""Tensor parallelism (tp.size): the layers of the model's TP plan split over the ranks of a TP group.

- slow: per-step losses and validation of `--nproc 2 tp.size=2` (pure TP: FSDP over a
  data-parallel mesh of one) and of `--nproc 4 strategy=fsdp tp.size=2` (FSDP2 x TP, accumulation
  2, clipping; with tp.sequence_parallel too; and HSDP x TP, the 3-D mesh) equal one process's, for recipes.gpt (its tp_plan; init_weights on each rank's
  shards) and for a transformers Llama built from a config (the plan it ships; rank 0's copy);
  a checkpoint resumes at another layout (tp 2 -> fsdp 2, tp 2 -> fsdp 2 x tp 2) with the
  uninterrupted run's losses; `launcher export` of a TP run loads strictly into the plain model
  and holds one process's weights; bf16 (with activation checkpointing) and fp16 (with cpu_offload
  and fused Adam) train; `launcher plan`'s fsdp row is what each of 4 ranks holds under FSDP x TP.
- fast: plans resolve (the recipe's, a transformers model's own) and bad plans are refused with
  what to fix; `launcher plan` shows the mesh and every tp size; test_bad_inputs.py has the CLI's
  refusals (exit 2, no worker).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import check, max_rel, metrics, outcome, reraise, run, with_sections, write_config

# Another reduction order (the all-reduce of a row-split layer, the gathered head) moves the last
# bit or two: measured at most 3e-7 (torch 2.13 CPU); a wrong split or average shows at 1e-2.
RTOL = 1e-5
GPT = {"name": "recipes.gpt", "n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 32, "max_chars": 40000}
LLAMA = {"name": "toy_recipes.wild_hf", "arch": "llama", "n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 32}
STEPS, SAVED_AT = 6, 3


def config(run_dir: Path, recipe: dict, **sections) -> dict:
    cfg = {
        "recipe": dict(recipe),
        "run_dir": str(run_dir),
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": STEPS, "log_every_steps": 1,
                  "eval_every_steps": SAVED_AT, "grad_clip": 1.0, "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1},
        "checkpoint": {"every_steps": SAVED_AT, "keep_last": 5},
    }
    return with_sections(cfg, sections)


FP16 = ["precision=fp16", "fsdp.cpu_offload=true", "optim.name=adam", "optim.impl=fused"]

# name: (recipe, processes, overrides, resumed from (run, step) or None)
RUNS = {
    "gpt_1": (GPT, 1, [], None),
    "gpt_tp2": (GPT, 2, ["tp.size=2"], None),
    "gpt_fsdp2_tp2": (GPT, 4, ["strategy=fsdp", "tp.size=2"], None),
    "gpt_fsdp2_tp2_sp": (GPT, 4, ["strategy=fsdp", "tp.size=2", "tp.sequence_parallel=true"], None),
    "gpt_hsdp2_tp2": (GPT, 4, ["strategy=fsdp", "fsdp.replicate=2", "tp.size=2"], None),  # the 3-D mesh
    "gpt_tp2_then_fsdp2": (GPT, 2, ["strategy=fsdp"], ("gpt_tp2", SAVED_AT)),
    "gpt_tp2_then_fsdp2_tp2": (GPT, 4, ["strategy=fsdp", "tp.size=2"], ("gpt_tp2", SAVED_AT)),
    # The other precisions, and cpu_offload, activation checkpointing and fused Adam beside them (one run each)
    "gpt_tp2_bf16": (GPT, 2, ["tp.size=2", "precision=bf16", "train.activation_checkpointing=true"], None),
    "gpt_tp2_fp16": (GPT, 2, ["tp.size=2", *FP16], None),
    "gpt_fsdp2_fp16": (GPT, 2, ["strategy=fsdp", *FP16], None),
    "llama_1": (LLAMA, 1, [], None),
    "llama_tp2": (LLAMA, 2, ["tp.size=2"], None),
    "llama_fsdp2_tp2": (LLAMA, 4, ["strategy=fsdp", "tp.size=2"], None),
}


class Runs:
    """Each run trained once, on first use, for the module; a failed launch is reported by every test.
    The 4-process runs train one after another in one launch of test_sharded.py's worker (the real
    Trainer; 4 processes start once, not once a run)."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            if RUNS[name][1] == 4:
                result = outcome(self.train_four)
                self.done.update({n: result for n, spec in RUNS.items() if spec[1] == 4})
            else:
                self.done[name] = outcome(lambda: self.train(name))
        done = reraise(self.done[name])
        return done[0] / name if isinstance(done, tuple) else done

    def config(self, name: str) -> dict:
        from launcher.config import parse_override, set_dotted

        recipe, _, overrides, resumed_from = RUNS[name]
        sections = {}
        if resumed_from is not None:
            source, step = resumed_from
            sections["checkpoint"] = {"resume": str(self.get(source) / "checkpoints" / f"step_{step:06d}")}
        cfg = config(self.root / name, recipe, **sections)
        for item in overrides:
            set_dotted(cfg, *parse_override(item))
        return cfg

    def train(self, name: str) -> Path:
        nproc = RUNS[name][1]
        check(run(["run", write_config(self.root / f"{name}.yaml", self.config(name)),
                   *(["--nproc", nproc] if nproc > 1 else [])], timeout=600))
        return self.root / name

    def train_four(self) -> tuple[Path, dict]:
        jobs = [{"job": name, "config": self.config(name)} for name, spec in RUNS.items() if spec[1] == 4]
        spec = self.root / "four.json"
        spec.write_text(json.dumps({"out": str(self.root), "jobs": jobs}))
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
        check(run([Path(__file__).with_name("test_sharded.py"), spec], prefix=prefix, timeout=600))
        return self.root, json.loads((self.root / "results.json").read_text())

    def results(self, name: str) -> dict:
        self.get(name)
        return reraise(self.done[name])[1][name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("tp"))


def compare(reference: Path, run_dir: Path, first_step: int = 1) -> tuple[float, float]:
    ref_rows, ref_val = metrics(reference)
    rows, val = metrics(run_dir)
    ref_rows, ref_val = ([r for r in rs if r["step"] >= first_step] for rs in (ref_rows, ref_val))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(first_step, STEPS + 1))
    assert [r["step"] for r in val] == [r["step"] for r in ref_val] and val
    return (max_rel([r["loss"] for r in ref_rows], [r["loss"] for r in rows]),
            max_rel([r["val_loss"] for r in ref_val], [r["val_loss"] for r in val]))


@pytest.mark.slow
@pytest.mark.parametrize("name,reference", [("gpt_tp2", "gpt_1"), ("gpt_fsdp2_tp2", "gpt_1"),
                                            ("gpt_fsdp2_tp2_sp", "gpt_1"), ("gpt_hsdp2_tp2", "gpt_1"),
                                            ("llama_tp2", "llama_1"),
                                            ("llama_fsdp2_tp2", "llama_1")])
def test_tensor_parallel_trains_as_one_process(runs, name, reference):
    loss_rel, val_rel = compare(runs.get(reference), runs.get(name))
    print(f"{name} vs one process: max relative difference loss {loss_rel:.2e}, val_loss {val_rel:.2e}")
    assert loss_rel < RTOL and val_rel < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("name,reference,rtol", [("gpt_tp2_bf16", "gpt_1", 2e-3), ("gpt_tp2_fp16", "gpt_fsdp2_fp16", 1e-4)])
def test_tensor_parallel_trains_in_every_precision(runs, name, reference, rtol):
    """bf16 (with activation checkpointing) trains as fp32 within bf16's rounding; fp16 (the gradient scaler
    over DTensors, cpu_offload, fused Adam) as FSDP alone does: in 6 steps the scaler is still finding its
    scale and skips most of them, alike in both."""
    rows, _ = metrics(runs.get(name))
    ref_rows, _ = metrics(runs.get(reference))
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses), losses
    assert [r.get("skipped_steps") for r in rows] == [r.get("skipped_steps") for r in ref_rows]
    rel = max_rel([r["loss"] for r in ref_rows], losses)
    print(f"{name} vs {reference}: max relative loss difference {rel:.2e}")
    assert rel < rtol


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_tp2_then_fsdp2", "gpt_tp2_then_fsdp2_tp2"])
def test_a_checkpoint_resumes_at_another_layout(runs, name):
    """DCP reshards the saved DTensors into the new layout; the run goes on as the uninterrupted one."""
    run_dir = runs.get(name)
    loss_rel, val_rel = compare(runs.get("gpt_1"), run_dir, first_step=SAVED_AT + 1)
    print(f"{name} vs one process from step {SAVED_AT + 1}: loss {loss_rel:.2e}, val_loss {val_rel:.2e}")
    assert loss_rel < RTOL and val_rel < RTOL


@pytest.mark.slow
def test_export_of_a_tensor_parallel_run_is_the_plain_model(runs, tmp_path):
    from safetensors.torch import load_file

    from launcher.config import validate
    from launcher.recipe import Recipe

    exported = {}
    for name in ("gpt_1", "gpt_fsdp2_tp2"):
        out = tmp_path / f"{name}.safetensors"
        check(run(["export", runs.get(name), out]))
        exported[name] = load_file(out)
    cfg = validate(config(tmp_path / "plain", GPT), "test")
    plain = Recipe.load(cfg.recipe).build_model()
    plain.load_state_dict(exported["gpt_fsdp2_tp2"], strict=True)
    assert exported["gpt_1"].keys() == exported["gpt_fsdp2_tp2"].keys()
    for key, value in exported["gpt_fsdp2_tp2"].items():
        if key.endswith("attn.k.bias"):
            # Softmax does not see a bias added to every key: its gradient is zero but for rounding, which
            # AdamW's m / sqrt(v) turns into full-size steps in either run. Only its shape can be compared.
            assert value.shape == exported["gpt_1"][key].shape
            continue
        torch.testing.assert_close(value, exported["gpt_1"][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_the_plan_states_what_each_rank_holds(runs):
    """`launcher plan`'s fsdp row for FSDP 2 x TP 2 is what each of the 4 ranks holds (test_sharded.py's
    worker counts each rank's local elements of the parameters and the optimizer state)."""
    from launcher.config import validate
    from launcher.plan import ROWS, setup
    from launcher.recipe import Recipe

    measured = runs.results("gpt_fsdp2_tp2")["local_numel"]
    checked = validate(runs.config("gpt_fsdp2_tp2"), "test")
    planned = ROWS["fsdp"][1](setup(checked, Recipe.load(checked.recipe), 4)).ranks
    print(f"fsdp 2 x tp 2, elements per rank: measured {measured}, planned "
          f"{[(r.params.elements, r.optim.elements) for r in planned]}")
    assert len(measured) == 4 and len(planned) == 2
    for rank, held in enumerate(measured):  # data-parallel rank = rank // tp
        plan = planned[rank // 2]
        assert held == {"params": plan.params.elements, "optim": plan.optim.elements}, rank
    whole = sum(p.numel() for p in Recipe.load(checked.recipe).build_model().parameters())
    assert measured[0]["params"] < whole // 2  # less than FSDP over the 2 data-parallel ranks alone


# ---------------------------------------------------------------- plans (fast)


def recipe_of(spec: dict):
    from launcher.recipe import Recipe

    return Recipe.load(spec)


def test_the_gpt_plan_splits_attention_mlp_embedding_and_head():
    from launcher.tensor_parallel import plan_of, resolve

    recipe = recipe_of(GPT)
    model = recipe.check_model()
    resolved = resolve(plan_of(recipe, model), model, 2)
    for block in range(GPT["n_layer"]):
        for name, style in (("attn.q", "colwise"), ("attn.k", "colwise"), ("attn.v", "colwise"),
                            ("attn.proj", "rowwise"), ("mlp.0", "colwise"), ("mlp.2", "rowwise")):
            assert resolved[f"blocks.{block}.{name}"] == style
    assert resolved["tok_emb"] == "rowwise" and resolved["head"] == "colwise_gather_output"
    for name in ("ln_f", *(f"blocks.{b}.ln{i}" for b in range(GPT["n_layer"]) for i in (1, 2))):
        assert resolved[name] == "sequence_parallel"
    assert resolved["blocks.0"] == "sequence_start"
    assert len(resolved) == 8 * GPT["n_layer"] + 4


def test_a_transformers_model_brings_its_own_plan():
    from launcher.tensor_parallel import plan_of, resolve

    recipe = recipe_of(LLAMA)
    model = recipe.check_model()
    resolved = resolve(plan_of(recipe, model), model, 2)
    assert resolved["model.layers.1.self_attn.q_proj"] == "colwise"
    assert resolved["model.layers.0.mlp.down_proj"] == "rowwise"
    assert resolved["lm_head"] == "colwise_gather_output"


@pytest.mark.parametrize("plan,tp,message", [
    ({"blocks.*.attn.qkv": "colwise"}, 2, "`blocks.*.attn.qkv` names no module"),
    ({"blocks.*.attn.q": "diagonal"}, 2, "the style `diagonal`"),
    ({"blocks.*.ln1": "colwise"}, 2, "(LayerNorm) the style `colwise`"),
    ({"blocks.*.attn.q": "colwise"}, 3, "32 output features, which do not split over tp.size=3"),
    ({"blocks.*.attn.proj": "rowwise"}, 8, "n_head=4 (SelfAttention) does not divide by tp.size=8"),
])
def test_a_bad_plan_is_refused_saying_what_to_fix(plan, tp, message):
    from launcher.errors import ConfigError
    from launcher.tensor_parallel import resolve

    model = recipe_of(GPT).check_model()
    with pytest.raises(ConfigError) as info:
        resolve(plan, model, tp)
    assert message in str(info.value)


def test_launcher_plan_shows_the_mesh_and_each_tp_size(tmp_path):
    proc = run(["plan", write_config(tmp_path / "c.yaml", config(tmp_path / "run", GPT)), "--nproc", 4,
                "tp.size=2"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "strategy: fsdp" in out and "mesh: replicate 1 x shard 2 x tp 2" in out
    assert "micro 2 x 2 data-parallel ranks (each a TP group of 2) x 2 accumulation" in out
    table = out[out.index("tensor parallelism (tp.size"):]
    assert "* 2      1 x 2 x 2" in table and "1 x 4 x 1" in table and "1 x 1 x 4" in table


def test_tied_weights_stay_one_parameter_after_the_split():
    """The tied GPT's embedding (rowwise) and head (colwise) both split the vocabulary: one Parameter."""
    from launcher.tensor_parallel import retie, tied_names

    model = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False))
    model[1].weight = model[0].weight
    ties = tied_names(model)
    assert ties == [["0.weight", "1.weight"]]
    model[1].weight = nn.Parameter(model[0].weight.detach().clone())  # what parallelize_module leaves
    retie(model, ties)
    assert model[1].weight is model[0].weight
