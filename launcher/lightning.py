"""Run a LightningModule the way Lightning's Trainer runs it (docs/design.md, Lightning).

A module with `training_step` and `configure_optimizers` trains without a `loss`:

- `LightningAdapter.forward(batch, batch_idx, stage)` calls `training_step` or
  `validation_step`, so both run through the wrapped model (DDP, FSDP2's hooks that
  gather the sharded weights, DeepSpeed's engine);
- `optimization()` reads every documented return form of `configure_optimizers`;
- `LightningRun` gives the module what it reads while it runs (`self.trainer`,
  `self.global_step`, `self.current_epoch`, `self.device`), collects what it logs with
  `self.log` / `self.log_dict`, and calls its hooks where Lightning calls them;
- `check_module()` refuses, before training, what launcher does not do.

Nothing here imports Lightning: a module of Lightning's shape that does not subclass
LightningModule trains the same way, without `self.log`.
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from .config import ScheduleConfig
from .errors import ConfigError
from .optim import Schedule

TRAINER_ATTRIBUTES = ("global_step", "current_epoch", "max_epochs", "max_steps", "world_size", "global_rank",
                      "is_global_zero", "estimated_stepping_batches", "num_training_batches", "local_rank",
                      "num_nodes", "num_devices")
# Hooks that change how optimization or data movement happens: overriding one is refused.
UNSUPPORTED_HOOKS = ("optimizer_step", "optimizer_zero_grad", "lr_scheduler_step", "configure_gradient_clipping",
                     "backward", "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
                     "configure_callbacks", "training_step_end", "validation_step_end")


class LightningAdapter(nn.Module):
    """forward() is the module's training_step (or validation_step): calling through the
    wrapper keeps the hooks DDP, FSDP and DeepSpeed attach to forward working."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, batch, batch_idx: int = 0, stage: str = "train"):
        if stage == "validation":
            return self.module.validation_step(batch, batch_idx)
        return self.module.training_step(batch, batch_idx)


def is_lightning_shaped(model: nn.Module) -> bool:
    return callable(getattr(model, "training_step", None)) and callable(getattr(model, "configure_optimizers", None))


