"""Where a run stands and when each thing happens.

The step counter, the skipped steps and the monitors (checkpoint.best, train.early_stop) are the
run's state: what a checkpoint's meta.json holds beside the model (with the schedule, the gradient
scaler, the data's position, the validation of its step and the resolved config, which a resume
under a config that changes the math is refused against). The cadences
say at which steps the loop logs, evaluates and saves, so the loop itself is a list of calls.
"""
from __future__ import annotations

from .monitor import Monitors, values


class RunState:
    def __init__(self, cfg, env, sizes, total_steps: int, device):
        self.cfg, self.env, self.sizes, self.total_steps, self.device = cfg, env, sizes, total_steps, device
        self.step = 0  # optimizer steps done
        self.skipped_steps = 0  # of those, the ones whose update was skipped (non-finite, fp16 overflow)
        self.monitors = Monitors(cfg)
        self.last_val: dict | None = None  # the newest validation row
        self.stopped_early: dict | None = None  # the validation row early stopping ended the run at

    @property
    def epoch(self) -> int:
        spe = self.sizes.steps_per_epoch
        return self.step // spe if spe else 0  # a stream of unknown length: its passes are counted as read

    @property
    def done(self) -> bool:
        """total_steps is None while a stream of unknown length is still in its last pass."""
        return self.total_steps is not None and self.step >= self.total_steps

    # ------------------------------------------------------------ cadences

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every_steps == 0 or step == self.total_steps

    def should_evaluate(self, step: int) -> bool:
        """Every train.eval_every_steps; the final validation comes after the last save instead."""
        every = self.cfg.train.eval_every_steps
        return bool(every) and step % every == 0 and (self.total_steps is None or step < self.total_steps)

    def follows_final_validation(self) -> bool:
        """The monitors take the final validation where a longer run would have validated too (a rerun
        with a larger train.max_steps goes on from them), and once early stopping has not ended the run."""
        every = self.cfg.train.eval_every_steps
        return not self.stopped_early and bool(every) and self.step % every == 0

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and step % every == 0

    # ------------------------------------------------------------ meta.json

    def meta(self, strategy_name: str, schedule, scaler, data_position: dict | None) -> dict:
        meta = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.env.world_size,
            "strategy": strategy_name,
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "config": self.cfg.to_dict(),  # a resume under a config that changes the math is refused
            "monitors": self.monitors.state_dict(),
        }
        if data_position is not None:
            meta["stream"] = data_position
        if self.last_val and self.last_val["step"] == self.step:
            meta["val"] = values(self.last_val)
        return meta

    def after_final_validation(self) -> dict:
        """What meta.json holds once the final validation is done (its values, the monitors after it)."""
        return {"val": values(self.last_val or self.stopped_early), "monitors": self.monitors.state_dict()}

    def resumed_note(self, path, meta: dict, restart: int, logged) -> str:
        """The line a resume prints: from where, and what changed (a restart, another world size).
        logged(): the last step metrics.jsonl holds, asked only after a resize."""
        saved_world = meta.get("world_size", self.env.world_size)
        if saved_world != self.env.world_size:  # an elastic job lost or gained a node (or a rerun chose so)
            redone = max(0, (logged() or self.step) - self.step)
            return (f"resized: world size {saved_world} -> {self.env.world_size}; resumed from {path} at step "
                    f"{self.step}, {redone} logged step(s) redone")
        return ((f"restart {restart}: the worker group restarted after a failure and " if restart else "")
                + f"resumed from {path} at step {self.step}")

    def restore(self, meta: dict, schedule, scaler) -> None:
        self.step, self.skipped_steps = meta["step"], meta["skipped_steps"]
        self.monitors.load_state_dict(meta.get("monitors", {}))
        if self.monitors.early_stop and self.monitors.early_stop.exhausted:  # killed before it could finish
            self.stopped_early = {"step": self.step, "split": "val", **meta.get("val", {})}
        schedule.load_state_dict(meta["scheduler"])
        if scaler and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
