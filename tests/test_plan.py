"""`launcher plan`: the memory estimate per rank against what ranks really hold, and its CLI.

- slow: one launch of 2 CPU ranks (test_sharded.py's worker) trains one step of a
  tiny GPT with odd dim-0 sizes, and the tied and frozen toy recipes, under ddp, fsdp and
  ZeRO-1/2/3 one after the other, and records `strategy.local_numel()` per rank; the
  plan's parameter and optimizer-state elements must equal them exactly.
- fast: FSDP's split against torch.chunk at world sizes 2 cannot show (3, 4), frozen,
  tied and optimizer-state counting, a recipe optimizer, and the CLI's table, its node-range table
  (--nnodes MIN:MAX) and bad input.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from helpers import ROOT, check, run, write_config

SHARDED_WORKER = Path(__file__).resolve().parent / "test_sharded.py"

# Odd dim 0 almost everywhere (q, k, v, proj and LayerNorms 9 rows, positions 7) and an odd
# total (4,563): FSDP's last rank holds fewer rows, ZeRO pads its flat buffers and partitions.
GPT_ODD = {"name": "recipes.gpt", "n_layer": 2, "n_head": 1, "d_model": 9, "seq_len": 7, "max_chars": 6000}
TIED_ODD = {"name": "toy_recipes.tied", "vocab": 25, "hidden": 31}
FROZEN_ODD = {"name": "toy_recipes.frozen", "hidden": 33, "classes": 5}

STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "zero1": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}},
    "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
}
RECIPES = {"gpt": (GPT_ODD, "bf16"), "tied": (TIED_ODD, "fp32"), "frozen": (FROZEN_ODD, "fp32")}


def job_config(strategy: str, recipe: str, run_dir: Path, **extra) -> dict:
    section, precision = RECIPES[recipe]
    return {"recipe": dict(section), "run_dir": str(run_dir), "precision": precision,
            "train": {"global_batch_size": 16, "micro_batch_size": 4, "max_steps": 1, "log_every_steps": 1,
                      "seed": 0},
            "optim": {"name": "adamw", "lr": 1e-3}, "checkpoint": {"resume": "never"},
            **STRATEGIES[strategy], **extra}


def plan_for(config: dict, world_size: int):
    from launcher.config import validate
    from launcher.plan import estimate
    from launcher.recipe import Recipe

    cfg = validate(config, "test")
    return estimate(cfg, Recipe.load(cfg.recipe), world_size)


def have_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# ---------------------------------------------------------------- against 2 real ranks


@pytest.mark.slow
def test_plan_equals_what_two_ranks_hold(tmp_path):
    names = [n for n in STRATEGIES if not n.startswith("zero") or have_deepspeed()]
    jobs = [{"job": f"{name}-{recipe}", "config": job_config(name, recipe, tmp_path / f"{name}-{recipe}")}
            for name in names for recipe in RECIPES]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "jobs": jobs}))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    check(run([SHARDED_WORKER, spec], prefix=prefix, timeout=900))
    results = json.loads((tmp_path / "results.json").read_text())
    wrong = []
    for job in jobs:
        name = job["job"].split("-")[0]
        measured = results[job["job"]]["local_numel"]
        planned = plan_for(job["config"], 2)[name].ranks
        for rank, (real, plan) in enumerate(zip(measured, planned)):
            got = {"params": plan.params.elements, "optim": plan.optim.elements}
            print(f"{job['job']} rank {rank}: measured {real}, planned {got}")
            if got != real:
                wrong.append((job["job"], rank, real, got))
    assert not wrong, wrong
    if not have_deepspeed():
        pytest.skip("deepspeed is not installed: only ddp and fsdp were checked")


# ---------------------------------------------------------------- fast: the numbers


@pytest.mark.parametrize("world", [3, 4])
def test_fsdp_split_is_torch_chunk_per_rank(tmp_path, world):
    """Rank r holds chunk r of torch.chunk(param, W) (none when there are fewer chunks than ranks)."""
    import torch

    from launcher.recipe import Recipe

    config = job_config("fsdp", "frozen", tmp_path, train={"global_batch_size": 12})
    rows = plan_for(config, world)
    model = Recipe.load(config["recipe"]).build_model()

    def held(params, r):
        return sum(c[r].numel() if r < len(c) else 0 for c in (torch.chunk(p, world) for p in params))

    trainable = [p for p in model.parameters() if p.requires_grad]
    for r, plan in enumerate(rows["fsdp"].ranks):
        assert plan.params.elements == held(model.parameters(), r)
        assert plan.grads.elements == held(trainable, r)
        assert plan.optim.elements == 2 * held(trainable, r)
    # classes=5 rows over 4 ranks: 2, 2, 1, 0; the first rank is the largest
    assert rows["fsdp"].largest[0] == 0
    assert len({p.params.elements for p in rows["fsdp"].ranks}) > 1


def test_frozen_tied_and_optimizer_state_counts(tmp_path):
    frozen = plan_for(job_config("ddp", "frozen", tmp_path), 2)["ddp"].ranks[0]
    n_frozen, n_all = 33 * 16 + 33, 33 * 16 + 33 + 33 * 33 + 33 + 5 * 33 + 5
    assert frozen.params.elements == n_all
    assert frozen.grads.elements == n_all - n_frozen and frozen.optim.elements == 2 * (n_all - n_frozen)

    tied = plan_for(job_config("ddp", "tied", tmp_path), 2)["ddp"].ranks[0]
    assert tied.params.elements == 25 * 31 + 2 * (31 * 62 + 31) + 2 * 31  # the head is the embedding

    sgd = plan_for(job_config("ddp", "tied", tmp_path, optim={"name": "sgd", "momentum": 0.9}), 2)
    plain = plan_for(job_config("ddp", "tied", tmp_path, optim={"name": "sgd", "momentum": 0.0}), 2)
    assert sgd["ddp"].ranks[0].optim.elements == tied.params.elements
    assert plain["ddp"].ranks[0].optim.elements == 0
    # ZeRO-1/2: one flat buffer of 4,743 elements padded to 4,744 (a multiple of 2*W), 2,372 a rank
    zero = plan_for(job_config("zero2", "tied", tmp_path), 2)
    assert zero["zero2"].ranks[0].optim.elements == 2 * 2372 and zero["zero2"].ranks[0].master.elements == 2372
    assert zero["zero3"].ranks[0].params.elements == sum(math.ceil(n / 2) for n in (775, 1922, 31, 1922, 31, 31, 31))


def test_precision_and_offload_bytes(tmp_path):
    rows = plan_for(job_config("zero3", "tied", tmp_path, precision="bf16",
                               deepspeed={"zero_stage": 3, "offload_optimizer": True},
                               fsdp={"cpu_offload": True}), 2)
    z3, z1, fsdp = rows["zero3"].ranks[0], rows["zero1"].ranks[0], rows["fsdp"].ranks[0]
    assert z3.params.device == 2 * z3.params.elements and z3.params.host == 0  # bf16 partitions on the device
    assert z3.master.host == 4 * z3.master.elements and z3.optim.host == 4 * z3.optim.elements
    assert z1.params.device == 2 * 4744  # the bf16 flat buffer, padding included
    assert fsdp.params.host == 4 * fsdp.params.elements and fsdp.params.device == 0  # fp32 shards on the host
    assert fsdp.master.elements == 0


def test_recipe_optimizer_known_and_unknown(tmp_path):
    """A recipe's optimizer is built on the meta device: its class and groups decide the state."""
    import textwrap

    def plan(name: str, optimizer: str):
        recipe = tmp_path / f"{name}.py"
        recipe.write_text(textwrap.dedent(f"""
            import torch
            from torch import nn

            class Lion(torch.optim.Optimizer):  # not one of torch's: its state is unknown
                def __init__(self, params):
                    super().__init__(params, {{"lr": 1e-4}})

            def model(cfg):
                return nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))

            def data(cfg):
                return [(torch.zeros(3), 0)] * 8, None

            def loss(model, batch):
                return model(batch[0]).sum()

            def optimizer(model, cfg):
                decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
                rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
                return {optimizer}
        """))
        return plan_for({"recipe": {"name": str(recipe)}, "run_dir": str(tmp_path / "r"), "strategy": "ddp",
                         "train": {"global_batch_size": 8}}, 2)

    # two groups: the weights with momentum (one buffer), the biases without (none)
    rows = plan("groups", 'torch.optim.SGD([{"params": decay, "momentum": 0.9}, {"params": rest}], lr=0.1)')
    assert rows["ddp"].ranks[0].optim.elements == 3 * 5 + 5 * 2
    assert rows["zero1"].ranks[0].optim.elements == 28 // 2  # the weights' flat group: 25 padded to 28, halved
    rows = plan("adam", "torch.optim.Adam(model.parameters(), amsgrad=True)")
    assert rows["ddp"].ranks[0].optim.elements == 3 * (15 + 5 + 10 + 2)
    rows = plan("lion", "Lion(model.parameters())")
    assert all(row.ranks[0].optim is None for row in rows.values())
    assert rows["ddp"].ranks[0].params.elements == 32


