"""Building the model (launcher/build.py; docs/design.md, Building the model).

Under FSDP2 (HSDP too) and ZeRO-3 no process but global rank 0 ever builds the whole model, and that only
in host memory; with the recipe's init_weights none does; a resume builds nothing but skeletons. Whatever
the path, every rank starts from the weights, buffers and RNG state one process builds from the same seed,
bit for bit: plain models, tied weights, persistent and non-persistent buffers, init_weights (recipes.gpt),
transformers models built from a config, a LightningModule and a PEFT model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch

from helpers import ROOT, run_ranks
from launcher.build import FullDraws, ModelSource, to_empty
from launcher.config import validate
from launcher.recipe import Recipe

WORKER = ROOT / "tests" / "build_worker.py"
HAS_PEFT = importlib.util.find_spec("peft") is not None

RECIPES = {  # name: recipe section
    "tied": {"name": "toy_recipes.tied", "depth": 2},
    "buffers": {"name": "toy_recipes.buffers"},
    "gpt": {"name": "recipes.gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16, "max_chars": 20000},
    "hf_llama": {"name": "toy_recipes.wild_hf", "arch": "llama"},
    "hf_gpt2": {"name": "toy_recipes.wild_hf", "arch": "gpt2"},
    "lightning": {"name": "toy_recipes.wild_lightning_transformer", "dropout": 0.0},
    **({"peft": {"name": "toy_recipes.wild_peft"}} if HAS_PEFT else {}),
}
STRATEGIES = {
    "fsdp": {"strategy": "fsdp"},
    "hsdp": {"strategy": "fsdp", "fsdp": {"replicate": 2}},
    "offload": {"strategy": "fsdp", "fsdp": {"cpu_offload": True}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
}
CASES = [(r, s) for r in RECIPES for s in ("fsdp", "zero3")] + [("buffers", "hsdp"), ("gpt", "hsdp"),
                                                                  ("buffers", "offload")]
RESUMED = [("tied", "fsdp"), ("gpt", "fsdp"), ("tied", "zero3"), ("buffers", "fsdp")]  # trained, then built again


def config(recipe: str, strategy: str, run_dir) -> dict:
    return {"recipe": RECIPES[recipe], "run_dir": str(run_dir), **STRATEGIES.get(strategy, {"strategy": strategy}),
            "train": {"global_batch_size": 4, "max_steps": 1, "seed": 3, "log_every_steps": 1},
            "optim": {"name": "sgd", "lr": 0.01}, "log": {"progress": "lines"}}


def one_process(recipe: str) -> tuple[dict, str]:
    """What one process starts from: (every parameter and buffer by name, the hash of the RNG state)."""
    cfg = validate(config(recipe, "single", "unused"), recipe)
    model = ModelSource(Recipe.load(cfg.recipe), cfg.train.seed, 0, torch.device("cpu"), resuming=False).build(False)
    state = {**model.state_dict(), **dict(model.named_buffers())}
    return state, hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every case built (and trained one step) by one pair of worker processes: ({case: rank 0's record,
    rank 1's record}, out dir, the workers' output)."""
    base = tmp_path_factory.mktemp("build")
    cases = {f"{r}-{s}": config(r, s, base / "runs" / f"{r}-{s}") for r, s in CASES}
    cases.update({f"{r}-{s}-resumed": config(r, s, base / "runs" / f"{r}-{s}") for r, s in RESUMED})
    spec = base / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    _, tails = run_ranks(WORKER, [spec, base], 2, base)
    records = [json.loads((base / f"rank{r}.json").read_text()) if (base / f"rank{r}.json").exists() else {}
               for r in range(2)]
    return records, base, tails


def record_of(built, case: str) -> list[dict]:
    records, _, tails = built
    got = [r.get(case) for r in records]
    for rank, r in enumerate(got):
        if r is None:
            pytest.fail(f"{case}: rank {rank} did not build it (a case before it failed)\n{tails}")
        if "failed" in r:
            pytest.fail(f"{case}: rank {rank} failed:\n{r['failed']}\n{tails}")
    return got


