"""One run per run dir (docs/design.md, One run per run dir): a run dir another job's live run
holds is refused (exit 2) before anything is written, naming the holder; a dead holder's hold is
taken over with a warning; the processes of one job (its workers, its nodes, a requeued SLURM
attempt) are never refused; no run leaves its hold behind."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT, check, digits_config, metrics, run, worker_env, write_config
from launcher.errors import ConfigError
from launcher.hold import HOLD_FILE, hold, job_id, set_aside

HOST = socket.gethostname()


def write_hold(run_dir, pid: int, job: str, host: str = HOST, attempt: str = "0") -> bytes:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = (json.dumps({"host": host, "pid": pid, "started": "2024-05-01T09:30:00+00:00", "job": job,
                        "attempt": attempt}) + "\n").encode()
    (run_dir / HOLD_FILE).write_bytes(data)
    return data


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it now


def tree(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- the rule, in this process


def test_a_live_hold_of_another_job_is_refused_naming_the_holder(tmp_path):
    write_hold(tmp_path, os.getpid(), "single:other")
    with pytest.raises(ConfigError) as e:
        with hold(tmp_path, "single:mine"):
            pass
    message = str(e.value)
    assert f"pid {os.getpid()} on host {HOST}, started 2024-05-01T09:30:00+00:00" in message
    assert "Wait for that run to end, stop it, or use another run_dir" in message


def test_a_holder_on_another_host_is_refused_with_how_to_take_over(tmp_path):
    write_hold(tmp_path, 1, "single:other", host="node-b")
    with pytest.raises(ConfigError, match=f"on host node-b.*delete {tmp_path / HOLD_FILE}"):
        with hold(tmp_path, "single:mine"):
            pass
    (tmp_path / HOLD_FILE).write_text('{"host": "node-b", "pid"\n')  # mangled: nobody to name, nobody assumed gone
    with pytest.raises(ConfigError, match="a run whose hold cannot be read"):
        with hold(tmp_path, "single:mine"):
            pass


def test_a_dead_holder_is_taken_over_with_a_warning_and_released(tmp_path, capsys):
    pid = dead_pid()
    write_hold(tmp_path, pid, "single:other")
    with hold(tmp_path, "single:mine"):
        assert json.loads((tmp_path / HOLD_FILE).read_text())["job"] == "single:mine"
    assert not (tmp_path / HOLD_FILE).exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"pid {pid} on host {HOST}" in warnings[0] and "no longer running" in warnings[0]


def test_of_two_runs_taking_over_one_dead_hold_the_later_leaves_the_winners_in_place(tmp_path):
    dead = write_hold(tmp_path, dead_pid(), "single:a")
    winner = write_hold(tmp_path, os.getpid(), "single:b")  # the first taker's, in place of what the later one read
    assert not set_aside(tmp_path / HOLD_FILE, dead)
    assert (tmp_path / HOLD_FILE).read_bytes() == winner and len(list(tmp_path.iterdir())) == 1


def test_the_processes_of_one_job_share_the_hold(tmp_path, capsys):
    theirs = write_hold(tmp_path, 1, "slurm:4242", host="node-b")  # node 0 of this job
    with hold(tmp_path, "slurm:4242"):
        assert os.environ["LAUNCHER_JOB_ID"] == "slurm:4242"  # what workers started here inherit
    assert (tmp_path / HOLD_FILE).read_bytes() == theirs  # not this process's to release
    assert "LAUNCHER_JOB_ID" not in os.environ
    assert capsys.readouterr().err == ""


def test_a_requeued_slurm_attempt_takes_over_the_previous_attempts_hold(tmp_path, monkeypatch, capsys):
    write_hold(tmp_path, 1, "slurm:4242", host="node-b", attempt="0")  # SIGKILLed by the time limit
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with hold(tmp_path, "slurm:4242"):
        assert json.loads((tmp_path / HOLD_FILE).read_text())["attempt"] == "1"
    assert not (tmp_path / HOLD_FILE).exists()  # released by the attempt that ran
    assert capsys.readouterr().err == ""


def test_other_ranks_only_look(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with hold(tmp_path / "run", "torchrun:j"):  # rank 0 creates it (and the run dir), or is refused
        assert not (tmp_path / "run").exists()
    write_hold(tmp_path, os.getpid(), "single:other")
    with pytest.raises(ConfigError, match="is in use by another run"):
        with hold(tmp_path, "torchrun:j"):
            pass


def test_every_process_of_a_job_derives_the_same_id():
    assert job_id(None, None, {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3"}) == "slurm:7"
    assert job_id(2, None, {"LAUNCHER_JOB_ID": "single:abc", "TORCHELASTIC_RUN_ID": "x"}) == "single:abc"
    assert job_id(None, None, {"TORCHELASTIC_RUN_ID": "r1", "RANK": "1"}) == "torchrun:r1"
    # torchrun without --standalone or --rdzv-id names every job "none": its rendezvous tells them apart
    assert job_id(None, None, {"TORCHELASTIC_RUN_ID": "none", "RANK": "1", "MASTER_ADDR": "n0",
                               "MASTER_PORT": "29500"}) == "rendezvous:n0:29500"
    assert job_id(2, "n0:29400", {}) == job_id(2, "n0:29400", {}) == "rendezvous:n0:29400"  # every node alike
    assert job_id(None, None, {}) != job_id(None, None, {})  # a single process: a job of its own
    assert job_id(None, None, {"SLURM_JOB_ID": "7"}).startswith("single:")  # salloc's shell, no srun task


# ---------------------------------------------------------------- launcher run


def test_run_refuses_a_held_run_dir_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    write_hold(run_dir, os.getpid(), "single:other")
    config = write_config(tmp_path / "c.yaml", digits_config(run_dir))
    before = tree(tmp_path)
    proc = run(["run", config])
    assert proc.returncode == 2, proc.stderr
    assert f"pid {os.getpid()} on host {HOST}, started 2024-05-01T09:30:00+00:00" in proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert tree(tmp_path) == before


@pytest.mark.slow  # trains: test_a_dead_holder_is_taken_over_with_a_warning_and_released has the rule
def test_run_takes_over_a_dead_runs_hold(tmp_path):
    pid = dead_pid()
    run_dir = tmp_path / "run"
    write_hold(run_dir, pid, "single:other")
    proc = check(run(["run", write_config(tmp_path / "c.yaml", digits_config(run_dir, train={"max_steps": 2}))]))
    taken = [line for line in proc.stderr.splitlines() if "no longer running" in line]
    assert len(taken) == 1 and f"pid {pid} on host {HOST}" in taken[0]
    assert not (run_dir / HOLD_FILE).exists()


@pytest.mark.slow
def test_two_runs_started_together_one_runs_the_other_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", digits_config(run_dir, train={"max_steps": 40},
                                                             checkpoint={"every_steps": 10, "keep_last": 5}))
    lrs = [0.003, 0.001]
    procs = [subprocess.Popen([sys.executable, "-m", "launcher", "run", str(config), f"optim.lr={lr}"], cwd=ROOT,
                              env=worker_env(), stderr=subprocess.PIPE, text=True) for lr in lrs]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], f"exit codes {codes}\n" + "\n".join(errs)
    won, lost = codes.index(0), codes.index(2)
    assert f"pid {procs[won].pid} on host {HOST}" in errs[lost] and "is in use by another run" in errs[lost]

    # Every file in the run dir is the winner's: its config, its checkpoints, its 40 rows; no hold left.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lrs[won]
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in saved] == [f"step_{n:06d}" for n in (10, 20, 30, 40)]
    for step in saved:
        assert json.loads((step / "meta.json").read_text())["config"]["optim"]["lr"] == lrs[won]
    assert [row["step"] for row in metrics(run_dir)[0]] == list(range(1, 41))


@pytest.mark.slow
def test_run_on_a_run_dir_its_slurm_job_holds_is_not_refused(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", digits_config(run_dir))
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    # --nproc 0 is refused by the first check after the hold: reaching it means the hold let the run in.
    theirs = write_hold(run_dir, 1, "slurm:4242", host="node-b")  # this job's other node
    proc = run(["run", config, "--nproc", "0"], env=slurm)
    assert proc.returncode == 2 and "--nproc 0" in proc.stderr and "in use" not in proc.stderr, proc.stderr
    assert (run_dir / HOLD_FILE).read_bytes() == theirs  # not this process's to remove
    # The requeued attempt: the previous attempt's hold (SIGKILLed on another node) is taken over, then released.
    proc = run(["run", config, "--nproc", "0"], env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert proc.returncode == 2 and "--nproc 0" in proc.stderr and "in use" not in proc.stderr, proc.stderr
    assert not (run_dir / HOLD_FILE).exists()


@pytest.mark.slow
def test_nproc_workers_share_their_launchers_hold(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", digits_config(run_dir, train={"max_steps": 2}))
    proc = check(run(["run", config, "--nproc", "2"]))  # a worker refused would exit 2
    assert "in use" not in proc.stderr and not (run_dir / HOLD_FILE).exists()
