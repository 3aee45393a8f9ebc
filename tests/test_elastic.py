"""Elastic jobs on the loopback: 2 or 3 "nodes" as separate `launcher run --nnodes MIN:MAX` processes
on one run dir. A node is lost by SIGKILL of its launcher and workers (as a dead machine would be) and
joins by starting later; the per-step losses must equal an uninterrupted 1-process run's, every step
logged once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, check, free_port, max_rel, metrics, run, worker_env, write_config
from launcher.spawn import children

pytestmark = pytest.mark.slow

MAX_STEPS, EVERY = 36, 5
# Fast membership on the loopback: a lost node is noticed after 2 x 3 s of missed heartbeats, and a
# round waits 4 s for more nodes once MIN are there (torchrun's defaults: 5 x 3 s and 30 s).
RDZV_CONF = "last_call_timeout=4,keep_alive_interval=2,keep_alive_max_attempt=3"


def elastic_config(path: Path, run_dir: Path, strategy: str = "auto", delay_s: float = 0.04, **dist) -> Path:
    """A pause of delay_s in every loss call (per micro-batch) keeps the run going while nodes come and go."""
    return write_config(path, {
        "strategy": strategy,
        "recipe": {"name": "toy_recipes.slow", "hidden": 32, "delay_s": delay_s},
        "run_dir": str(run_dir),
        "train": {"global_batch_size": 48, "micro_batch_size": 8, "max_steps": MAX_STEPS, "log_every_steps": 1,
                  "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3},
        "checkpoint": {"every_steps": EVERY},
        "dist": {"timeout_s": 60, **dist},
    })


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """The same config in one process, uninterrupted (no pause: it does not change the math)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = elastic_config(tmp / "c.yaml", tmp / "run")
    check(run(["run", cfg, "recipe.delay_s=0"]))
    return [r["loss"] for r in metrics(tmp / "run")[0]]


class Node:
    """One `launcher run --nproc 1 --nnodes MIN:MAX` process and its workers."""

    def __init__(self, cfg: Path, nodes: str, port: int, log: Path, host: bool):
        """host: this node serves the rendezvous. Said explicitly: every node on the loopback matches
        127.0.0.1, and left to itself the node that binds the port first would host it."""
        self.log = log
        self.out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "run", str(cfg), "--nproc", "1", "--nnodes", nodes,
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", f"{RDZV_CONF},is_host={int(host)}"],
            cwd=ROOT, env=worker_env(), stdout=self.out, stderr=subprocess.STDOUT, text=True)

    def kill(self) -> None:
        """A dead machine: its launcher and workers SIGKILLed together (torchrun starts the workers in
        sessions of their own)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()

    def text(self) -> str:
        return self.log.read_text()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.out.close()


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for node in started:
        node.cleanup()


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1] + [l for l in lines[-1:] if l.endswith("}")]
            if "split" not in line]


def wait_for(run_dir: Path, condition, what: str, node_list: list[Node], timeout: float = 120) -> dict:
    """The first training row of run_dir meeting condition, once it is written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in rows(run_dir) if condition(r)]
        if found:
            return found[0]
        if any(n.proc.poll() is not None for n in node_list):
            break
        time.sleep(0.2)
    logs = "\n\n".join(n.text()[-3000:] for n in node_list)
    raise AssertionError(f"no training row with {what} in {run_dir}\n{logs}")


def port() -> int:
    return free_port()


def check_run(run_dir: Path, reference: list[float]) -> list[dict]:
    """Every step logged exactly once, the losses of the uninterrupted run."""
    train = metrics(run_dir)[0]
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert max_rel(reference, [r["loss"] for r in train]) < 1e-5
    return train


