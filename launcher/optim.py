"""Optimizers and learning-rate schedules from the config."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen parameters stay out
    if not params:
        raise ConfigError("the recipe's model has no trainable parameters (every parameter has requires_grad=False)")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


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

    def __init__(self, scheduler, interval: str = "step", frequency: int = 1, source: str = "the config's schedule:"):
        if interval not in ("step", "epoch"):
            raise ConfigError(f"a scheduler's interval must be 'step' or 'epoch', not {interval!r}")
        if type(scheduler).__name__ == "ReduceLROnPlateau":
            raise ConfigError("ReduceLROnPlateau (a scheduler stepped with a monitored metric) is not supported: "
                              "use a scheduler stepped by count (StepLR, CosineAnnealingLR, LambdaLR, ...)")
        self.scheduler, self.interval, self.frequency, self.source = scheduler, interval, frequency, source

    def after_step(self, applied: bool, step: int, steps_per_epoch: int) -> None:
        """Called after optimizer step number `step` (1-based); `applied` is False when it was skipped."""
        if self.interval == "step":
            if applied and step % self.frequency == 0:
                self.scheduler.step()
        elif step % steps_per_epoch == 0 and (step // steps_per_epoch) % self.frequency == 0:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
