"""Data parallelism on 2 CPU processes with gloo.

Tolerances: the runs below differ only in the order float32 sums are taken (one
big batch, 4 accumulated micro-batches, or 2 ranks' gradients averaged by an
all-reduce), so losses agree to a relative 1e-5 and weights to an absolute 1e-5
over 20 steps; measured differences are around 1e-7.
"""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, check, digits_config, free_port, losses, metrics, run, worker_env, write_config
from launcher.export import export

pytestmark = pytest.mark.slow  # multi-process: the full suite, not the fast tier

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def assert_same_losses(a, b, rtol=LOSS_RTOL):
    assert len(a) == len(b) and len(a) > 0
    assert a == pytest.approx(b, rel=rtol), max(abs(x - y) / abs(y) for x, y in zip(a, b))


def final_weights(run_dir, tmp_path):
    out = tmp_path / f"{run_dir.name}.safetensors"
    export(run_dir, out)
    return load_file(str(out))


def assert_same_weights(a, b, atol=WEIGHT_ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def equivalence_runs(tmp_path, recipe, global_batch, nproc_micro):
    """(a) 1 process, accumulation 1; (b) 1 process, accumulation 4; (c) 2 processes DDP, accumulation 2."""
    dirs = {}
    for name, nproc, micro in [("a", 1, global_batch), ("b", 1, global_batch // 4), ("c", 2, nproc_micro)]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", digits_config(
            run_dir, recipe=recipe,
            train={"global_batch_size": global_batch, "micro_batch_size": micro, "max_steps": 20}))
        args = ["run", cfg] + (["--nproc", nproc] if nproc > 1 else [])
        dirs[name] = run_dir
        proc = check(run(args))
        if nproc > 1:
            # Rank 0 speaks alone: one line per step, not one per rank.
            assert sum(line.startswith("step=") for line in proc.stdout.splitlines()) == 20
    return dirs


def check_equivalent(dirs, tmp_path):
    weights = {k: final_weights(d, tmp_path) for k, d in dirs.items()}
    for other in ("b", "c"):
        assert_same_losses(losses(dirs[other]), losses(dirs["a"]))
        assert_same_weights(weights[other], weights["a"])
    assert len(metrics(dirs["c"])[0]) == 20  # metrics written once, by rank 0


def test_digits_equivalence_1proc_accum_and_ddp(tmp_path):
    dirs = equivalence_runs(tmp_path, {"name": "recipes.digits", "hidden": 32}, 32, 8)
    check_equivalent(dirs, tmp_path)


def test_token_loss_equivalence_with_uneven_lengths(tmp_path):
    """(total, count) losses over sequences of different lengths: the count is summed over
    micro-batches and ranks, so the update is the one big batch's."""
    dirs = equivalence_runs(tmp_path, {"name": "toy_recipes.tokens"}, 32, 8)
    check_equivalent(dirs, tmp_path)
    # The micro-batches really do hold different numbers of tokens.
    from toy_recipes import tokens

    lengths = {len(s) for s in tokens.generate(tokens.Config())}
    assert len(lengths) > 5


def test_validation_on_2_ranks_equals_1_rank(tmp_path):
    """The same checkpoint evaluated on 1 and on 2 ranks (359 samples, batches of 50:
    uneven shards, a padded batch on one rank) gives the same metrics."""
    cfg = write_config(tmp_path / "train.yaml", digits_config(tmp_path / "train", train={"max_steps": 10}))
    check(run(["run", cfg]))
    checkpoint = tmp_path / "train" / "checkpoints" / "step_000010"
    rows = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"eval{nproc}"
        cfg = write_config(tmp_path / f"eval{nproc}.yaml", digits_config(
            run_dir, train={"max_steps": 10, "micro_batch_size": 32, "eval_batch_size": 50}, checkpoint={"resume": str(checkpoint)}))
        check(run(["run", cfg] + (["--nproc", 2] if nproc == 2 else [])))
        rows[nproc] = metrics(run_dir)[1][-1]
    assert rows[1]["step"] == rows[2]["step"] == 10
    assert rows[2]["val_loss"] == pytest.approx(rows[1]["val_loss"], rel=1e-6)
    assert rows[2]["accuracy"] == pytest.approx(rows[1]["accuracy"], rel=1e-6)


@pytest.fixture(scope="module")
def reference_2proc(tmp_path_factory):
    """The digits config run with `launcher run --nproc 2`: the losses every launch path must give."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp / "c.yaml", digits_config(tmp / "run", train={"micro_batch_size": 16, "max_steps": 12}))
    check(run(["run", cfg, "--nproc", 2]))
    return cfg, losses(tmp / "run")


def config_with_run_dir(cfg_path, run_dir):
    import yaml

    config = yaml.safe_load(cfg_path.read_text())
    config["run_dir"] = str(run_dir)
    return write_config(run_dir.parent / f"{run_dir.name}.yaml", config)


def test_torchrun_launch(tmp_path, reference_2proc):
    cfg, expected = reference_2proc
    cfg = config_with_run_dir(cfg, tmp_path / "torchrun")
    check(run(["--nproc_per_node", 2, "--standalone", "-m", "launcher", "run", cfg],
              prefix=[sys.executable, "-m", "torch.distributed.run"]))
    assert_same_losses(losses(tmp_path / "torchrun"), expected, rtol=1e-6)


def test_accelerate_launch(tmp_path, reference_2proc):
    pytest.importorskip("accelerate")
    cfg, expected = reference_2proc
    cfg = config_with_run_dir(cfg, tmp_path / "accelerate")
    port = str(free_port())
    check(run(["launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--main_process_port", port,
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "launcher", "run", cfg],
              prefix=[sys.executable, "-m", "accelerate.commands.launch"] if False else
              [sys.executable, "-m", "accelerate.commands.accelerate_cli"]))
    assert_same_losses(losses(tmp_path / "accelerate"), expected, rtol=1e-6)


def test_simulated_srun(tmp_path, reference_2proc):
    """Two tasks started the way srun starts them: only SLURM variables, no RANK."""
    cfg, expected = reference_2proc
    cfg = config_with_run_dir(cfg, tmp_path / "srun")
    job_id = str(random.randint(1, 10**6))
    procs = []
    for rank in range(2):
        env = worker_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                          "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job_id,
                          "SLURM_JOB_NUM_NODES": "1"})
        procs.append(subprocess.Popen([sys.executable, "-m", "launcher", "run", str(cfg)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_same_losses(losses(tmp_path / "srun"), expected, rtol=1e-6)
    assert "step=" in outs[0][0] and "step=" not in outs[1][0]  # rank 0 speaks alone


ALLREDUCE_COUNTER = """
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from launcher.config import load_config
from launcher.env import detect, device_for, init_process_group
from launcher.trainer import Trainer

cfg = load_config(sys.argv[1])
env = detect()
device = device_for(env)
init_process_group(env, device, 120)
trainer = Trainer(cfg, env, device)
calls = [0]
def counting_hook(state, bucket):
    calls[0] += 1
    return allreduce_hook(None, bucket)
trainer.strategy.model.register_comm_hook(None, counting_hook)
trainer.fit()
if env.rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"allreduces": calls[0]}, f)
dist.destroy_process_group()
# Leave as the CLI does (docs/design.md, Process exit): gloo's threads can abort a finished process in
# interpreter finalization ("terminate called without an active exception").
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_no_sync_gives_one_allreduce_per_optimizer_step(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(ALLREDUCE_COUNTER)
    counts = {}
    for accumulation in (1, 4):
        cfg = write_config(tmp_path / f"a{accumulation}.yaml", digits_config(
            tmp_path / f"a{accumulation}", train={"global_batch_size": 32, "micro_batch_size": 16 // accumulation,
                                                  "max_steps": 10}))
        out = tmp_path / f"a{accumulation}.json"
        check(run(["--nproc-per-node", 2, "--standalone", script, cfg, out],
                  prefix=[sys.executable, "-m", "torch.distributed.run"]))
        counts[accumulation] = json.loads(out.read_text())["allreduces"]
    # The tiny model fits one gradient bucket: one all-reduce per step, however many micro-steps.
    assert counts == {1: 10, 4: 10}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_2_ranks(tmp_path, precision):
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", precision=precision, optim={"name": "adamw", "lr": 1e-2},
        train={"micro_batch_size": 16, "max_steps": 40, "log_every_steps": 5}))
    check(run(["run", cfg, "--nproc", 2]))
    rows = metrics(tmp_path / "run")[0]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_fp16_overflow_skips_the_step_and_holds_the_schedule(tmp_path):
    """toy_recipes.spike multiplies the loss by 1e38 at micro-steps 5 and 6: the scaled
    fp16 gradients overflow, the scaler skips those steps, they are counted, and the
    learning-rate schedule does not advance on them."""
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", recipe={"name": "toy_recipes.spike"}, precision="fp16",
        schedule={"warmup_steps": 100, "decay": "constant"}, optim={"name": "adamw", "lr": 0.01},
        train={"max_steps": 10}))
    check(run(["run", cfg]))
    rows = metrics(tmp_path / "run")[0]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 0, 0, 1, 2, 2, 2, 2, 2]
    lrs = [r["lr"] for r in rows]
    # Warmup lr = 0.01 * (applied steps + 1) / 100: it stalls across the two skipped steps.
    assert lrs == pytest.approx([0.01 * (k + 1) / 100 for k in [0, 1, 2, 3, 4, 4, 4, 5, 6, 7]])


