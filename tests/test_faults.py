"""Nothing is lost on faults, and hangs are bounded: a disk that fills up mid-save, a SIGKILL
mid-save, a validation that crashes after the last step, a rank that stops making progress.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, check, digits_config, metrics, run, worker_env, write_config
from test_checkpoint import by_step, children, start

pytestmark = pytest.mark.slow


def config(tmp_path, name, **recipe):
    cfg = digits_config(tmp_path / name, recipe={"name": "toy_recipes.faulty", "hidden": 32, **recipe},
                        train={"global_batch_size": 64, "micro_batch_size": 32, "max_steps": 20},
                        checkpoint={"every_steps": 5, "keep_last": 10})
    return write_config(tmp_path / f"{name}-{len(recipe)}.yaml", cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    check(run(["run", config(tmp, "full"), "--nproc", 2]))
    return by_step(tmp / "full")


def test_a_full_disk_mid_save_keeps_the_previous_checkpoint_and_names_disk_and_step(tmp_path, reference):
    proc = run(["run", config(tmp_path, "run", full_disk_at_save=2, full_disk_rank=1), "--nproc", 2])
    assert proc.returncode == 1
    err = proc.stderr
    assert err.count("could not be written") == 1, err
    assert "step 10" in err and "No space left on device" in err and str(tmp_path / "run" / "checkpoints") in err
    assert "Traceback" not in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000005"
    assert (ckpts / "step_000005" / "meta.json").is_file()
    assert not (ckpts / "step_000010").exists() and not (ckpts / "step_000010.tmp").exists()
    # With room on the disk, the run resumes from step 5 and ends as if nothing happened. (The
    # fault switched off is a change to the recipe's config, which launcher cannot know is harmless.)
    check(run(["run", config(tmp_path, "run"), "--nproc", 2, "checkpoint.resume_changed=allow"]))
    assert by_step(tmp_path / "run") == pytest.approx(reference, rel=1e-6)


def test_sigkill_during_a_save_never_publishes_it(tmp_path, reference):
    proc = start(["run", config(tmp_path, "run", slow_save_at=2, slow_save_s=0.5), "--nproc", 2])
    partial = tmp_path / "run" / "checkpoints" / "step_000010.tmp"
    deadline = time.time() + 120
    while not any(partial.glob("*.distcp")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    for pid in [proc.pid, *children(proc.pid)]:  # torchrun's workers have process groups of their own
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000005"
    assert not (ckpts / "step_000010").exists()
    check(run(["run", config(tmp_path, "run"), "--nproc", 2, "checkpoint.resume_changed=allow"]))
    steps = by_step(tmp_path / "run")  # asserts each step once
    assert steps == pytest.approx(reference, rel=1e-6)
    assert len(metrics(tmp_path / "run")[1]) == 1


def test_a_validation_that_crashes_after_the_last_step_loses_no_step(tmp_path, reference):
    proc = run(["run", config(tmp_path, "run", fail_validation=True), "--nproc", 2])
    assert proc.returncode == 1
    assert "deliberate failure in validation" in proc.stdout + proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000020"
    assert by_step(tmp_path / "run") == pytest.approx(reference, rel=1e-6)
    # Fixed, the same command finishes the validation without training again.
    proc = check(run(["run", config(tmp_path, "run"), "--nproc", 2, "checkpoint.resume_changed=allow"]))
    assert "resumed from" in proc.stderr and "at step 20" in proc.stderr
    assert len(metrics(tmp_path / "run")[1]) == 1


def test_a_rank_that_stops_making_progress_ends_the_job_within_the_timeout(tmp_path):
    timeout = 8
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", recipe={"name": "toy_recipes.failing", "hidden": 32, "fail_rank": 1, "fail_at": 5, "fail_how": "hang"},
        train={"global_batch_size": 64, "micro_batch_size": 16, "max_steps": 500}, dist={"timeout_s": timeout}))
    start_time = time.perf_counter()
    proc = run(["run", cfg, "--nproc", 2], timeout=300)
    elapsed = time.perf_counter() - start_time
    assert proc.returncode == 1
    err = proc.stderr
    # Rank 1's 5th loss call is step 3, micro-batch 1 (2 micro-batches a step).
    assert "rank 1 made no progress" in err and "in step 3, micro-batch 1" in err and "failing.py" in err
    assert "the job is waiting for rank(s) [1]" in err
    # Start-up (two processes importing torch on a busy 2-core machine) plus the timeout and
    # the report; without the watchdog the job would hang for the 500 steps' worth of timeouts.
    last_step = max(r["step"] for r in metrics(tmp_path / "run")[0])
    assert last_step == 2
    assert elapsed < timeout + 60, elapsed


def test_what_a_worker_printed_is_flushed_before_it_exits(tmp_path):
    """Workers leave with os._exit (no interpreter finalization), so their buffered output must
    be flushed first. Tasks started the way srun starts them (no `python -u`, unlike torchrun's
    workers) and rank 1, which prints nothing else that would flush its buffer."""
    cfg = config(tmp_path, "run", say_in_validation="unflushed-words")
    job_id = str(random.randint(1, 10**6))
    procs = []
    for rank in range(2):
        env = worker_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                          "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job_id,
                          "SLURM_JOB_NUM_NODES": "1",
                          "PYTHONUNBUFFERED": ""})  # an empty value: buffered, as by default
        procs.append(subprocess.Popen([sys.executable, "-m", "launcher", "run", str(cfg)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "unflushed-words" in outs[1][0]


def test_a_rendezvous_that_cannot_complete_ends_within_the_timeout_with_one_message(tmp_path):
    """Launch variables that say two processes, with only one started: after dist.timeout_s, one
    error line naming the address and the fix, exit 1, no traceback, no run dir."""
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", dist={"timeout_s": 3}))
    port = 20000 + os.getpid() % 20000
    started = time.monotonic()
    proc = run(["run", cfg], env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(port)}, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("error:") == 1 and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "could not meet the other 1 process(es)" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 60, took  # dist.timeout_s, plus start-up: not the default 600 s
    assert not (tmp_path / "run").exists()