@pytest.mark.parametrize("strategy", ["auto", "fsdp"])  # ddp at 2 processes and single at 1; fsdp at both
def test_a_lost_node_scales_the_job_down_and_it_finishes_with_the_same_losses(tmp_path, reference, nodes, strategy):
    run_dir = tmp_path / "run"
    cfg = elastic_config(tmp_path / "c.yaml", run_dir, strategy)
    endpoint = port()
    nodes.append(Node(cfg, "1:2", endpoint, tmp_path / "a.log", host=True))
    nodes.append(Node(cfg, "1:2", endpoint, tmp_path / "b.log", host=False))
    host, lost = nodes
    wait_for(run_dir, lambda r: r["world_size"] == 2 and r["step"] >= 8, "world size 2 past step 8", nodes)
    lost.kill()
    killed_at = max(r["step"] for r in rows(run_dir))
    lost_at = time.monotonic()
    first_small = wait_for(run_dir, lambda r: r["world_size"] == 1 and r["step"] > killed_at - EVERY,
                           "world size 1 after the loss", [host])
    resize_s = time.monotonic() - lost_at
    assert host.wait() == 0, host.text()[-4000:]
    train = check_run(run_dir, reference)
    sizes = [r["world_size"] for r in train]
    last_at_2 = max(i for i, size in enumerate(sizes) if size == 2)
    assert set(sizes[last_at_2 + 1:]) == {1}, sizes

    text = host.text()
    resized = [line for line in text.splitlines() if line.startswith("resized: world size 2 -> 1")]
    assert len(resized) == 1, text[-4000:]
    resumed = int(resized[0].split(" at step ")[1].split(",")[0])
    redone = int(resized[0].split(", ")[1].split(" ")[0])
    assert resumed % EVERY == 0 and redone <= EVERY and resumed + redone >= killed_at, (resized, killed_at)
    assert "Traceback" not in text, text[-4000:]
    print(f"scale-down ({strategy}): killed at step {killed_at}, resumed from step {resumed} ({redone} redone); the first "
          f"world-size-1 row {resize_s:.1f} s after the kill; loss maxrel "
          f"{max_rel(reference, [r['loss'] for r in train]):.2e}")


def test_a_node_that_joins_scales_the_job_up_without_redoing_a_step(tmp_path, reference, nodes):
    run_dir = tmp_path / "run"
    cfg = elastic_config(tmp_path / "c.yaml", run_dir, delay_s=0.15)  # ~30 s alone: time for the other to start
    endpoint = port()
    nodes.append(Node(cfg, "1:2", endpoint, tmp_path / "a.log", host=True))
    wait_for(run_dir, lambda r: r["step"] >= 3, "step 3", nodes)
    joined_at = time.monotonic()
    nodes.append(Node(cfg, "1:2", endpoint, tmp_path / "b.log", host=False))
    wait_for(run_dir, lambda r: r["world_size"] == 2, "world size 2", nodes)
    resize_s = time.monotonic() - joined_at
    assert [n.wait() for n in nodes] == [0, 0], nodes[0].text()[-4000:] + nodes[1].text()[-4000:]
    train = check_run(run_dir, reference)
    sizes = [r["world_size"] for r in train]
    switch = sizes.index(2)
    assert set(sizes[:switch]) == {1} and set(sizes[switch:]) == {2}, sizes

    text = nodes[0].text() + nodes[1].text()  # the new group's rank 0 may be on either node
    resized = [line for line in text.splitlines() if line.startswith("resized: world size 1 -> 2")]
    assert len(resized) == 1 and resized[0].endswith(f"at step {switch}, 0 logged step(s) redone"), text[-4000:]
    assert "Traceback" not in text
    print(f"scale-up: joined at step {switch}; the first world-size-2 row {resize_s:.1f} s after the new node "
          f"started (its own start-up included); loss maxrel {max_rel(reference, [r['loss'] for r in train]):.2e}")


