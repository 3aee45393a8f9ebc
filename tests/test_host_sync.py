"""Steps that do not log, evaluate or save never wait for the device.

On a GPU a read of a device value (`.item()`, `.tolist()`, `bool(t)`, ...) stalls the host
until the queue drains. On the CPU there is no queue, so the reads are counted instead:
every Tensor method that hands a value to the host is patched to record which step of
which function asked. Reads of the sampler's index tensors (host data by nature) are not
device reads and are left out.

The other way round, a tensor made on the device from host values (`torch.tensor(n, device=...)`,
`torch.as_tensor`, `new_tensor`, ...) is a blocking copy from the host: such calls by launcher or
recipe code inside a step are recorded too (the data loader's, on host data, are not).
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


MAKERS = ((torch, "tensor"), (torch, "as_tensor"), (torch, "scalar_tensor"), (torch.Tensor, "new_tensor"))
TORCH = torch.__file__.rsplit("/", 1)[0] + "/"


def tensors_from_host(monkeypatch, trainer):
    """Patch the tensor makers; returns the list of (trainer step, the function that made a tensor from
    host values, the launcher functions on the stack) for the calls by code outside torch."""
    seen = []
    for owner, name in MAKERS:
        original = getattr(owner, name)

        def patched(*args, _original=original, _method=owner is torch.Tensor, **kwargs):
            given = args[1:] if _method else args
            data = given[0] if given else kwargs.get("data", kwargs.get("s"))  # scalar_tensor's is `s`
            caller = sys._getframe(1)
            stack = traceback.extract_stack(caller, limit=30)
            if (not torch.is_tensor(data) and not caller.f_code.co_filename.startswith(TORCH)
                    and not any(part in frame.filename for frame in stack for part in HOST_DATA)):
                seen.append((trainer.step, caller.f_code.co_name, [f.name for f in stack if "/launcher/" in f.filename]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)
    return seen


def train(tmp_path, monkeypatch, record=host_reads, recipe=None, **train):
    config = digits_config(tmp_path / "run", train={"max_steps": 20, "log_every_steps": 10, **train.pop("train", {})},
                           **train)
    if recipe:
        config["recipe"] = recipe  # whole, not merged into the digits recipe's keys
    cfg = write_config(tmp_path / "c.yaml", config)
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    seen = record(monkeypatch, trainer)
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


@pytest.mark.parametrize("recipe", [
    {"name": "recipes.digits", "hidden": 32},
    {"name": "recipes.gpt", "n_layer": 1, "n_head": 1, "d_model": 8, "seq_len": 8, "max_chars": 6000},  # pairs
    {"name": "toy_recipes.tokens"},  # pairs whose count is a tensor
    {"name": "toy_recipes.lightning_full"},  # self.log
], ids=["digits", "gpt", "tokens", "lightning"])
def test_no_step_copies_host_values_to_the_device(tmp_path, monkeypatch, recipe):
    """torch.tensor(n, device=cuda) waits for the copy; a step makes its tensors from device values, or
    by torch.full (a kernel argument, no copy), or keeps host numbers on the host."""
    if recipe["name"] == "toy_recipes.lightning_full":  # it also logs a Python number every step
        from toy_recipes.lightning_full import DigitsModule

        def training_step(self, batch, batch_idx, _step=DigitsModule.training_step):
            self.log("batch_idx", float(batch_idx))
            return _step(self, batch, batch_idx)

        monkeypatch.setattr(DigitsModule, "training_step", training_step)
    trainer, made = train(tmp_path, monkeypatch, record=tensors_from_host, recipe=recipe)
    in_steps = [m for m in made if "train_step" in m[2]]
    assert in_steps == [], f"tensors made from host values inside train_step: {in_steps[:5]}"
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [10, 20]


def test_the_maker_counter_sees_a_tensor_made_from_a_number(tmp_path, monkeypatch):
    """The counter sees such tensors when there are some: a loss scaled by torch.tensor(1.0, device=...)."""
    from recipes import digits

    loss = digits.loss
    monkeypatch.setattr(digits, "loss", lambda model, batch: loss(model, batch) * torch.tensor(1.0, device="cpu"))
    trainer, made = train(tmp_path, monkeypatch, record=tensors_from_host)
    assert sorted({step for step, fn, ours in made if "train_step" in ours}) == list(range(20))


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