# ---------------------------------------------------------------- fast: the CLI


def test_cli_prints_every_strategy_and_marks_the_chosen(tmp_path):
    proc = check(run(["plan", ROOT / "configs" / "gpt.yaml", "--nproc", 4, "--nnodes", 2,
                      f"run_dir={tmp_path / 'r'}"]))
    out = proc.stdout
    assert "world size: 8 (2 nodes x 4 processes)" in out
    assert "global batch 32 = micro 4 x 8 ranks x 1 accumulation" in out
    table = out[out.index("memory per rank"):].splitlines()
    marked = [line for line in table if line.lstrip().startswith("*  ")]
    assert len(marked) == 1 and marked[0].split()[1] == "ddp"  # strategy auto on 8 ranks
    for label in ("ddp", "fsdp", "ZeRO-1", "ZeRO-2", "ZeRO-3"):
        assert any(line.split()[:1] == [label] or line.split()[1:2] == [label] for line in table[1:8]), label
    assert not any(line.split()[:1] == ["single"] for line in table[1:8])  # only at world size 1
    assert "MiB" in out and "445,952" in out  # bytes and elements (445,952 parameters, tied once)


def test_cli_bad_world_size_exits_2(tmp_path):
    config = write_config(tmp_path / "c.yaml", job_config("ddp", "tied", tmp_path / "r"))
    proc = run(["plan", config, "--nproc", 3])
    assert proc.returncode == 2, proc.stderr
    assert "train.global_batch_size=16 cannot be split evenly over 3 processes" in proc.stderr
    proc = run(["plan", config, "--nproc", 0])
    assert proc.returncode == 2 and "--nproc 0" in proc.stderr