@pytest.mark.slow
@pytest.mark.parametrize("recipe, strategy", CASES, ids=lambda v: str(v))
def test_one_copy_at_most_and_the_weights_of_one_process(built, recipe, strategy):
    rank0, rank1 = record_of(built, f"{recipe}-{strategy}")
    init_weights = recipe == "gpt"
    # rank 1: never a real model, only the skeleton. rank 0: the one host copy, unless init_weights
    # (then ZeRO-3 still makes its one copy on the host, from the skeleton: its partitions cannot be
    # initialised in place).
    assert set(rank1["builds"]) == {"meta"} and rank1["copies"] == 0, rank1
    if init_weights and strategy != "zero3":
        assert set(rank0["builds"]) == {"meta"} and rank0["copies"] == 0, rank0
    else:
        assert rank0["copies"] == 1, rank0
    expected, rng = one_process(recipe)
    got = torch.load(built[1] / f"{recipe}-{strategy}.pt", weights_only=True)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value.to(got[name].dtype)), f"{recipe} under {strategy}: {name} differs"
    assert rank0["rng"] == rank1["rng"] == rng, "every rank's RNG continues as one process's does"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, strategy", RESUMED, ids=lambda v: str(v))
def test_a_resume_builds_nothing_twice(built, recipe, strategy):
    """Built again on the run dir of a trained case: only skeletons (non-persistent buffers aside: those
    are in no checkpoint, so rank 0 builds its copy for them), filled from the checkpoint."""
    rank0, rank1 = record_of(built, f"{recipe}-{strategy}-resumed")
    assert rank0["resumed"] and rank1["resumed"]
    assert set(rank1["builds"]) == {"meta"} and rank1["copies"] == 0, rank1
    assert rank0["copies"] == (1 if recipe == "buffers" else 0), rank0
    assert set(rank0["builds"]) == ({"meta", "cpu"} if recipe == "buffers" else {"meta"}), rank0
    trained = torch.load(built[1] / f"{recipe}-{strategy}-resumed.pt", weights_only=True)
    fresh = torch.load(built[1] / f"{recipe}-{strategy}.pt", weights_only=True)
    assert trained.keys() == fresh.keys()
    changed = [k for k in fresh if not torch.equal(trained[k], fresh[k])]
    assert changed, "the resumed model holds the trained step's weights, not fresh ones"
    if recipe == "buffers":
        assert torch.equal(trained["positions"], fresh["positions"])


# ---------------------------------------------------------------- in one process


def test_init_weights_recipes_build_on_meta_and_match_model():
    """With init_weights every strategy builds on meta and initialises after the seed: the same weights as
    the recipe's own model() after the same seed (what a script gets), the head still tied."""
    cfg = validate(config("gpt", "single", "unused"), "gpt")
    recipe = Recipe.load(cfg.recipe)
    model = ModelSource(recipe, 3, 0, torch.device("cpu"), resuming=False).build(on_meta=False)
    torch.manual_seed(3)
    script = recipe.build_model()
    assert model.head.weight is model.tok_emb.weight
    for (name, a), b in zip(model.state_dict().items(), script.state_dict().values()):
        assert torch.equal(a, b), name


def test_to_empty_keeps_tied_weights_one_parameter():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
        model[1].weight = model[0].weight
    to_empty(model, torch.device("cpu"))
    assert model[1].weight is model[0].weight and not model[0].weight.is_meta
    assert not torch.__future__.get_swap_module_params_on_conversion()  # set back


def test_full_draws_leave_plain_tensors_alone():
    torch.manual_seed(0)
    a = torch.empty(5, 3).normal_()
    torch.manual_seed(0)
    with FullDraws():
        b = torch.empty(5, 3).normal_()
    assert torch.equal(a, b)
