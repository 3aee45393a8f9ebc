"""SLURM support on a real cluster: slurmctld and two slurmd on this machine
(scripts/local_slurm.sh, from Debian's packages), CPU only, gloo.

What is checked, with numbers:
  a. slurm/train.sbatch on 2 nodes x 1 worker (torchrun per node) trains the same per-step
     losses as a local `launcher run --nproc 2` (relative 1e-5);
  b. slurm/train_srun.sbatch with 2 tasks (one per worker): the same;
  c. `scancel --signal=USR1` mid-run: the job checkpoints, requeues itself, resumes and ends
     with the uninterrupted losses; metrics.jsonl holds every step once;
  d. `launcher slurm CONFIG --submit --nodes 2`: the job completes with exit 0 and runs the
     config as it was when it was written, not as edited afterwards;
  e. a job whose training fails is requeued exactly LAUNCHER_MAX_FAILURES times, then ends
     FAILED with exit 1.
The fast tests at the end need no cluster (the job script, sbatch missing).

The simulated node names do not resolve, so the jobs meet at MASTER_ADDR=127.0.0.1. Jobs
inherit the test's environment (sbatch's --export=ALL): PYTHONPATH with the repository and
tests/, OMP_NUM_THREADS=1, LAUNCHER_PYTHON = this interpreter.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, check, digits_config, losses, metrics, run, worker_env, write_config

SCRIPT = ROOT / "scripts" / "local_slurm.sh"
STATE = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/launcher-slurm"))
LOSS_RTOL = 1e-5
STEPS = 30
TRAIN = {"global_batch_size": 64, "micro_batch_size": 32, "max_steps": STEPS, "log_every_steps": 1, "seed": 0}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


# ---------------------------------------------------------------- the cluster


def slurm_cmd(*args, timeout=60, check_rc=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SLURM_CONF": str(STATE / "slurm.conf")})
    if check_rc:
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def no_cluster(reason: str):
    """Skip, with the reason; in CI (LAUNCHER_REQUIRE_SLURM=1), fail instead."""
    if os.environ.get("LAUNCHER_REQUIRE_SLURM") == "1":
        pytest.fail(f"LAUNCHER_REQUIRE_SLURM=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """The local cluster: started here unless it already runs (then left running)."""
    if sys.platform != "linux":
        no_cluster("no local SLURM: scripts/local_slurm.sh needs Linux")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    if not was_up:
        if os.geteuid() != 0 and shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            no_cluster("no local SLURM: slurmctld is not installed and installing it needs root "
                       "(run scripts/local_slurm.sh start as root)")
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            no_cluster(f"no local SLURM: scripts/local_slurm.sh start failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
    yield STATE / "slurm.conf"
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=300)


def job_env(extra: dict | None = None) -> dict:
    return worker_env({"MASTER_ADDR": "127.0.0.1", "SLURM_CONF": str(STATE / "slurm.conf"),
                       "LAUNCHER_PYTHON": sys.executable, **(extra or {})})


def sbatch(args: list, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=job_env(env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict:
    out = slurm_cmd("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, timeout: float = 180) -> dict:
    """Poll until the job is in a final state (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(1)
    slurm_cmd("scancel", job_id, check_rc=False)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s: {info}")


def wait_for_rows(run_dir: Path, n: int, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and sum('"split"' not in line for line in path.read_text().splitlines() if line) >= n:
            return
        if job_info(job_id).get("JobState") in FINAL:
            pytest.fail(f"job {job_id} ended before step {n}: {job_info(job_id)}")
        time.sleep(0.2)
    pytest.fail(f"job {job_id}: no step {n} in {run_dir}/metrics.jsonl after {timeout:.0f} s")


def log_of(info: dict) -> str:
    return Path(info["StdOut"]).read_text()


def assert_same_losses(a: list, b: list) -> float:
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert worst <= LOSS_RTOL, worst
    return worst


def duration(info: dict) -> str:
    return f"restarts={info.get('Restarts')} exit={info.get('ExitCode')}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The per-step losses of a local, uninterrupted `launcher run --nproc 2`."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "ref.yaml", digits_config(tmp / "ref", train=TRAIN))
    check(run(["run", cfg, "--nproc", 2]))
    return losses(tmp / "ref")


# ---------------------------------------------------------------- a, b: the two modes


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script, sbatch_args", [
    ("train.sbatch", ["--nodes", 2]),                                 # a: one task per node, torchrun in each
    ("train_srun.sbatch", ["--nodes", 2, "--ntasks-per-node", 1]),    # b: one task per worker
], ids=["node_tasks", "worker_tasks"])
def test_job_trains_like_a_local_run(cluster, reference, tmp_path, script, sbatch_args):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    started = time.monotonic()
    job = sbatch([*sbatch_args, ROOT / "slurm" / script, cfg], cwd=tmp_path)
    info = wait_for_job(job)
    took = time.monotonic() - started
    log = log_of(info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["NodeList"] == "node[1-2]" and info["Restarts"] == "0"
    assert "attempt 1: finished" in log
    rows = metrics(tmp_path / "run")[0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    worst = assert_same_losses(losses(tmp_path / "run"), reference)
    print(f"{script}: job {job} took {took:.1f} s, max relative loss difference {worst:.2e}")


# ---------------------------------------------------------------- c: preemption


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, reference, tmp_path):
    recipe = {"name": "toy_recipes.slow", "hidden": 32, "delay_s": 0.3}  # the digits math, 0.3 s a step
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe=recipe, train=TRAIN))
    started = time.monotonic()
    job = sbatch(["--nodes", 2, ROOT / "slurm" / "train.sbatch", cfg], cwd=tmp_path)
    wait_for_rows(tmp_path / "run", 3, job)
    signalled = time.monotonic()
    slurm_cmd("scancel", "--signal=USR1", job)  # to the job steps, as --signal=USR1@N sends it
    info = wait_for_job(job, timeout=240)
    took = time.monotonic() - started
    log = log_of(info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert "attempt 1: stopped by a signal after saving a checkpoint (exit 3): requeueing" in log
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", log)
    assert resumed, log
    stopped_at = int(resumed.group(2))
    assert 3 <= stopped_at < STEPS
    assert "attempt 2: finished" in log
    steps = [r["step"] for r in metrics(tmp_path / "run")[0]]
    assert steps == list(range(1, STEPS + 1))  # every step once: the rows after the checkpoint were dropped
    worst = assert_same_losses(losses(tmp_path / "run"), reference)
    print(f"USR1 at {signalled - started:.1f} s, stopped at step {stopped_at}, job {job} done after "
          f"{took:.1f} s ({duration(info)}), max relative loss difference {worst:.2e}")


# ---------------------------------------------------------------- d: launcher slurm --submit


@pytest.mark.slurm
@pytest.mark.slow
def test_launcher_slurm_submit_runs_the_saved_config(cluster, reference, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    started = time.monotonic()
    proc = run(["slurm", cfg, "--nodes", 2, "--submit"], cwd=tmp_path, env=job_env())
    assert proc.returncode == 0, proc.stderr
    submitted = re.search(r"^submitted job (\d+)\nlog: (\S+)$", proc.stdout, flags=re.M)
    assert submitted, proc.stdout
    job, log_path = submitted.groups()
    slurm_dir = tmp_path / "run" / "slurm"
    assert (slurm_dir / "job.sbatch").is_file() and (slurm_dir / "config.yaml").is_file()
    assert "#SBATCH --nodes=2" in proc.stdout  # the script is printed
    # An edit of the YAML after submitting does not change the queued job.
    write_config(cfg, digits_config(tmp_path / "run", train={**TRAIN, "max_steps": 5}))
    info = wait_for_job(job)
    took = time.monotonic() - started
    assert Path(log_path) == Path(info["StdOut"]) == slurm_dir / f"run-{job}.out"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log_of(info)
    assert "attempt 1: finished" in log_of(info)
    worst = assert_same_losses(losses(tmp_path / "run"), reference)
    print(f"launcher slurm --submit: job {job} took {took:.1f} s, max relative loss difference {worst:.2e}")


@pytest.mark.slurm
@pytest.mark.slow
def test_launcher_slurm_test_only_asks_the_scheduler(cluster, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    proc = run(["slurm", cfg, "--nodes", 2, "--test-only"], cwd=tmp_path, env=job_env())
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"sbatch --test-only \(nothing submitted\): .*to start at .* on nodes node\[1-2\]", proc.stdout), \
        proc.stdout
    assert "submitted job" not in proc.stdout
    # Four nodes do not exist: the scheduler says so, exit 2.
    proc = run(["slurm", cfg, "train.micro_batch_size=16", "--nodes", 4, "--test-only"], cwd=tmp_path, env=job_env())
    assert proc.returncode == 2 and "the scheduler refuses this job" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- e: failures are capped


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_job_is_requeued_at_most_the_cap(cluster, tmp_path):
    recipe = {"name": "toy_recipes.failing", "hidden": 32, "fail_rank": 1, "fail_at": 3}
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe=recipe, train=TRAIN))
    started = time.monotonic()
    job = sbatch(["--nodes", 2, ROOT / "slurm" / "train.sbatch", cfg], cwd=tmp_path,
                 env={"LAUNCHER_MAX_FAILURES": "1"})
    info = wait_for_job(job, timeout=240)
    took = time.monotonic() - started
    log = log_of(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log
    assert info["Restarts"] == "1", log
    attempts = re.findall(r"^\[launcher-slurm\] job \d+ attempt (\d+): \d{4}-", log, flags=re.M)
    assert attempts == ["1", "2"], log
    assert "attempt 1: failed (exit 1); restart 1 of at most 1 (LAUNCHER_MAX_FAILURES): requeueing" in log
    assert "attempt 2: failed (exit 1) after 1 restart(s), the most LAUNCHER_MAX_FAILURES=1 allows: not requeued" in log
    assert log.count("deliberate failure on rank 1 at micro-step 3") >= 2
    time.sleep(6)  # past a scheduling pass: still not requeued
    assert job_info(job)["JobState"] == "FAILED" and job_info(job)["Restarts"] == "1"
    print(f"failing job {job}: {len(attempts)} attempts in {took:.1f} s ({duration(info)})")


# ---------------------------------------------------------------- no cluster needed


def slurm_args(argv: list[str]) -> argparse.Namespace:
    from launcher.slurm import add_arguments

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    add_arguments(p)
    return p.parse_intermixed_args([str(a) for a in argv])


def test_the_job_scripts_share_one_body():
    from launcher.slurm import JOB_BODY, body_of

    for name in ("train.sbatch", "train_srun.sbatch"):
        assert body_of((ROOT / "slurm" / name).read_text()) == JOB_BODY, f"slurm/{name} differs from launcher/slurm.py"
        assert subprocess.run(["bash", "-n", ROOT / "slurm" / name]).returncode == 0


def test_launcher_slurm_writes_the_job_and_the_saved_config(tmp_path, monkeypatch, capsys):
    from launcher.config import load_config
    from launcher.slurm import JOB_BODY, cmd_slurm

    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    args = slurm_args([cfg, "optim.lr=0.01", "train.micro_batch_size=2", "--nodes", 4, "--gpus-per-node", 8, "--partition", "gpu",
                       "--time", "1:00:00", "--exclusive", "--extra-sbatch=--reservation=big --mail-type END"])
    assert cmd_slurm(args) == 0
    script = (tmp_path / "run" / "slurm" / "job.sbatch").read_text()
    assert script == capsys.readouterr().out
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00",
                 "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=USR1@180", "#SBATCH --open-mode=append",
                 "#SBATCH --reservation=big", "#SBATCH --mail-type END", "NPROC_PER_NODE=8", "LAUNCH=node",
                 f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%x-%j.out", f"#SBATCH --chdir={tmp_path}"]:
        assert re.search(rf"^{re.escape(line)}\b", script, flags=re.M), line
    assert script.endswith(JOB_BODY)
    saved = load_config(tmp_path / "run" / "slurm" / "config.yaml")
    assert saved.optim.lr == 0.01 and saved.train.max_steps == STEPS
    assert subprocess.run(["bash", "-n", tmp_path / "run" / "slurm" / "job.sbatch"]).returncode == 0


def test_launcher_slurm_checks_its_input(tmp_path, monkeypatch):
    from launcher.config import ConfigError
    from launcher.slurm import cmd_slurm

    monkeypatch.chdir(tmp_path)
    # 64 = micro 32 x world 2: fine for 2 nodes x 1, not for 3 nodes (64 / (32 x 3) is not whole).
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    with pytest.raises(ConfigError):
        cmd_slurm(slurm_args([cfg, "--nodes", 3]))
    with pytest.raises(ConfigError, match="more than --gpus-per-node"):
        cmd_slurm(slurm_args([cfg, "--nodes", 1, "--gpus-per-node", 1, "--nproc-per-node", 2]))
    # A limit hardly longer than the SIGUSR1 warning would stop and requeue every attempt at its start.
    with pytest.raises(ConfigError, match="--time 5:00 is too short"):
        cmd_slurm(slurm_args([cfg, "--nodes", 2, "--time", "5:00"]))
    with pytest.raises(ConfigError, match="not a SLURM time limit"):
        cmd_slurm(slurm_args([cfg, "--nodes", 2, "--time", "2h"]))
    assert not (tmp_path / "run" / "slurm" / "job.sbatch").exists()


def test_submit_without_sbatch_is_bad_input(tmp_path, monkeypatch):
    from launcher.config import ConfigError
    from launcher.slurm import cmd_slurm

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    for flag in ("--submit", "--test-only"):
        with pytest.raises(ConfigError, match=f"{flag} needs SLURM's sbatch, which is not on PATH"):
            cmd_slurm(slurm_args([cfg, "--nodes", 2, flag]))