def test_setup_peak_per_rank(tmp_path):
    """Building the model (docs/design.md, Building the model): sharded, rank 0 alone holds the whole model
    (in host memory), the others their shards and one whole parameter; with init_weights (FSDP) no rank
    holds it; resuming, none; ZeRO-3 then holds three partitions at once; replicated, every rank all."""
    from launcher.config import validate
    from launcher.plan import setup, setup_peak
    from launcher.recipe import Recipe

    def peaks(strategy, recipe, **kwargs):
        cfg = validate(job_config(strategy, recipe, tmp_path), "test")
        return setup_peak(setup(cfg, Recipe.load(cfg.recipe), 2), strategy, **kwargs)[0]

    cfg = validate(job_config("fsdp", "tied", tmp_path), "test")
    s = setup(cfg, Recipe.load(cfg.recipe), 2)
    whole = sum(p.numel * p.itemsize for p in s.model.params)
    largest = max(p.numel * p.itemsize for p in s.model.params)
    fsdp = peaks("fsdp", "tied", init_weights=False)
    assert fsdp[0].host == whole and fsdp[1].host == 0
    assert fsdp[1].device <= whole // 2 + largest + 4 * 31  # a shard (rows rounded up) and one parameter
    assert peaks("fsdp", "tied", init_weights=True)[0].host == 0
    assert peaks("fsdp", "tied", init_weights=False, resuming=True)[0].host == 0
    zero3 = peaks("zero3", "tied", init_weights=False)
    assert zero3[0].host == whole and zero3[1].host == 0 and zero3[1].device >= 3 * (whole // 2)
    assert all(p.host == whole for p in peaks("ddp", "tied", init_weights=False))


def test_cli_node_range_has_a_row_per_node_count(tmp_path):
    """--nnodes MIN:MAX (an elastic job's range): at each node count the batch math and what a rank of the
    config's strategy holds; a size the global batch does not split is flagged, and the plan exits 2 as
    `launcher run` would."""
    from launcher.plan import human

    config = job_config("fsdp", "tied", tmp_path / "r")  # G 16, micro batch at most 4
    proc = run(["plan", write_config(tmp_path / "c.yaml", config), "--nproc", 2, "--nnodes", "1:4"])
    assert proc.returncode == 2, proc.stderr
    assert "world size: 2   " in proc.stdout  # the whole plan at the fewest nodes
    table = proc.stdout[proc.stdout.index("elastic, 1 to 4 nodes x 2 process(es)"):].splitlines()[1:]
    rows = {int(cols[0]): cols for cols in (re.split(r"\s{2,}", line.strip()) for line in table[1:5])}
    assert table[0].split()[:5] == ["nodes", "world", "micro", "accumulation", "strategy"]
    for nodes, world, micro, accumulation in ((1, 2, 4, 2), (2, 4, 4, 1), (4, 8, 2, 1)):
        _, most = plan_for(config, world)["fsdp"].largest
        assert rows[nodes][1:5] == [str(world), str(micro), str(accumulation), "fsdp"]
        assert rows[nodes][-1] == human(most.total.bytes)  # fsdp: less a rank the more ranks there are
    assert rows[3][1:] == ["6", "cannot run: train.global_batch_size=16 cannot be split evenly over 6 processes, "
                                "whatever the micro batch"]
    assert "cannot be split evenly at world size 6, which this elastic job (1 to 4 nodes x 2 worker(s))" in proc.stderr

    proc = check(run(["plan", write_config(tmp_path / "c.yaml", config), "--nproc", 2, "--nnodes", "2:4",
                      "train.global_batch_size=48"]))
    assert "world size: 4 (2 nodes x 2 processes)" in proc.stdout
    assert "cannot run" not in proc.stdout


@pytest.mark.parametrize("nnodes", ["3:2", "0", "0:2", "a:b", "1.5", "1:2:3"])
def test_cli_bad_node_range_exits_2(tmp_path, nnodes):
    config = write_config(tmp_path / "c.yaml", job_config("ddp", "tied", tmp_path / "r"))
    proc = run(["plan", config, "--nnodes", nnodes])
    assert proc.returncode == 2 and f"--nnodes {nnodes}: give a number of nodes" in proc.stderr, proc.stderr
