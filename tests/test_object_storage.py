"""Checkpoints in object storage (checkpoint.dir=s3://...), against a real S3 server on the loopback:
moto's server mode, started and stopped here. Its API is S3's, over HTTP, so s3fs, botocore and
torch.distributed.checkpoint's fsspec writer run exactly as against AWS.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import check, digits_config, free_port, run, worker_env, write_config
from test_checkpoint import by_step, children

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-never-written-anywhere"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port; yields the environment that reaches it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "moto's server did not start"
            time.sleep(0.1)
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def bucket(env, name):
    """An s3fs client for a new bucket `name`."""
    import s3fs

    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=env["AWS_ENDPOINT_URL"], use_listings_cache=False)
    fs.mkdir(name)
    return fs


def config(tmp_path, name, ckpt_dir=None, **recipe):
    """The fault tests' run: digits on 2 ranks, 20 steps, a checkpoint every 5, the last 2 kept."""
    cfg = digits_config(tmp_path / name, recipe={"name": "toy_recipes.faulty", "hidden": 32, **recipe},
                        train={"global_batch_size": 64, "micro_batch_size": 32, "max_steps": 20},
                        checkpoint={"every_steps": 5, "keep_last": 2, **({"dir": ckpt_dir} if ckpt_dir else {})})
    return write_config(tmp_path / f"{name}-{len(recipe)}.yaml", cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, its checkpoints on the local disk: losses per step and exported weights."""
    tmp = tmp_path_factory.mktemp("reference")
    check(run(["run", config(tmp, "full"), "--nproc", 2]))
    check(run(["export", tmp / "full", tmp / "w.safetensors"]))
    return by_step(tmp / "full"), load_file(tmp / "w.safetensors")


def kill_when(proc, ready, timeout=120):
    """SIGKILL the launcher and its workers as soon as ready() holds."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the moment to kill it:\n{err[-6000:]}")
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.05)
    for pid in [proc.pid, *children(proc.pid)]:  # torchrun's workers have process groups of their own
        os.kill(pid, signal.SIGKILL)
    proc.communicate()


def start(args, env):
    return subprocess.Popen([sys.executable, "-m", "launcher", *map(str, args)], env=worker_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_kill_mid_upload_is_survived_and_export_reads_the_bucket(tmp_path, s3, reference, monkeypatch):
    """Saves in the background (checkpoint.async), step 10's slowed down; the launcher and its workers
    are SIGKILLed once a shard of it is in the bucket: that checkpoint has no meta.json, so the rerun
    resumes from step 5 and ends with the uninterrupted run's losses. `launcher export` then reads the
    bucket into the uninterrupted run's weights, and a damaged checkpoint in the bucket is set aside."""
    fs = bucket(s3, "sync")
    url = "s3://sync/digits/checkpoints"
    proc = start(["run", config(tmp_path, "run", url, slow_save_at=2, slow_save_s=0.5), "--nproc", 2,
                  "checkpoint.async=true"], s3)
    kill_when(proc, lambda: bool(fs.glob("sync/digits/checkpoints/step_000010/*.distcp")))
    assert fs.cat("sync/digits/checkpoints/latest").decode() == "step_000005"
    assert not fs.exists("sync/digits/checkpoints/step_000010/meta.json")  # killed before it was published

    proc = check(run(["run", config(tmp_path, "run", url), "--nproc", 2, "checkpoint.async=true",
                      "checkpoint.resume_changed=allow"], env=s3))
    assert f"resumed from {url}/step_000005 at step 5" in proc.stderr
    losses, weights = reference
    assert by_step(tmp_path / "run") == pytest.approx(losses, rel=1e-6)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing on the local disk
    # The bucket's layout: the last two checkpoints, complete; the others (and what the kill left of
    # step 10) pruned.
    assert sorted(os.path.basename(f) for f in fs.ls("sync/digits/checkpoints")) == [
        "latest", "step_000015", "step_000020"]
    for step in (15, 20):
        names = sorted(os.path.basename(f) for f in fs.ls(f"sync/digits/checkpoints/step_{step:06d}"))
        assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rng_0.pt", "rng_1.pt"], names
    assert fs.cat("sync/digits/checkpoints/latest").decode() == "step_000020"

    check(run(["export", tmp_path / "run", tmp_path / "w.safetensors"], env=s3))
    exported = load_file(tmp_path / "w.safetensors")
    assert exported.keys() == weights.keys()
    for name in weights:
        assert torch.equal(exported[name], weights[name]), name
    # The credentials came from the environment and went nowhere.
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert all(SECRET not in p.read_text(errors="replace") for p in written)
    assert SECRET not in proc.stderr + proc.stdout

    # A shard lost from the newest checkpoint: resuming (here at another world size) sets it aside
    # (copied, never deleted) and takes the one before.
    fs.rm("sync/digits/checkpoints/step_000020/__1_0.distcp")
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    fs.clear_instance_cache()  # a client made in this process before (another test's) kept its own settings
    from launcher.checkpoint import resume_from
    from launcher.config import load_config

    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert str(resume_from(cfg.checkpoint, tmp_path / "run", 1, may_move=True)) == f"{url}/step_000015"
    assert fs.cat("sync/digits/checkpoints/latest").decode() == "step_000015"
    assert not fs.exists("sync/digits/checkpoints/step_000020")
    assert fs.exists("sync/digits/checkpoints/step_000020.damaged/meta.json")
    assert fs.exists("sync/digits/checkpoints/step_000020.damaged/__0_0.distcp")
