"""HSDP: `strategy: fsdp` with `fsdp.replicate: R`, FSDP2 on an R x W/R device mesh.

- slow, one launch of 4 CPU ranks (test_sharded.py's worker, the real Trainer): a tiny GPT
  under DDP, HSDP 2 x 2 and HSDP 4 x 1 (every group one rank) with accumulation 2, clipping
  and the GPT's (total, count) loss gives DDP's loss, grad norm and validation loss at every
  step and DDP's final weights; each rank of HSDP 2 x 2 holds what plain FSDP on 2 ranks
  holds (torch.chunk(param, 2)[rank mod 2], and the plan's HSDP row); bf16 trains.
- slow: a checkpoint saved under HSDP 2 x 2 resumes under plain fsdp on 2 processes, and one
  of plain fsdp under `fsdp.replicate: nodes` on 2 loopback nodes of 2 processes (DCP
  reshards), with the uninterrupted run's losses; `launcher export` of an HSDP run is the
  trained model's full state dict.
- fast: R is checked before any worker starts (a non-divisor, replicate under ddp), `nodes`
  resolves to the node count, and `launcher plan` shows and marks the HSDP row.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, check, free_port, losses, max_rel, metrics, outcome, reraise, run, with_sections, worker_env,
                     write_config)
from test_checkpoint import by_step, start_from_checkpoint, weights

SHARDED_WORKER = Path(__file__).resolve().parent / "test_sharded.py"
GPT = {"name": "recipes.gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "max_chars": 40000}
# Odd dim 0 (q, k, v, proj and norms 9 rows, positions 7): the two shards of a parameter differ in size.
GPT_ODD = {"name": "recipes.gpt", "n_layer": 2, "n_head": 1, "d_model": 9, "seq_len": 7, "max_chars": 6000}
STEPS, SAVED_AT = 8, 4

# Another reduction order (reduce-scatter in a group, then all-reduce across groups) moves the
# last bit or two: measured at most 3e-7 on the loss and grad norm (torch 2.13 CPU); a wrong
# average (over the shard group only, say) shows at 1e-2 or more.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4


def config(run_dir: Path, strategy: str = "fsdp", replicate: int | str = 1, **sections) -> dict:
    cfg = {
        "recipe": dict(GPT),
        "run_dir": str(run_dir),
        "precision": "fp32",
        "strategy": strategy,
        "fsdp": {"replicate": replicate},
        # micro 2: accumulation 2 on 4 ranks, 4 on 2 (micro_batch_size is not part of the math)
        "train": {"global_batch_size": 16, "micro_batch_size": 2, "max_steps": STEPS, "log_every_steps": 1,
                  "grad_clip": 1.0, "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1},
        "checkpoint": {"every_steps": SAVED_AT, "keep_last": 5},
    }
    return with_sections(cfg, sections)


def plan_rows(cfg: dict, world: int):
    from launcher.config import validate
    from launcher.plan import estimate
    from launcher.recipe import Recipe

    cfg = validate(cfg, "test")
    return estimate(cfg, Recipe.load(cfg.recipe), world)


# ---------------------------------------------------------------- one launch of 4 ranks


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """(results per job, run root) of one 4-rank worker launch; a failure is reported by every test."""
    root = tmp_path_factory.mktemp("hsdp4")

    def launch():
        jobs = [
            {"job": "ddp", "config": config(root / "ddp", strategy="ddp")},
            {"job": "hsdp", "config": config(root / "hsdp", replicate=2)},
            {"job": "hsdp_4x1", "config": config(root / "hsdp_4x1", replicate=4)},
            {"job": "hsdp_odd", "config": config(root / "hsdp_odd", replicate=2, recipe=GPT_ODD,
                                                  train={"max_steps": 1})},
            {"job": "hsdp_bf16", "config": config(root / "hsdp_bf16", replicate=2, precision="bf16")},
        ]
        spec = root / "spec.json"
        spec.write_text(json.dumps({"out": str(root), "jobs": jobs}))
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
        check(run([SHARDED_WORKER, spec], prefix=prefix, timeout=600))
        return json.loads((root / "results.json").read_text()), root, {j["job"]: j["config"] for j in jobs}

    result = outcome(launch)
    return lambda: reraise(result)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["hsdp", "hsdp_4x1"])
def test_hsdp_trains_like_ddp(four, job):
    """Loss, grad norm (clipped: DTensor full_tensor over a 2-D mesh) and validation as DDP's on 4 ranks."""
    _, root, _ = four()
    ref_rows, ref_val = metrics(root / "ddp")
    rows, val = metrics(root / job)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) == [r["step"] for r in ref_rows]
    loss_rel = max_rel([r["loss"] for r in ref_rows], [r["loss"] for r in rows])
    norm_rel = max_rel([r["grad_norm"] for r in ref_rows], [r["grad_norm"] for r in rows])
    val_rel = max_rel([r["val_loss"] for r in ref_val], [r["val_loss"] for r in val])
    print(f"{job} vs ddp on 4 ranks: max relative difference loss {loss_rel:.2e}, grad_norm {norm_rel:.2e}, "
          f"val_loss {val_rel:.2e}")
    assert loss_rel < LOSS_RTOL and val_rel < LOSS_RTOL
    assert norm_rel < GRAD_NORM_RTOL
    assert any(r["grad_norm"] > 1.0 for r in ref_rows)  # so clipping was exercised
    final, reference = (torch.load(root / f"{name}.pt")["final"] for name in (job, "ddp"))
    assert final.keys() == reference.keys()
    for key, value in final.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_hsdp_memory_is_that_of_its_shard_group(four):
    """HSDP 2 x 2: rank r holds chunk r mod 2 of every parameter, as plain FSDP on 2 ranks; R = W keeps it whole."""
    from launcher.recipe import Recipe

    results, _, configs = four()
    for job, recipe, shard in (("hsdp_odd", GPT_ODD, 2), ("hsdp", GPT, 2), ("hsdp_4x1", GPT, 1)):
        model = Recipe.load(recipe).build_model()
        measured = results[job]["local_numel"]
        print(f"{job}: local_numel per rank {measured}")
        assert len(measured) == 4
        for rank, held in enumerate(measured):
            chunks = [torch.chunk(p, shard) for p in model.parameters()]
            params = sum(c[rank % shard].numel() if rank % shard < len(c) else 0 for c in chunks)
            assert held == {"params": params, "optim": 2 * params}, (job, rank)
    # The plan's rows agree: HSDP 2 x 2 on 4 ranks is plain fsdp on 2, rank for rank mod 2.
    hsdp_plan = plan_rows(configs["hsdp_odd"], 4)["hsdp"].ranks
    fsdp_plan = plan_rows({**configs["hsdp_odd"], "fsdp": {"replicate": 1}}, 2)["fsdp"].ranks
    measured = results["hsdp_odd"]["local_numel"]
    assert measured[0] != measured[1]  # odd rows: the second shard is smaller
    for rank in range(4):
        for plan in (hsdp_plan[rank], fsdp_plan[rank % 2]):
            assert {"params": plan.params.elements, "optim": plan.optim.elements} == measured[rank]


