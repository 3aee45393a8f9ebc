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
     FAILED with exit 1;
  f. an elastic job (`launcher slurm --nodes 1-2`) that loses its second node mid-run
     (`scontrol update state=down`): SLURM keeps the job and the first node's task (--no-kill),
     which restarts at world size 1 from the newest checkpoint and ends with the uninterrupted
     losses; the job COMPLETES without a requeue.
The fast tests at the end need no cluster (the job script, sbatch missing; the job body run
with stand-ins for srun, scontrol and the launcher).

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


# ---------------------------------------------------------------- f: an elastic job loses a node


def node_state(node: str) -> str:
    return slurm_cmd("sinfo", "-h", "-N", "-n", node, "-o", "%t").stdout.strip()


@pytest.mark.slurm
@pytest.mark.slow
def test_elastic_job_goes_on_without_a_lost_node(cluster, reference, tmp_path):
    recipe = {"name": "toy_recipes.slow", "hidden": 32, "delay_s": 0.3}  # the digits math, 0.3 s a step
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe=recipe, train=TRAIN,
                                                          checkpoint={"every_steps": 5}))
    started = time.monotonic()
    proc = run(["slurm", cfg, "--nodes", "1-2", "--submit"], cwd=tmp_path, env=job_env())
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"^submitted job (\d+)$", proc.stdout, flags=re.M).group(1)
    wait_for_rows(tmp_path / "run", 8, job)
    assert job_info(job)["NodeList"] == "node[1-2]"  # both nodes were idle: SLURM gave it the most
    downed = time.monotonic()
    try:
        # The second node fails; the first hosts the rendezvous and runs the batch script.
        slurm_cmd("scontrol", "update", "nodename=node2", "state=down", "reason=launcher-test")
        info = wait_for_job(job, timeout=240)
    finally:
        if "down" in node_state("node2") or "drain" in node_state("node2"):
            slurm_cmd("scontrol", "update", "nodename=node2", "state=resume", check_rc=False)
    took = time.monotonic() - started
    log = log_of(info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "0" and info["NodeList"] == "node1", log  # not requeued; node2 left the job
    assert "srun: error: Node failure on node2" in log
    resized = re.search(r"world size 2 -> 1; resumed from \S+/step_(\d+) at step (\d+)", log)
    assert resized, log
    assert 5 <= int(resized.group(2)) < STEPS
    # srun reports the lost node's task as killed (137); the first node's task, which finished, decides.
    assert "srun exit 137: a task ended otherwise" in log and "reported 0: going by it" in log, log
    assert "attempt 1: finished" in log
    steps = [r["step"] for r in metrics(tmp_path / "run")[0]]
    assert steps == list(range(1, STEPS + 1))  # every step once: the rows after the checkpoint were dropped
    worst = assert_same_losses(losses(tmp_path / "run"), reference)
    print(f"elastic job {job}: node2 down at {downed - started:.1f} s, resumed at world size 1 from step "
          f"{resized.group(2)}, done after {took:.1f} s ({duration(info)}), max relative loss difference {worst:.2e}")


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


# ---------------------------------------------------------------- elastic jobs, no cluster needed

# Stand-ins that run the job body here: srun records its options and runs the task once per node
# (SLURM_NODEID 0..N-1; a node in FAKE_LOST is reported killed, 137, as srun does for a lost node's
# task), "python" records the launcher command of each node and exits FAKE_RC_<node>, and scontrol
# records what it is asked.
FAKE_SRUN = r"""#!/bin/bash
while [ "$1" != bash ]; do echo "$1" >>"$FAKE_DIR/srun.options"; shift; done
worst=0
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    if [[ " ${FAKE_LOST:-} " == *" $i "* ]]; then code=137
    else SLURM_NODEID=$i SLURM_PROCID=$i SLURM_NNODES=$SLURM_JOB_NUM_NODES SLURM_NTASKS=$SLURM_JOB_NUM_NODES "$@"; code=$?
    fi
    if [ "$code" -gt "$worst" ]; then worst=$code; fi
done
exit "$worst"
"""
FAKE_PYTHON = r"""#!/bin/bash
printf '%s\n' "$@" >"$FAKE_DIR/argv.$SLURM_NODEID"
rc=FAKE_RC_$SLURM_NODEID
exit "${!rc:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >>"$FAKE_DIR/scontrol.args"
"""


def write_job(tmp_path: Path, nodes: str, *overrides: str) -> Path:
    from launcher.slurm import cmd_slurm

    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    assert cmd_slurm(slurm_args([cfg, *overrides, "--nodes", nodes])) == 0
    return tmp_path / "run" / "slurm" / "job.sbatch"


def run_job(script: Path, tmp_path: Path, num_nodes: int, **fake) -> tuple[subprocess.CompletedProcess, Path]:
    """The job script under bash with the stand-ins, as SLURM would start it on num_nodes nodes."""
    fake_dir = tmp_path / f"fake-{len(list(tmp_path.glob('fake-*')))}"
    (fake_dir / "bin").mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("python", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (fake_dir / "bin" / name).write_text(text)
        (fake_dir / "bin" / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{fake_dir / 'bin'}:{os.environ['PATH']}", "FAKE_DIR": str(fake_dir), "TMPDIR": str(fake_dir),
                "LAUNCHER_VENV": "", "LAUNCHER_PYTHON": str(fake_dir / "bin" / "python"), "MASTER_ADDR": "10.0.0.1",
                "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "run", "SLURM_JOB_NUM_NODES": str(num_nodes),
                "SLURM_JOB_NODELIST": f"node[1-{num_nodes}]", **{k: str(v) for k, v in fake.items()}})
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    return proc, fake_dir


def launcher_argv(fake_dir: Path, node: int) -> argparse.Namespace:
    """The `launcher run` command node NODE ran, parsed by launcher's own parser."""
    from launcher.cli import parser

    argv = (fake_dir / f"argv.{node}").read_text().splitlines()
    assert argv[:3] == ["-m", "launcher", "run"], argv
    return parser()[1]["run"].parse_intermixed_args(argv[3:])


def test_launcher_slurm_writes_an_elastic_job(tmp_path, monkeypatch, capsys):
    from launcher.slurm import JOB_BODY

    monkeypatch.chdir(tmp_path)
    # 96 = micro 8 x 2, 3 and 4 ranks x a whole accumulation: every world size the job may take.
    script = write_job(tmp_path, "2-4", "train.global_batch_size=96", "train.micro_batch_size=8").read_text()
    out = capsys.readouterr()
    assert script == out.out and "(elastic: 2 to 4 node(s) x 1 worker(s), world size 2 to 4)" in out.err
    for line in ["#SBATCH --nodes=2-4", "#SBATCH --no-kill", "#SBATCH --requeue", "#SBATCH --signal=USR1@180",
                 "NODE_RANGE=2:4", "NPROC_PER_NODE=1", "LAUNCH=node"]:
        assert re.search(rf"^{re.escape(line)}(\s|$)", script, flags=re.M), line
    # With --ntasks-per-node, SLURM would size the job to MIN tasks and so start it on MIN nodes.
    assert "#SBATCH --ntasks-per-node" not in script
    assert script.endswith(JOB_BODY)
    assert subprocess.run(["bash", "-n", tmp_path / "run" / "slurm" / "job.sbatch"]).returncode == 0


def test_elastic_job_runs_one_task_per_node_that_srun_does_not_end(tmp_path, monkeypatch):
    from launcher.env import detect
    from launcher.preflight import check_node_launch

    monkeypatch.chdir(tmp_path)
    script = write_job(tmp_path, "2-4", "train.global_batch_size=96", "train.micro_batch_size=8")
    proc, fake = run_job(script, tmp_path, 3)  # SLURM gave it 3 of 2 to 4 nodes
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attempt 1: finished" in proc.stdout
    options = (fake / "srun.options").read_text().split()
    assert options == ["--kill-on-bad-exit=0", "--no-kill", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1"]
    for node in range(3):
        args = launcher_argv(fake, node)
        assert args.config == str(tmp_path / "run" / "slurm" / "config.yaml") and not args.overrides
        assert (args.nproc, args.nnodes, args.node_rank) == (1, "2:4", None)
        assert args.rdzv_endpoint == "10.0.0.1:15123"  # MASTER_ADDR, the port from the job id
        assert args.rdzv_conf == f"is_host={int(node == 0)}"  # the first node hosts the rendezvous
        # What `launcher run` makes of it in that srun task.
        check_node_launch(args, detect({"SLURM_PROCID": str(node), "SLURM_NTASKS": "3", "SLURM_NODEID": str(node),
                                        "SLURM_JOB_NUM_NODES": "3", "SLURM_TASKS_PER_NODE": "1(x3)",
                                        "SLURM_JOB_ID": "123", "MASTER_ADDR": "10.0.0.1"}))
        assert (args.min_nodes, args.max_nodes, args.elastic, args.max_restarts) == (2, 4, True, 3)
    assert not (fake / "scontrol.args").exists()


def test_elastic_job_outcome_is_the_first_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = write_job(tmp_path, "1-3", "train.global_batch_size=96", "train.micro_batch_size=16")
    # A node other than the first is lost (srun: 137), the first finishes: the job finished.
    proc, fake = run_job(script, tmp_path, 3, FAKE_LOST=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "srun exit 137: a task ended otherwise" in proc.stdout and "reported 0: going by it" in proc.stdout
    assert "attempt 1: finished" in proc.stdout and not (fake / "scontrol.args").exists()
    assert not list(fake.glob("launcher-*")), "the first task's code is left behind"
    # Another node's task failed after the first finished: finished all the same.
    proc, fake = run_job(script, tmp_path, 2, FAKE_RC_1=1)
    assert proc.returncode == 0 and "attempt 1: finished" in proc.stdout, proc.stdout + proc.stderr
    # The first node failed (its restarts spent): a failure, requeued.
    proc, fake = run_job(script, tmp_path, 2, FAKE_RC_0=1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed (exit 1); restart 1 of at most 3" in proc.stdout
    assert (fake / "scontrol.args").read_text() == "requeue 123\n"
    # SIGUSR1: every task saved and exited 3: requeued, as a fixed-size job is.
    proc, fake = run_job(script, tmp_path, 2, FAKE_RC_0=3, FAKE_RC_1=3)
    assert proc.returncode == 3 and "stopped by a signal after saving a checkpoint (exit 3)" in proc.stdout
    assert (fake / "scontrol.args").read_text() == "requeue 123\n"
    # Bad input is not requeued.
    proc, fake = run_job(script, tmp_path, 1, FAKE_RC_0=2)
    assert proc.returncode == 2 and "bad input (exit 2)" in proc.stdout and not (fake / "scontrol.args").exists()
    # A job outside its range (sbatch --nodes overridden on the command line): not started.
    proc, fake = run_job(script, tmp_path, 4)
    assert proc.returncode == 2 and "the job has 4 node(s), outside NODE_RANGE=1:3" in proc.stdout
    assert not (fake / "srun.options").exists()


def test_fixed_size_job_still_ends_every_task_when_one_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = write_job(tmp_path, "2")
    text = script.read_text()
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --ntasks-per-node=1" in text
    header = text.split(BODY_MARK)[0]
    # NODE_RANGE set empty: one exported in the submitting shell cannot make the job elastic
    assert "--no-kill" not in header and "\nNODE_RANGE=   #" in header
    proc, fake = run_job(script, tmp_path, 2)
    assert proc.returncode == 0 and "attempt 1: finished" in proc.stdout, proc.stdout + proc.stderr
    assert (fake / "srun.options").read_text().split() == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2",
                                                           "--ntasks-per-node=1"]
    for node in range(2):
        args = launcher_argv(fake, node)
        assert (args.nproc, args.nnodes, args.node_rank, args.rdzv_conf) == (1, "2", node, None)
        assert args.rdzv_endpoint == "10.0.0.1:15123"
    # A lost node fails a fixed-size job (requeued, the same nodes or others).
    proc, fake = run_job(script, tmp_path, 2, FAKE_LOST=1)
    assert proc.returncode == 137 and "failed (exit 137)" in proc.stdout
    assert (fake / "scontrol.args").read_text() == "requeue 123\n"


BODY_MARK = "# ---------------------------------------------------------------- launcher job body"


@pytest.mark.parametrize("nodes, overrides, message", [
    ("0-2", [], "--nodes 0-2: give a number of nodes N"),
    ("0", [], "--nodes 0: give a number of nodes N"),
    ("two", [], "--nodes two: give a number of nodes N"),
    ("1-2-3", [], "--nodes 1-2-3: give a number of nodes N"),
    ("1-3", [], "train.global_batch_size=64 cannot be split evenly at world size 3"),  # 64 = 32 x 2, not x 3
    ("1-2", ["strategy=deepspeed"], "strategy=deepspeed cannot run elastic"),
], ids=["min-zero", "zero", "not-a-number", "three-parts", "uneven-batch", "deepspeed"])
def test_launcher_slurm_refuses_a_bad_node_range(tmp_path, monkeypatch, capsys, nodes, overrides, message):
    from launcher.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    assert main(["slurm", str(cfg), *overrides, "--nodes", nodes]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "slurm").exists()


def test_launcher_slurm_with_max_below_min_exits_2(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train=TRAIN))
    proc = run(["slurm", cfg, "--nodes", "3-2"], cwd=tmp_path)
    assert proc.returncode == 2 and "--nodes 3-2: give a number of nodes N" in proc.stderr, proc.stderr
    assert "MIN-MAX with 1 <= MIN <= MAX" in proc.stderr and not (tmp_path / "run" / "slurm").exists()
