"""Optimizers and learning-rate schedules from the config."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .config import ConfigError, OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen parameters stay out
    if not params:
        raise ConfigError("the recipe's model has no trainable parameters (every parameter has requires_grad=False)")
    impl = implementation(cfg.impl, params, cfg.name)
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl)
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        optimizer = cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl)
    optimizer.register_load_state_dict_post_hook(functools.partial(keep_implementation, impl))
    return optimizer


def implementation(impl: str, params: list[torch.Tensor], optimizer: str | None = None) -> dict:
    """The optimizer's foreach / fused flags for optim.impl. The three compute the same update up to
    rounding. auto: fused (one kernel per step over all tensors, the fastest) where torch's fused
    kernel of `optimizer` (sgd, adam, adamw) can step every parameter, else foreach (torch itself
    would pick the for-loop on the CPU). The parameters are the ones the optimizer gets: under FSDP
    DTensors, which a fused kernel steps only where DTensor has a sharding rule for it."""
    if impl == "for_loop":
        return {"foreach": False, "fused": False}
    if impl == "foreach":
        return {"foreach": True, "fused": False}
    reason = next(filter(None, (fused_unavailable(optimizer, p.device.type, p.dtype, is_dtensor(p))
                                for p in params)), None)
    if reason is None:
        return {"foreach": False, "fused": True}
    if impl == "fused":
        raise ConfigError(fused_refusal(reason))
    return {"foreach": True, "fused": False}


# The op each optimizer's fused step calls (torch/optim/sgd.py, adam.py, adamw.py).
FUSED_OPS = {"sgd": "_fused_sgd_", "adam": "_fused_adam_", "adamw": "_fused_adamw_"}


def fused_unavailable(optimizer: str | None, device_type: str, dtype: torch.dtype, dtensor: bool) -> str | None:
    """Why torch's fused kernel of `optimizer` cannot step a parameter of this device, dtype and kind
    (a DTensor: FSDP's sharded parameters), or None where it can. optimizer None: which kernel is
    not known, so only plain tensors qualify. preflight asks it with the parameters a strategy will
    hand the optimizer, before any worker starts; build_optimizer with the real ones."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # the list torch checks against

    if not dtype.is_floating_point or device_type not in _get_fused_kernels_supported_devices():
        return f"torch {torch.__version__} has no fused optimizer kernel for {dtype} parameters on {device_type}"
    if dtensor and (optimizer is None or not dtensor_runs_fused(optimizer)):
        name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}.get(optimizer, "optimizer")
        op = f"aten.{FUSED_OPS.get(optimizer, '_fused_*')}"
        return (f"torch {torch.__version__} has no DTensor sharding rule for {op} (the fused {name} kernel), so it "
                "cannot step FSDP's sharded (DTensor) parameters")
    return None


def fused_refusal(reason: str, where: str = "") -> str:
    """The one message of an optim.impl=fused that cannot run (bad input, exit 2); `where` names the
    settings that lead to it."""
    fix = "set optim.impl=auto (fused wherever it can be, else foreach) or optim.impl=foreach"
    if "DTensor" in reason:
        fix += ", or use strategy=ddp or deepspeed, which hand the optimizer plain tensors"
    return f"optim.impl=fused{where}: {reason}: {fix}"


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


@functools.cache
def dtensor_runs_fused(optimizer: str) -> bool:
    """Does torch's DTensor have a sharding rule for every overload of this optimizer's fused op? Without
    one the op raises NotImplementedError on DTensor parameters (torch 2.13: Adam and AdamW have
    rules, SGD has none). The registries are torch's own; where they cannot be read (another torch),
    the answer is no: foreach, never a crash."""
    try:
        from torch.distributed.tensor import DTensor

        dispatcher = DTensor._op_dispatcher
        propagator = dispatcher.sharding_propagator
        packet = getattr(torch.ops.aten, FUSED_OPS[optimizer])
    except (ImportError, AttributeError, KeyError):
        return False
    tables = [getattr(propagator, name, None) for name in ("op_single_dim_strategy_funcs", "op_strategy_funcs",
                                                            "op_to_rules")]
    tables.append(getattr(dispatcher, "_custom_op_handlers", None))
    tables = [t for t in tables if isinstance(t, dict)]
    overloads = [getattr(packet, name) for name in packet.overloads()]
    return bool(overloads) and all(any(op in t for t in tables) for op in overloads)


def keep_implementation(impl: dict, optimizer: torch.optim.Optimizer) -> None:
    """load_state_dict takes foreach / fused from the checkpoint's param groups: put optim.impl back. A
    fused step wants its step counters on the parameters' device as float32 (the others take any)."""
    for group in optimizer.param_groups:
        group.update(impl)
        if impl["fused"]:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def lr_factor(cfg: ScheduleConfig, total_steps: int):
    """The multiplier of the base lr after `step` applied optimizer steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 1 - progress if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))


class Schedule:
    """A learning-rate scheduler and when it steps: every `frequency` optimizer steps
    (interval "step"), or at the end of every `frequency` epochs (interval "epoch")."""

    def __init__(self, scheduler, interval: str = "step", frequency: int = 1, source: str = "the config's schedule:",
                 constant: bool = False):
        if interval not in ("step", "epoch"):
            raise ConfigError(f"a scheduler's interval must be 'step' or 'epoch', not {interval!r}")
        if type(scheduler).__name__ == "ReduceLROnPlateau":
            raise ConfigError("ReduceLROnPlateau (a scheduler stepped with a monitored metric) is not supported: "
                              "use a scheduler stepped by count (StepLR, CosineAnnealingLR, LambdaLR, ...)")
        self.scheduler, self.interval, self.frequency, self.source = scheduler, interval, frequency, source
        self.constant = constant  # a constant rate: stepping the scheduler would change nothing

    def after_step(self, applied: bool, step: int, steps_per_epoch: int) -> None:
        """Called after optimizer step number `step` (1-based); `applied` is False when it was skipped."""
        if self.constant:
            return
        if self.interval == "step":
            if applied and step % self.frequency == 0:
                self.scheduler.step()
        elif steps_per_epoch and step % steps_per_epoch == 0 and (step // steps_per_epoch) % self.frequency == 0:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
