"""A validation value followed from one validation to the next (docs/design.md, Best checkpoint and
early stopping): which was the best so far (checkpoint.best) and how many validations in a row
have not improved on it (train.early_stop).

Validation values are reduced over the ranks before they reach here, so every rank holds the
same Monitor and takes the same decisions. Its state goes into meta.json: a resumed run goes on
comparing with the same best and counting from the same patience.
"""
from __future__ import annotations

import math

from .errors import ConfigError


class Monitor:
    def __init__(self, key: str, mode: str, min_delta: float = 0.0, patience: int | None = None):
        self.key, self.mode, self.min_delta, self.patience = key, mode, min_delta, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0  # validations since the last improvement

    @classmethod
    def from_config(cls, section, patience: bool = False) -> "Monitor | None":
        if section is None:
            return None
        return cls(section.monitor, section.mode, getattr(section, "min_delta", 0.0),
                   section.patience if patience else None)

    def update(self, row: dict, step: int) -> bool:
        """Take a validation row; True if it is the best so far."""
        if self.key not in row:
            found = ", ".join(values(row))
            raise ConfigError(f"monitor: {self.key} is not among the validation's values ({found}); monitor one of "
                              "them (checkpoint.best.monitor, train.early_stop.monitor)")
        value = float(row[self.key])
        if self.improves(value):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @property
    def exhausted(self) -> bool:
        """train.early_stop: `patience` validations in a row without improvement."""
        return self.patience is not None and self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"key": self.key, "best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint of a run that monitored the same value; another value starts afresh."""
        if state and state.get("key") == self.key:
            self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]

    def describe(self) -> str:
        return f"{self.key}={self.best:.4g} at step {self.best_step}" if self.best is not None else "none yet"


class Monitors:
    """A run's checkpoint.best and train.early_stop (either may be None)."""

    def __init__(self, cfg):
        self.best = Monitor.from_config(cfg.checkpoint.best)
        self.early_stop = Monitor.from_config(cfg.train.early_stop, patience=True)

    def follow(self, val: dict | None, step: int) -> tuple[bool, bool]:
        """After a validation: (it is the best so far: save it as the best checkpoint; patience is out:
        the run stops here)."""
        if val is None:
            return False, False
        best = bool(self.best) and self.best.update(val, step)
        if self.early_stop:
            self.early_stop.update(val, step)
        return best, bool(self.early_stop) and self.early_stop.exhausted

    def named(self) -> dict[str, Monitor]:
        return {name: m for name, m in (("best", self.best), ("early_stop", self.early_stop)) if m}

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.named().items()}

    def load_state_dict(self, states: dict) -> None:
        for name, monitor in self.named().items():
            monitor.load_state_dict(states.get(name))

    def best_note(self) -> str:
        return f"; best checkpoint {self.best.describe()}" if self.best else ""

    def why_stopped(self) -> str:
        stop = self.early_stop
        return f"stopped early: {stop.key} did not improve for {stop.bad} validations; best {stop.describe()}"


def values(row: dict | None) -> dict:
    """A validation row's numbers, without its place (step, epoch, split)."""
    return {k: v for k, v in (row or {}).items() if k not in ("step", "epoch", "split") and isinstance(v, float)}