def test_below_min_nodes_the_job_ends_with_one_message_and_a_rerun_resumes(tmp_path, reference, nodes):
    run_dir = tmp_path / "run"
    cfg = elastic_config(tmp_path / "c.yaml", run_dir, timeout_s=20)
    endpoint = port()
    nodes.append(Node(cfg, "2:3", endpoint, tmp_path / "a.log", host=True))
    nodes.append(Node(cfg, "2:3", endpoint, tmp_path / "b.log", host=False))
    host, lost = nodes
    wait_for(run_dir, lambda r: r["step"] >= 7, "step 7", nodes)
    lost.kill()
    lost_at = time.monotonic()
    assert host.wait() == 1
    ended_s = time.monotonic() - lost_at
    text = host.text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "lost contact" in errors[0], text[-4000:]  # the worker's line, then the node's
    assert ("this elastic job needs at least 2 of at most 3 node(s) (--nnodes 2:3), and fewer than 2 node(s) met at "
            f"127.0.0.1:{endpoint} within 20 s" in errors[1]), errors
    assert "it last trained on 2 node(s) (world size 2)" in errors[1] and "Nothing is lost" in errors[1]
    assert "Traceback" not in text, text[-4000:]
    assert ended_s < 20 + 6 + 20, ended_s  # the rendezvous timeout after the loss is noticed, with a margin

    # The nodes back: the same command resumes from the newest checkpoint and finishes.
    endpoint = port()
    again = [Node(cfg, "2:3", endpoint, tmp_path / f"again{i}.log", host=i == 0) for i in range(2)]
    nodes += again
    assert [n.wait() for n in again] == [0, 0], again[0].text()[-4000:]
    assert "resumed from" in again[0].text()
    check_run(run_dir, reference)
    print(f"below MIN: the job ended {ended_s:.1f} s after the loss (dist.timeout_s=20)")


def test_a_lost_rendezvous_host_is_one_line_on_the_other_node(tmp_path, nodes):
    """The node hosting the rendezvous store dies: the other node's agent finds its store connection closed.
    torch's C++ TCPStore client logs a warning with ~15 lines of stack frames for each call that fails; the
    node prints the launcher's one line instead, and exits 1."""
    run_dir = tmp_path / "run"
    cfg = elastic_config(tmp_path / "c.yaml", run_dir)
    endpoint = port()
    nodes.append(Node(cfg, "1:2", endpoint, tmp_path / "a.log", host=True))
    nodes.append(Node(cfg, "1:2", endpoint, tmp_path / "b.log", host=False))
    host, other = nodes
    wait_for(run_dir, lambda r: r["world_size"] == 2 and r["step"] >= EVERY + 1, "world size 2 past a save", nodes)
    host.kill()
    assert other.wait() == 1
    text = other.text()
    lost = [line for line in text.splitlines() if line.startswith("error: lost the rendezvous host")]
    assert len(lost) == 1 and lost[0].startswith(f"error: lost the rendezvous host 127.0.0.1:{endpoint}: "), text[-4000:]
    assert "It last trained on 2 node(s) (world size 2)" in lost[0] and "resumes from" in lost[0], lost
    assert text.rstrip().endswith(lost[0]), text[-4000:]  # the last word
    for noise in ("frame #", "Exception raised from", "TCPStore.cpp", "Traceback"):
        assert noise not in text, text[-4000:]


def test_every_world_size_is_checked_before_any_worker(tmp_path):
    cfg = elastic_config(tmp_path / "c.yaml", tmp_path / "run")
    proc = run(["run", cfg, "--nproc", 1, "--nnodes", "2:5", "--rdzv-endpoint", "127.0.0.1:29999"])
    assert proc.returncode == 2
    assert ("train.global_batch_size=48 cannot be split evenly at world size 5, which this elastic job (2 to 5 nodes "
            "x 1 worker(s)) may take" in proc.stderr), proc.stderr
    assert "a multiple of 60 that fits every size, such as 60" in proc.stderr and not (tmp_path / "run").exists()
    proc = run(["run", cfg, "--nproc", 1, "--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:29999",
                "strategy=deepspeed"])
    assert proc.returncode == 2 and "strategy=deepspeed cannot run elastic" in proc.stderr, proc.stderr