@pytest.mark.slow
def test_hsdp_bf16_trains(four):
    _, root, _ = four()
    values = losses(root / "hsdp_bf16")
    assert len(values) == STEPS and all(v == v for v in values)
    assert values[-1] < values[0] - 0.3, values


@pytest.mark.slow
def test_export_of_an_hsdp_run_is_the_trained_model(four, tmp_path):
    _, root, _ = four()
    exported = weights(root / "hsdp", tmp_path)
    final = torch.load(root / "hsdp.pt")["final"]  # full_state_dict() after training
    assert exported.keys() == final.keys()
    for key, value in final.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)
    from recipes import gpt

    model = gpt.model(gpt.Config(**{k: v for k, v in GPT.items() if k != "name"}))
    model.load_state_dict(exported, strict=True)


# ---------------------------------------------------------------- resume across the layouts


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    """An uninterrupted plain fsdp run on 2 processes."""
    root = tmp_path_factory.mktemp("fsdp2")

    def launch():
        check(run(["run", write_config(root / "full.yaml", config(root / "full")), "--nproc", 2]))
        return root / "full"

    result = outcome(launch)
    return lambda: reraise(result)


def two_nodes(config_path: Path) -> str:
    """`launcher run --nnodes 2 --nproc 2` started twice on the loopback: 2 "nodes" of 2 ranks."""
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "launcher", "run", str(config_path), "--nproc", "2",
                               "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"],
                              cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outs = [node.communicate(timeout=600) for node in nodes]
    shown = "\n".join(f"--- node {rank}: exit {node.returncode}\n{err[-3000:]}"
                      for rank, (node, (_, err)) in enumerate(zip(nodes, outs)))
    assert [node.returncode for node in nodes] == [0, 0], shown  # whole: a failure here has been rare
    return "".join(err for _, err in outs)


