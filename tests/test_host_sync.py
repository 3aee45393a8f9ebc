"""Steps that do not log, evaluate or save never wait for the device.

On a GPU a read of a device value (`.item()`, `.tolist()`, `bool(t)`, ...) stalls the host
until the queue drains. On the CPU there is no queue, so the reads are counted instead:
every Tensor method that hands a value to the host is patched to record which step of
which function asked. Reads of the sampler's index tensors (host data by nature) are not
device reads and are left out.
"""
import sys
import traceback

import pytest
import torch

from helpers import digits_config, metrics, write_config
from launcher.config import load_config
from launcher.env import DistEnv
from launcher.trainer import Trainer

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
HOST_DATA = ("launcher/data.py", "torch/utils/data/")


def host_reads(monkeypatch, trainer):
    """Patch the reads; returns the list of (trainer step, the launcher function that asked)."""
    seen = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _original=original, **kwargs):
            stack = traceback.extract_stack(sys._getframe(1), limit=30)
            if not any(part in frame.filename for frame in stack for part in HOST_DATA):
                ours = [f.name for f in stack if "/launcher/" in f.filename]
                seen.append((trainer.step, ours[-1] if ours else stack[-1].name, ours))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    return seen


def train(tmp_path, monkeypatch, **train):
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", train={"max_steps": 20, "log_every_steps": 10, **train.pop("train", {})}, **train))
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    seen = host_reads(monkeypatch, trainer)
    trainer.train_loop()
    monkeypatch.undo()
    return trainer, seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_only_logged_steps_read_device_values(tmp_path, monkeypatch, precision):
    trainer, seen = train(tmp_path, monkeypatch, precision=precision)
    assert trainer.strategy.skips_on_device  # optim.impl=auto: a fused AdamW, which skips a bad step on the device
    in_steps = [s for s in seen if "train_step" in s[2]]
    assert in_steps == [], f"device reads inside train_step: {in_steps[:5]}"
    # The rows do read (the loss, the norm): at steps 10 and 20 only.
    assert {step for step, *_ in seen} == {10, 20}
    assert {fn for _, fn, _ in seen} <= {"row", "read"}  # rows.RowMaker.row, step.NonFiniteGuard.read
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [10, 20]


def test_an_optimizer_that_cannot_skip_on_the_device_reads_once_a_step(tmp_path, monkeypatch):
    """The counter sees reads when there are some: with a for-loop AdamW the strategy's step reads the
    non-finite flag on the host before the update (and torch's for-loop step reads its step counters too)."""
    trainer, seen = train(tmp_path, monkeypatch, optim={"name": "adamw", "lr": 1e-3, "impl": "for_loop"})
    assert not trainer.strategy.skips_on_device
    in_steps = [s for s in seen if "train_step" in s[2]]
    assert sorted({step for step, *_ in in_steps}) == list(range(20))
    assert sorted({step for step, fn, ours in in_steps if fn == "step" and ours[-2] == "optimizer_step"}) == list(range(20))


def test_a_nonfinite_step_skipped_on_the_device_leaves_weights_and_state_alone(tmp_path, monkeypatch):
    """toy_recipes.spike turns micro-step 3's loss into NaN: under on_nonfinite=skip the fused step
    leaves every weight and optimizer state as it was, and the row counts the skipped step."""
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", recipe={"name": "toy_recipes.spike", "hidden": 32, "nan_at": 3},
        train={"max_steps": 4, "log_every_steps": 4, "on_nonfinite": "skip"}))
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    states = []
    trainer.run.hook = lambda name, *args: states.append(snapshot(trainer)) if name == "on_before_zero_grad" else None
    trainer.train_loop()
    states.append(snapshot(trainer))
    # Steps 1..4 each snapshot before their update (the hook), and once at the end.
    before_3, before_4 = states[2], states[3]
    assert all(torch.equal(a, b) for a, b in zip(before_3, before_4))
    assert not all(torch.equal(a, b) for a, b in zip(states[1], states[2]))  # step 2 did move them
    assert all(torch.isfinite(t).all() for t in states[-1])
    assert metrics(tmp_path / "run")[0][-1]["skipped_steps"] == 1


def snapshot(trainer) -> list[torch.Tensor]:
    opt = trainer.strategy.optimizer
    tensors = [p.detach().clone() for p in trainer.strategy.model.parameters()]
    return tensors + [v.detach().clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
