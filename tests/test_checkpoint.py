"""Checkpoints, exact resume, export and faults for the single and ddp strategies.

The sharded strategies (fsdp, deepspeed) have the same checks in test_sharded_checkpoint.py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, check, digits_config, metrics, run, worker_env, write_config
from launcher.checkpoint import latest_checkpoint
from launcher.export import export
from launcher.spawn import children

pytestmark = pytest.mark.slow  # multi-process: the full suite, not the fast tier

# 1437 training samples / 64 = 22 steps an epoch: step 11 is mid-epoch, and 30 steps cross an epoch.
STEPS = 30


def settings(tmp_path, name, **sections) -> dict:
    base = digits_config(tmp_path / name, train={"global_batch_size": 64, "micro_batch_size": 32, "max_steps": STEPS},
                         checkpoint={"every_steps": 11, "keep_last": 5})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def config(tmp_path, name, **sections) -> Path:
    return write_config(tmp_path / f"{name}.yaml", settings(tmp_path, name, **sections))


def weights(run_dir: Path, tmp_path: Path, step=None) -> dict:
    out = tmp_path / f"{run_dir.name}-{step}.safetensors"
    export(run_dir, out, step)
    return load_file(str(out))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def by_step(run_dir):
    """Loss per step; a resumed run's log keeps one row per step."""
    rows = metrics(run_dir)[0]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: r["loss"] for r in rows}


def start_from_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """A run dir as a run stopped right after saving at `step` would leave it."""
    (dst_run / "checkpoints").mkdir(parents=True)
    name = f"step_{step:06d}"
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)
    (dst_run / "checkpoints" / "latest").write_text(name)
    rows = [line for line in (src_run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst_run / "metrics.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_mid_epoch_is_exact(tmp_path, references, nproc):
    extra = ["--nproc", 2] if nproc == 2 else []
    full = references.get(settings(tmp_path, "full"), extra)
    start_from_checkpoint(full, 11, tmp_path / "resumed")
    proc = check(run(["run", config(tmp_path, "resumed")] + extra))
    assert "resumed from" in proc.stderr and "step 11" in proc.stderr
    assert by_step(tmp_path / "resumed") == by_step(full)  # every step, bit for bit
    assert_same_weights(weights(tmp_path / "resumed", tmp_path), weights(full, tmp_path))


def test_layout_latest_and_keep_last(tmp_path):
    check(run(["run", config(tmp_path, "run", checkpoint={"keep_last": 2})]))
    ckpts = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "step_000022", "step_000030"]  # 11 pruned by keep_last=2; the end saved
    assert (ckpts / "latest").read_text() == "step_000030"
    meta = json.loads((ckpts / "step_000030" / "meta.json").read_text())
    assert meta["step"] == 30 and meta["strategy"] == "single" and "scheduler" in meta
    assert (ckpts / "step_000030" / "rng_0.pt").is_file() and (ckpts / "step_000030" / ".metadata").is_file()


def test_incomplete_or_missing_latest_falls_back_to_newest_complete(tmp_path):
    check(run(["run", config(tmp_path, "run", train={"max_steps": 22})]))
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(ckpts / "step_000022", ckpts / "step_000025.tmp")  # a save cut off: never used
    (ckpts / "step_000025.tmp" / "meta.json").unlink()
    (ckpts / "latest").write_text("step_000099")  # names a checkpoint that is not there
    warnings = []
    assert latest_checkpoint(ckpts, warnings.append) == ckpts / "step_000022"
    assert "step_000099" in warnings[0] and "step_000022" in warnings[0]
    shutil.rmtree(ckpts / "step_000022")
    (ckpts / "step_000011" / "meta.json").unlink()  # a directory without meta.json is incomplete too
    assert latest_checkpoint(ckpts, warnings.append) is None


def test_resume_never_and_explicit_path(tmp_path):
    check(run(["run", config(tmp_path, "a", train={"max_steps": 12})]))
    # never: starts fresh although a checkpoint exists; the earlier metrics are kept aside.
    proc = check(run(["run", config(tmp_path, "a", train={"max_steps": 12}, checkpoint={"resume": "never"})]))
    assert "resumed" not in proc.stderr
    assert len(list((tmp_path / "a").glob("metrics.*.jsonl"))) == 1
    # ... and so are its checkpoints: the new run's `latest` and pruning never mix the two runs.
    aside = list((tmp_path / "a").glob("checkpoints.*"))
    assert len(aside) == 1 and (aside[0] / "step_000012" / "meta.json").is_file()
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step_000012"
    bad = run(["run", config(tmp_path, "b", checkpoint={"resume": str(tmp_path / "nowhere")})])
    assert bad.returncode == 2 and "checkpoint.resume" in bad.stderr


def test_async_save_resumes_exactly(tmp_path, references):
    sync = references.get(settings(tmp_path, "full"))
    check(run(["run", config(tmp_path, "async", checkpoint={"async": True})]))
    assert (tmp_path / "async" / "checkpoints" / "latest").read_text() == "step_000030"
    start_from_checkpoint(tmp_path / "async", 22, tmp_path / "resumed")
    check(run(["run", config(tmp_path, "resumed", checkpoint={"async": True})]))
    assert by_step(tmp_path / "resumed") == by_step(sync)
    assert_same_weights(weights(tmp_path / "resumed", tmp_path), weights(sync, tmp_path))


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(tmp_path, references, saved_on, resumed_on):
    """The data order continues exactly (step k is the same samples at any world size),
    so the losses match the uninterrupted run up to float reduction order."""
    nproc = lambda n: ["--nproc", 2] if n == 2 else []  # noqa: E731
    full_dir = references.get(settings(tmp_path, "full"), nproc(saved_on))
    start_from_checkpoint(full_dir, 11, tmp_path / "resumed")
    check(run(["run", config(tmp_path, "resumed")] + nproc(resumed_on)))
    full, resumed = by_step(full_dir), by_step(tmp_path / "resumed")
    assert resumed.keys() == full.keys()
    assert [resumed[s] for s in full] == pytest.approx([full[s] for s in full], rel=1e-5)
    a, b = weights(tmp_path / "resumed", tmp_path), weights(full_dir, tmp_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_export_loads_strictly_and_picks_steps(tmp_path, references):
    trained = references.get(settings(tmp_path, "full"))
    out = tmp_path / "w.safetensors"
    check(run(["export", trained, out, "--step", 22]))
    from recipes import digits

    model = digits.model(digits.Config(hidden=32))
    model.load_state_dict(load_file(str(out)), strict=True)
    assert not torch.equal(load_file(str(out))["0.weight"], weights(trained, tmp_path)["0.weight"])
    missing = run(["export", trained, out, "--step", 5])
    assert missing.returncode == 2 and "steps saved: 11, 22, 30" in missing.stderr


def test_export_of_a_lightning_shaped_model(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe={"name": "toy_recipes.lightning_style"}))
    check(run(["run", cfg]))
    out = tmp_path / "w.safetensors"
    check(run(["export", tmp_path / "run", out]))
    from toy_recipes import lightning_style

    lightning_style.model(lightning_style.Config()).load_state_dict(load_file(str(out)), strict=True)


# ---------------------------------------------------------------- faults


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l).get("step", 0) >= step for l in path.read_text().splitlines() if l):
            return
        time.sleep(0.1)
    raise TimeoutError(f"no step {step} in {run_dir} after {timeout} s")