def shards_saved(checkpoint: Path) -> int:
    """Chunks DCP stored per parameter: the shard group's size (replicas' identical shards are written once)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return len(metadata["model.tok_emb.weight"].chunks)


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [("hsdp", "fsdp"), ("fsdp", "hsdp")])
def test_resume_across_hsdp_and_fsdp(four, fsdp2, tmp_path, saved, resumed):
    """Step SAVED_AT's checkpoint of one layout, resumed in the other: the uninterrupted run's losses.
    HSDP here: 2 x 2 from the worker, or fsdp.replicate=nodes on 2 loopback nodes of 2 processes."""
    full = four()[1] / "hsdp" if saved == "hsdp" else fsdp2()
    start_from_checkpoint(full, SAVED_AT, tmp_path / "resumed")
    path = write_config(tmp_path / "resumed.yaml", config(tmp_path / "resumed",
                                                          replicate="nodes" if resumed == "hsdp" else 1))
    err = two_nodes(path) if resumed == "hsdp" else check(run(["run", path, "--nproc", 2])).stderr
    assert f"at step {SAVED_AT}" in err and "resumed from" in err, err
    a, b = by_step(tmp_path / "resumed"), by_step(full)
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    rel = max_rel([b[s] for s in b], [a[s] for s in b])
    print(f"saved under {saved}, resumed under {resumed}: max relative loss difference {rel:.2e}")
    assert rel < LOSS_RTOL
    mine, reference = weights(tmp_path / "resumed", tmp_path), weights(full, tmp_path)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    # Both layouts shard over 2 ranks: nodes resolved to 2 groups of 2, not 1 group of 4.
    last = tmp_path / "resumed" / "checkpoints" / f"step_{STEPS:06d}"
    assert shards_saved(last) == shards_saved(full / "checkpoints" / f"step_{STEPS:06d}") == 2


# ---------------------------------------------------------------- fast: checks, nodes, plan


def test_replica_groups():
    from launcher.config import ConfigError
    from launcher.strategies.fsdp import replica_groups

    assert [replica_groups(r, 8, 4) for r in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert replica_groups("nodes", 8, 4) == 2  # 2 nodes of 4
    assert replica_groups("nodes", 4, 4) == 1  # one node: plain FSDP
    assert replica_groups("nodes", 16, 1) == 16  # one process a node: every group one rank
    for bad in (3, 0, -2, 16):
        with pytest.raises(ConfigError, match=f"fsdp.replicate={bad} must divide the world size 8.*1, 2, 4, 8"):
            replica_groups(bad, 8, 4)
    with pytest.raises(ConfigError, match="same number of processes on every node"):
        replica_groups("nodes", 6, 4)


@pytest.mark.slow  # an end-to-end run: the full suite
def test_bad_replicate_exits_2_before_any_worker(tmp_path):
    cases = [(["strategy=fsdp", "fsdp.replicate=3"], "fsdp.replicate=3 must divide the world size 4 (replica "
              "groups of equal size): use one of 1, 2, 4, or nodes"),
             (["strategy=ddp", "fsdp.replicate=2"], "fsdp.replicate=2 (HSDP) needs strategy=fsdp, and this run's "
              "strategy is ddp: set strategy=fsdp")]
    base = write_config(tmp_path / "c.yaml", config(tmp_path / "r"))
    for overrides, message in cases:
        proc = run(["run", base, "--nproc", 4, *overrides])
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "first step" not in proc.stderr + proc.stdout
        assert not (tmp_path / "r").exists()


def test_nodes_is_checked_where_the_node_count_is_known(tmp_path, monkeypatch):
    """A worker (torchrun's variables) resolves nodes = W / its node's processes; uneven nodes are bad input."""
    from launcher.preflight import check_inputs
    from launcher.config import ConfigError, validate

    cfg = validate(config(tmp_path / "r", replicate="nodes", train={"global_batch_size": 24}), "test")
    for key, value in {"RANK": "0", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="same number of processes on every node"):
        check_inputs(cfg, 6, "test")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # 2 nodes of 3
    check_inputs(cfg, 6, "test")


def test_plan_shows_and_marks_the_hsdp_row(tmp_path):
    rows = plan_rows(config(tmp_path / "r", recipe=GPT_ODD), 4)
    assert "hsdp" not in rows  # replicate 1: the fsdp row is the whole story
    rows = plan_rows(config(tmp_path / "r", recipe=GPT_ODD, replicate=2), 4)
    two = plan_rows(config(tmp_path / "r", recipe=GPT_ODD), 2)["fsdp"].ranks
    assert [r.params.elements for r in rows["hsdp"].ranks] == [two[r % 2].params.elements for r in range(4)]
    assert rows["fsdp"].ranks[0].params.elements < rows["hsdp"].ranks[0].params.elements

    config_path = write_config(tmp_path / "c.yaml", config(tmp_path / "r", replicate="nodes"))
    out = check(run(["plan", config_path, "--nproc", 2, "--nnodes", 2])).stdout
    assert "strategy: fsdp (HSDP)" in out
    assert "replicate: 2" in out  # the resolved config: one group per node
    table = out[out.index("memory per rank"):].splitlines()
    marked = [line for line in table if line.lstrip().startswith("*  ")]
    assert len(marked) == 1 and marked[0].split()[1] == "HSDP", marked
    assert "HSDP: dim 0 of each parameter split over 2 ranks" in out and "2 replica groups" in out