def lightning_base():
    """LightningModule, from whichever of lightning / pytorch_lightning is installed, or None."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return __import__(name, fromlist=["LightningModule"]).LightningModule
        except ImportError:
            continue
    return None


def is_lightning_module(module: nn.Module) -> bool:
    return any(c.__name__ == "LightningModule" and c.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
               for c in type(module).__mro__)


# ---------------------------------------------------------------- configure_optimizers


def optimization(module: nn.Module):
    """(optimizer, Schedule or None) from configure_optimizers(), in any of its documented forms:
    an optimizer; a list or tuple of one; ([optimizers], [schedulers]); a dict with "optimizer"
    and "lr_scheduler" (a scheduler, or a dict with "scheduler", "interval", "frequency")."""
    out = module.configure_optimizers()
    schedulers = []
    if isinstance(out, dict):
        optimizers, schedulers = [out.get("optimizer")], [out["lr_scheduler"]] if out.get("lr_scheduler") else []
    elif isinstance(out, (list, tuple)) and len(out) == 2 and all(isinstance(x, (list, tuple)) for x in out):
        optimizers, schedulers = list(out[0]), list(out[1])
    elif isinstance(out, (list, tuple)):
        optimizers = list(out)
        if optimizers and all(isinstance(x, dict) for x in optimizers):  # [{"optimizer": ..., "lr_scheduler": ...}]
            schedulers = [d["lr_scheduler"] for d in optimizers if d.get("lr_scheduler")]
            optimizers = [d.get("optimizer") for d in optimizers]
    else:
        optimizers = [out]
    if len(optimizers) != 1 or not isinstance(optimizers[0], torch.optim.Optimizer):
        what = f"{len(optimizers)} optimizers" if len(optimizers) != 1 else type(optimizers[0]).__name__
        raise ConfigError(
            f"configure_optimizers() returned {what}: launcher trains with exactly one optimizer (several "
            "optimizers need manual optimization, which launcher does not do). Return one optimizer, optionally "
            "with its scheduler")
    if len(schedulers) > 1:
        raise ConfigError(f"configure_optimizers() returned {len(schedulers)} schedulers: launcher steps one")
    if not schedulers:
        return optimizers[0], None
    spec = schedulers[0] if isinstance(schedulers[0], dict) else {"scheduler": schedulers[0]}
    # ("monitor" matters only to ReduceLROnPlateau, which Schedule refuses by name.)
    unsupported = sorted(set(spec) - {"scheduler", "interval", "frequency", "name", "strict", "monitor"})
    if unsupported:
        raise ConfigError(f"configure_optimizers(): the lr_scheduler keys {unsupported} are not supported (a "
                          "scheduler stepped by count, with interval and frequency, is)")
    # Lightning steps a scheduler once an epoch unless told "interval": "step".
    return optimizers[0], Schedule(spec["scheduler"], spec.get("interval", "epoch"), int(spec.get("frequency", 1)),
                                   source="configure_optimizers()")


# ---------------------------------------------------------------- what is not supported


def check_module(module: nn.Module) -> None:
    """Refuse, before training, what launcher does not do, naming it."""
    problems = []
    if getattr(module, "automatic_optimization", True) is False:
        problems.append("manual optimization (automatic_optimization = False)")
    base = lightning_base() if is_lightning_module(module) else None
    for hook in UNSUPPORTED_HOOKS:
        mine = getattr(type(module), hook, None)
        if mine is not None and (base is None or mine is not getattr(base, hook, None)):
            problems.append(f"the hook {hook}()")
    used = trainer_attributes_used(type(module))
    if used - set(TRAINER_ATTRIBUTES):
        problems.append(f"self.trainer.{', self.trainer.'.join(sorted(used - set(TRAINER_ATTRIBUTES)))}")
    if problems:
        raise ConfigError(
            f"{type(module).__name__} uses what launcher does not support: {'; '.join(problems)}. Launcher runs "
            f"automatic optimization with one optimizer; self.trainer offers {', '.join(TRAINER_ATTRIBUTES)}")


def trainer_attributes_used(cls: type) -> set[str]:
    """The `self.trainer.X` the class's own code reads (its source, not Lightning's)."""
    used = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("lightning", "pytorch_lightning", "torch", "builtins"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        used |= set(re.findall(r"self\.trainer\.(\w+)", source))
    return used


# ---------------------------------------------------------------- running it


class TrainerView:
    """The part of Lightning's Trainer a module may read as `self.trainer`."""

    def __init__(self, run):
        self._run = run

    global_step = property(lambda self: self._run.step)
    current_epoch = property(lambda self: self._run.epoch)
    max_epochs = property(lambda self: None if self._run.cfg.train.max_steps else self._run.cfg.train.epochs)
    max_steps = property(lambda self: self._run.cfg.train.max_steps or -1)
    world_size = property(lambda self: self._run.env.world_size)
    global_rank = property(lambda self: self._run.env.rank)
    local_rank = property(lambda self: self._run.env.local_rank)
    is_global_zero = property(lambda self: self._run.env.rank == 0)
    num_nodes = property(lambda self: max(1, self._run.env.world_size // self._run.env.local_world_size))
    num_devices = property(lambda self: self._run.env.local_world_size)
    estimated_stepping_batches = property(lambda self: self._run.total_steps)
    num_training_batches = property(lambda self: self._run.plan.steps_per_epoch * self._run.plan.accumulation)

    def __getattr__(self, name):
        raise AttributeError(f"self.trainer.{name} is not supported by launcher; self.trainer offers "
                             f"{', '.join(TRAINER_ATTRIBUTES)}")


class Logged:
    """One name's values logged with self.log over a window (a step, an epoch, a validation),
    kept where they were logged (the device, or the host for numbers and CPU tensors): reading
    them back waits for the logging step."""

    IDENTITY = {"mean": 0.0, "sum": 0.0, "max": float("-inf"), "min": float("inf")}

    def __init__(self, reduce_fx: str, sync_dist: bool, prog_bar: bool, device: torch.device):
        self.reduce_fx, self.sync_dist, self.prog_bar = reduce_fx, sync_dist, prog_bar
        # torch.full: a fill kernel; torch.tensor(number, device=cuda) would be a blocking copy
        self.total = torch.full((), self.IDENTITY[reduce_fx], device=device)  # mean: the weighted sum
        self.weight = torch.zeros((), device=device)
        self.last = None

    def add(self, value: torch.Tensor, batch_size: int) -> None:
        value = value.detach().float().reshape(())
        self.last = value
        if self.reduce_fx in ("mean", "sum"):
            self.total = self.total + (value * batch_size if self.reduce_fx == "mean" else value)
            self.weight = self.weight + batch_size
        else:
            self.total = torch.maximum(self.total, value) if self.reduce_fx == "max" else torch.minimum(self.total, value)


REDUCE = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


class LightningRun:
    """What a LightningModule sees while launcher trains it, behind the calls the loop makes of any
    recipe (recipe.PlainRun answers the same ones without hooks). The Trainer owns one per run;
    `state` is its run_state.RunState (step, epoch, sizes, config)."""

    hooks_between_steps = True  # its hooks run before the next optimizer step and may change the weights

    def __init__(self, module: nn.Module, state):
        self.module, self.state = module, state
        self.cfg, self.env, self.plan = state.cfg, state.env, state.sizes
        if any(p.is_meta for p in module.parameters()):
            # A skeleton the strategy fills in place (docs/design.md, Building the model): nothing to move,
            # but self.device must name where it will live (Lightning's mixin keeps it in _device).
            for m in module.modules():
                if hasattr(m, "_device"):
                    m._device = state.device
        else:
            module.to(state.device)  # its own .to(): it keeps self.device right, before the strategy wraps it
        self.stage = "train"
        self.step_logs: dict[str, Logged] = {}   # on_step values of training (latest a step)
        self.epoch_logs: dict[str, Logged] = {}  # on_epoch values of training (the epoch so far)
        self.val_logs: dict[str, Logged] = {}    # a validation's values
        self.batch_size = 0
        self.counting = True  # False for the repeated validation batches of short ranks
        if is_lightning_module(module):
            module._trainer = TrainerView(self)
            module.log = self.log  # the instance's log and log_dict now reach launcher's loggers

    step = property(lambda self: self.state.step)
    epoch = property(lambda self: self.state.epoch)
    total_steps = property(lambda self: self.state.total_steps)

    def schedule_config(self, configured):
        """Without a scheduler from configure_optimizers the rate is constant, as under Lightning."""
        return ScheduleConfig()

    def hook(self, name: str, *args):
        fn = getattr(self.module, name, None)
        return fn(*args) if callable(fn) else None

    def loss(self, model: nn.Module, batch, batch_idx: int):
        """The loss of one micro-batch: training_step through the wrapped model."""
        self.batch_size = self.plan.micro_batch
        out = model(batch, batch_idx)
        loss = out.get("loss") if isinstance(out, dict) else out
        if loss is None:
            raise ConfigError("training_step returned no loss (None, or a dict without 'loss'): skipping a step "
                              "that way is not supported; return the loss")
        return loss

    def validation_values(self, model: nn.Module, batch, batch_idx: int, n: int, counts: bool) -> dict:
        """Run validation_step through the wrapped model. What it logs is collected for the end
        of the validation; a module that cannot log (not a LightningModule) may return a dict
        of metrics instead."""
        self.stage, self.batch_size, self.counting = "validation", n, counts
        try:
            self.hook("on_validation_batch_start", batch, batch_idx)
            out = model(batch, batch_idx, stage="validation") if callable(getattr(self.module, "validation_step", None)) else None
            self.hook("on_validation_batch_end", out, batch, batch_idx)
        finally:
            self.stage, self.counting = "train", True
        if is_lightning_module(self.module) or not isinstance(out, dict):
            return {}
        return out

    def end_validation(self) -> dict[str, float]:
        """on_validation_epoch_end (it may log too), then the validation's values, reduced exactly."""
        self.stage = "validation"
        try:
            self.hook("on_validation_epoch_end")
        finally:
            self.stage = "train"
        values, self.val_logs = self.reduce(self.val_logs), {}
        return values

    def end_epoch(self) -> dict[str, float]:
        values, self.epoch_logs = self.reduce(self.epoch_logs), {}
        return values

    def step_values(self) -> dict[str, float]:
        return self.reduce(self.step_logs, step_values=True)

    def prog_bar_names(self) -> set[str]:
        return {name for name, logged in self.step_logs.items() if logged.prog_bar}

    # ------------------------------------------------------------ self.log

    def log(self, name: str, value, prog_bar: bool = False, logger: bool = True, on_step: bool | None = None,
            on_epoch: bool | None = None, reduce_fx="mean", enable_graph: bool = False, sync_dist: bool = False,
            sync_dist_group=None, add_dataloader_idx: bool = True, batch_size: int | None = None,
            metric_attribute=None, rank_zero_only: bool = False) -> None:
        fx = REDUCE.get(reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", ""))
        if fx is None:
            raise ConfigError(f"self.log({name!r}, reduce_fx={reduce_fx!r}): launcher reduces with mean, sum, max "
                              "or min")
        if not torch.is_tensor(value):  # a number stays on the host (no copy in the step) until reduce()
            value = torch.full((), float(value))
        size = batch_size or self.batch_size
        training = self.stage == "train"
        on_step = training if on_step is None else on_step
        on_epoch = (not training) if on_epoch is None else on_epoch
        if not training:  # validation: reduced over the whole validation set
            logged = self.val_logs.setdefault(name, Logged(fx, True, prog_bar, value.device))
            if self.counting:  # every rank holds the same names, counted or not, for the reduction
                logged.add(value, size)
            return
        if on_step:
            key = f"{name}_step" if on_epoch else name
            logged = self.step_logs[key] = Logged(fx, sync_dist, prog_bar, value.device)
            logged.add(value, size)
        if on_epoch:
            key = f"{name}_epoch" if on_step else name
            self.epoch_logs.setdefault(key, Logged(fx, sync_dist, prog_bar, value.device)).add(value, size)

    def reduce(self, logs: dict[str, Logged], step_values: bool = False) -> dict[str, float]:
        """The logged values, reduced over the ranks where asked (validation: always, exactly).
        A collective: every rank calls it with the same names."""
        import torch.distributed as dist

        out = {}
        for name in sorted(logs):
            item = logs[name]
            if step_values:
                total, weight = item.last, torch.ones_like(item.last)
                fx = "mean" if item.reduce_fx == "mean" else item.reduce_fx
            else:
                total, weight, fx = item.total, item.weight, item.reduce_fx
            if item.sync_dist and dist.is_initialized() and self.env.world_size > 1:
                # On the run's device: NCCL cannot reduce the CPU tensors of logged numbers or CPU values
                # (a logging step may wait for the copy).
                device = self.state.device
                if fx in ("mean", "sum"):
                    both = torch.stack([total.to(device), weight.to(device)])
                    dist.all_reduce(both)
                    total, weight = both[0], both[1]
                else:
                    total = total.to(device, copy=True)  # reduced in place: not the tensor the log keeps
                    dist.all_reduce(total, op=dist.ReduceOp.MAX if fx == "max" else dist.ReduceOp.MIN)
            out[name] = float(total / weight) if fx == "mean" else float(total)
        return out