def start(args, **popen):
    return subprocess.Popen([sys.executable, "-m", "launcher", *map(str, args)], cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


SLOW = {"name": "toy_recipes.slow", "hidden": 32, "delay_s": 0.03}


@pytest.mark.parametrize("sig, nproc, target, log_every", [
    (signal.SIGTERM, 1, "process", 1), (signal.SIGUSR1, 2, "workers", 1), (signal.SIGUSR1, 2, "launcher", 1),
    (signal.SIGUSR1, 2, "workers", 4)])
def test_stop_signal_checkpoints_at_the_next_step_and_exits_3(tmp_path, references, sig, nproc, target, log_every):
    """The signal to the workers (as SLURM sends it to every task) or to the launcher that
    started them with --nproc (which passes it on). One process stops at the next step; several
    agree at the next row (the flag travels with the row's all-reduce: no sync on other steps)."""
    extra = ["--nproc", 2] if nproc == 2 else []
    train = {"log_every_steps": log_every}
    full = references.get(settings(tmp_path, "full", recipe=SLOW, train=train), extra)
    proc = start(["run", config(tmp_path, "stopped", recipe=SLOW, train=train), *extra])
    wait_for_step(tmp_path / "stopped", 5, proc)
    targets = children(proc.pid) if target == "workers" else [proc.pid]
    assert len(targets) == (2 if target == "workers" else 1)
    for pid in targets:
        os.kill(pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    stopped_at = int((tmp_path / "stopped" / "checkpoints" / "latest").read_text().split("_")[1])
    assert 5 <= stopped_at < STEPS and stopped_at % log_every == 0
    assert max(by_step(tmp_path / "stopped")) <= stopped_at + 1
    # Running the same command again resumes and ends exactly where the uninterrupted run did.
    check(run(["run", config(tmp_path, "stopped", recipe=SLOW, train=train)] + extra))
    assert by_step(tmp_path / "stopped") == by_step(full)
    assert_same_weights(weights(tmp_path / "stopped", tmp_path), weights(full, tmp_path))


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_saves_at_the_next_step_and_a_rerun_continues_exactly(tmp_path, references, nproc):
    """Ctrl-C is SIGINT to the terminal's foreground process group: here the whole group of the
    command. It stops the run at the next step it can, after saving, with exit 3 and a message that
    names what the disk holds; the same command then logs every step once and ends as an
    uninterrupted run does."""
    extra = ["--nproc", 2] if nproc == 2 else []
    full = references.get(settings(tmp_path, "full", recipe=SLOW), extra)
    proc = start(["run", config(tmp_path, "stopped", recipe=SLOW), *extra], start_new_session=True)
    wait_for_step(tmp_path / "stopped", 5, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    latest = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    step = int(latest.name.split("_")[1])
    assert 5 <= step < STEPS and max(by_step(tmp_path / "stopped")) <= step + 1
    assert err.count(f"stopped by SIGINT: the same command resumes from {latest} (step {step})") == 1, err
    assert "Traceback" not in err
    check(run(["run", config(tmp_path, "stopped", recipe=SLOW)] + extra))
    assert by_step(tmp_path / "stopped") == by_step(full)
    assert_same_weights(weights(tmp_path / "stopped", tmp_path), weights(full, tmp_path))


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_ctrl_c_stops_at_once_and_says_where_a_rerun_resumes(tmp_path, references, nproc):
    """The second SIGINT comes while the step the first one is waiting for still runs (each micro-step
    sleeps 0.3 s): exit 130 at once, naming the checkpoint the disk holds, and a rerun logs every step
    once and ends as an uninterrupted run does."""
    extra = ["--nproc", 2] if nproc == 2 else []
    slow = {**SLOW, "delay_s": 0.3}
    sections = dict(recipe=slow, train={"max_steps": 8}, checkpoint={"every_steps": 3})
    full = references.get(settings(tmp_path, "full", **sections), extra)
    proc = start(["run", config(tmp_path, "stopped", **sections), *extra], start_new_session=True)
    wait_for_step(tmp_path / "stopped", 4, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    latest = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert latest.name == "step_000003", err  # the step after the first SIGINT was cut short: not saved
    assert err.count(f"stopped at once by a second SIGINT: the same command resumes from {latest} (step 3)") == 1
    assert "Traceback" not in err
    check(run(["run", config(tmp_path, "stopped", **sections)] + extra))
    assert by_step(tmp_path / "stopped") == by_step(full)
    assert_same_weights(weights(tmp_path / "stopped", tmp_path), weights(full, tmp_path))


def test_sigkill_of_a_worker_restarts_and_finishes_the_same(tmp_path):
    recipe = {**SLOW, "delay_s": 0.05}
    check(run(["run", config(tmp_path, "full", recipe=recipe, checkpoint={"every_steps": 5})] + ["--nproc", 2]))
    proc = start(["run", config(tmp_path, "killed", recipe=recipe, checkpoint={"every_steps": 5}),
                  "--nproc", 2, "--max-restarts", 1])
    wait_for_step(tmp_path / "killed", 12, proc)
    victim = children(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # One line from the rank that lost its peer and one from the restarted group, not tracebacks.
    assert err.count("lost contact with another rank") <= 1 and "Traceback" not in err, err
    assert err.count("restart 1: the worker group restarted after a failure and resumed from") == 1, err
    assert by_step(tmp_path / "killed") == by_step(tmp_path / "full")
    assert_same_weights(weights(tmp_path / "killed", tmp_path), weights(tmp_path / "full", tmp_path))


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    recipe = {"name": "toy_recipes.spike", "hidden": 32, "nan_at": 14}
    proc = run(["run", config(tmp_path, "run", recipe=recipe, checkpoint={"every_steps": 5})])
    assert proc.returncode == 1
    # micro-step 14 is the second half of step 7 (2 micro-batches a step)
    assert "non-finite gradient" in proc.stderr and "at step 7" in proc.stderr and "Traceback" not in proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000005"
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [1, 2, 3, 4, 5, 6]
    assert f"The newest checkpoint, {ckpts / 'step_000005'} (step 5), is kept" in proc.stderr  # read from the disk


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_loss_that_is_nan_from_step_1_says_so_and_claims_no_checkpoint(tmp_path, nproc):
    recipe = {"name": "toy_recipes.spike", "hidden": 32, "nan_at": 1}
    proc = run(["run", config(tmp_path, "run", recipe=recipe)] + (["--nproc", 2] if nproc == 2 else []))
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert err.count("error:") == 1 and "at step 1, before any update: the loss is not finite" in err, err
    assert "No checkpoint was saved before it" in err and "is kept" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nonfinite_loss_can_be_skipped(tmp_path):
    recipe = {"name": "toy_recipes.spike", "hidden": 32, "nan_at": 14}
    check(run(["run", config(tmp_path, "run", recipe=recipe, train={"on_nonfinite": "skip"})]))
    rows = metrics(tmp_path / "run")[0]
    assert len(rows) == STEPS and rows[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["step"] != 7)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_unwritable_run_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run(["run", config(tmp_path, "c", run_dir=str(blocker / "run"))])
    assert proc.returncode == 2
    assert "run_dir" in proc.stderr and "cannot be written" in proc.stderr and "Traceback" not in proc.stderr
