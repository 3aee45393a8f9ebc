"""Async saves: the staging buffers are allocated once and refilled, and a save holds exactly the
state of its own step even while training goes on before its copy is complete.

On the CPU, DCP stages before async_save returns; with CUDA the copy runs in the background. The
background path is exercised here on the CPU by asking DCP's stager for background staging, with
every storage copy slowed down so that the copy is still running when the next step starts.
"""
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.staging import StagingOptions

import launcher.strategies.base as base
from helpers import check, digits_config, run, write_config
from launcher.checkpoint import Checkpointer
from launcher.config import load_config
from launcher.env import DistEnv
from launcher.precision import Precision
from launcher.strategies.single import SingleStrategy
from launcher.trainer import Trainer
from test_checkpoint import assert_same_weights, by_step, start_from_checkpoint, weights
from test_sharded_checkpoint import gpt_config

BACKGROUND = StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
                            use_non_blocking_copy=False)


def staged_storages(monkeypatch, delay: float = 0.0) -> list[int]:
    """Record the host storage each staged tensor storage lands in (its address); optionally slow
    every copy down."""
    seen = []
    original = StateDictStager._stage_untyped_storage

    def staged(self, storage, non_blocking=False):
        if delay:
            time.sleep(delay)
        out = original(self, storage, non_blocking=non_blocking)
        seen.append(out.data_ptr())
        return out

    monkeypatch.setattr(StateDictStager, "_stage_untyped_storage", staged)
    return seen


def saved(path: Path, tmp_path: Path) -> dict:
    """A DCP checkpoint's model and optimizer state, read back as plain tensors."""
    out = tmp_path / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def assert_same(a, b, where="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train(tmp_path: Path, name: str, **checkpoint) -> Trainer:
    cfg = write_config(tmp_path / f"{name}.yaml", digits_config(
        tmp_path / name, train={"max_steps": 6, "log_every_steps": 3},
        checkpoint={"every_steps": 2, "keep_last": 5, "resume": "never", **checkpoint}))
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    trainer.fit()
    trainer.strategy.close()
    return trainer


def test_staging_buffers_are_allocated_once(tmp_path, monkeypatch):
    seen = staged_storages(monkeypatch)
    train(tmp_path, "run", **{"async": True})
    saves = 3  # steps 2, 4 and 6 (the end: already saved)
    per_save = len(seen) // saves
    assert per_save and len(seen) == saves * per_save
    first = seen[:per_save]
    assert len(set(first)) == per_save  # a buffer per storage of the state
    assert seen[per_save:2 * per_save] == first and seen[2 * per_save:] == first  # the same ones, refilled


def test_background_staging_saves_its_own_steps_state(tmp_path, monkeypatch):
    """The step after a save waits for the copy before its update: every checkpoint equals the
    sync run's of the same step, bit for bit, model and optimizer state."""
    train(tmp_path, "sync")
    monkeypatch.setattr(base, "staging_options", lambda device: BACKGROUND)
    staged_storages(monkeypatch, delay=0.02)  # the copy outlasts the next forward and backward
    in_flight = []
    wait_staged = Checkpointer.wait_staged

    def waited(self):
        if self.staging is not None:
            in_flight.append(not self.staging.done())
        wait_staged(self)

    monkeypatch.setattr(Checkpointer, "wait_staged", waited)
    train(tmp_path, "async", **{"async": True})
    assert len(in_flight) == 2 and all(in_flight)  # steps 3 and 5 started while the copy ran
    for step in (2, 4, 6):
        name = f"checkpoints/step_{step:06d}"
        assert_same(saved(tmp_path / "async" / name, tmp_path), saved(tmp_path / "sync" / name, tmp_path), name)


class Normed(nn.Module):
    def __init__(self, buffers: bool):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4) if buffers else nn.Identity()

    def forward(self, x):
        return self.norm(self.linear(x))


@pytest.mark.parametrize("buffers, overlap, in_flight", [(True, True, False), (False, False, False),
                                                         (False, True, True)])
def test_what_may_change_before_the_step_is_copied_before_save_returns(tmp_path, monkeypatch, buffers, overlap,
                                                                        in_flight):
    """Buffers change in a forward (BatchNorm's running statistics), and a LightningModule's hooks
    (overlap=False) may change anything: their saves finish the copy before save() returns."""
    monkeypatch.setattr(base, "staging_options", lambda device: BACKGROUND)
    staged_storages(monkeypatch, delay=0.1)
    cfg = load_config(write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run",
                                                                    checkpoint={"async": True})))
    device = torch.device("cpu")
    strategy = SingleStrategy(cfg, DistEnv("single"), device, Precision("fp32", device))
    torch.manual_seed(0)
    strategy.setup(Normed(buffers), lambda m: (torch.optim.AdamW(m.parameters(), lr=0.1), None))
    strategy.model(torch.randn(8, 4)).sum().backward()
    strategy.step()
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    ckpt = Checkpointer(tmp_path / "run", cfg.checkpoint, 0)
    ckpt.save(1, strategy, {"step": 1}, overlap=overlap)
    assert (ckpt.staging is not None and not ckpt.staging.done()) == in_flight
    strategy.model(torch.randn(8, 4)).sum().backward()  # the next step: forward and backward go on
    ckpt.wait_staged()
    strategy.step()
    ckpt.wait()
    strategy.close()
    model = saved(tmp_path / "run" / "checkpoints" / "step_000001", tmp_path)["model"]
    assert_same(model, before, "model")
    assert not torch.equal(strategy.model.linear.weight, before["linear.weight"])  # training did go on
    if buffers:
        assert not torch.equal(strategy.model.norm.running_mean, before["norm.running_mean"])


@pytest.mark.slow  # multi-process
def test_fsdp_async_save_resumes_exactly(tmp_path):
    sections = {"strategy": "fsdp", "checkpoint": {"every_steps": 7, "keep_last": 5, "async": True}}
    check(run(["run", gpt_config(tmp_path, "sync", strategy="fsdp"), "--nproc", 2]))
    check(run(["run", gpt_config(tmp_path, "async", **sections), "--nproc", 2]))
    start_from_checkpoint(tmp_path / "async", 7, tmp_path / "resumed")
    check(run(["run", gpt_config(tmp_path, "resumed", **sections), "--nproc", 2]))
    assert by_step(tmp_path / "resumed") == by_step(tmp_path / "sync")
    assert_same_weights(weights(tmp_path / "resumed", tmp_path), weights(tmp_path / "sync", tmp_path))
