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
            found = ", ".join(k for k in row if k not in ("step", "epoch", "split"))
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