def test_ddp_on_one_process_trains(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", strategy="ddp", train={"max_steps": 5}))
    check(run(["run", cfg]))
    assert len(losses(tmp_path / "run")) == 5


def test_multi_node_needs_a_rendezvous_endpoint(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run"))
    proc = run(["run", cfg, "--nproc", 2, "--nnodes", 2])
    assert proc.returncode == 2 and "--rdzv-endpoint" in proc.stderr


def test_a_failing_rank_stops_the_job(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", recipe={"name": "toy_recipes.failing", "fail_rank": 1, "fail_at": 3},
        train={"micro_batch_size": 16, "max_steps": 200}))
    start = time.perf_counter()
    proc = run(["run", cfg, "--nproc", 2], timeout=120)
    assert proc.returncode == 1
    assert time.perf_counter() - start < 90
    assert "deliberate failure on rank 1 at micro-step 3" in proc.stdout + proc.stderr


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_trains_at_1_and_2_processes(tmp_path, config, nproc):
    """Unchanged but for the run's length and place: train.micro_batch_size is a maximum, so a
    config written for one process runs on two. One process is `launcher run CONFIG`, as the README
    starts it (torchrun with one worker: test_elastic, test_two_nodes_on_loopback_train_as_one_job)."""
    proc = check(run(["run", ROOT / "configs" / config, *(["--nproc", nproc] if nproc > 1 else []),
                      "train.max_steps=3", f"run_dir={tmp_path / 'run'}"]))
    rows, val = metrics(tmp_path / "run")
    assert [r["step"] for r in rows][-1] == 3 and len(val) == 1
    assert f"on {nproc} process(es)" in proc.stderr


def test_nproc_sets_the_worker_threads_itself_and_says_so_once(tmp_path):
    """torchrun's OMP_NUM_THREADS banner does not open a run: the launcher sets the threads and says so."""
    env = worker_env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", ROOT / "configs" / "digits.yaml", "--nproc", "2",
                           "train.max_steps=2", f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Setting OMP_NUM_THREADS environment variable" not in proc.stderr + proc.stdout
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert proc.stderr.count(f"each of the 2 workers uses {threads} CPU thread(s)") == 1, proc.stderr
    assert proc.stderr.splitlines()[0] == f"run dir: {tmp_path / 'run'}"


def test_two_nodes_on_loopback_train_as_one_job(tmp_path, reference_2proc):
    """`--nnodes 2` started twice, one worker each: one job of world size 2, the local 2-process losses."""
    cfg, expected = reference_2proc
    cfg = config_with_run_dir(cfg, tmp_path / "nodes")
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "launcher", "run", str(cfg), "--nproc", "1", "--nnodes", "2",
                               "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"],
                              cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert_same_losses(losses(tmp_path / "nodes"), expected, rtol=1e-6)


def test_a_node_that_never_arrives_is_a_clear_timeout(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", dist={"timeout_s": 5}))
    endpoint = f"127.0.0.1:{free_port()}"
    start = time.perf_counter()
    proc = run(["run", cfg, "--nproc", 1, "--nnodes", 2, "--node-rank", 0, "--rdzv-endpoint", endpoint], timeout=120)
    assert proc.returncode == 1
    assert f"did not all meet at {endpoint} within 5 s" in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 60
