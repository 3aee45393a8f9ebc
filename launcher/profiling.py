"""train.profile: a torch.profiler trace of a few training steps.

`train.profile: {start_step: N, steps: K}` records optimizer steps N .. N+K-1 (step 1 is
the run's first) on the CPU, and on the GPU too with CUDA, and writes them as one Chrome
trace JSON per rank to RUN_DIR/profile/, which Perfetto (ui.perfetto.dev) and
TensorBoard's profiler plugin open. Each recorded step is one span named `step N`.

The trainer drives it:

    profiler = StepProfiler.from_config(cfg.train.profile, run_dir, device, rank, step)
    ... after each optimizer step:  profiler.after_step(new_step_count)
    ... when the loop ends (also on an error):  profiler.close()

torch.profiler is imported only when a profile is asked for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .fs import say


class NoProfiler:
    """train.profile unset: nothing to do, at no cost."""

    def after_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class StepProfiler:
    """Records steps first .. last (inclusive, 1-based) and writes the trace once the last one is done."""

    def __init__(self, first: int, steps: int, out_dir: Path, rank: int, cuda: bool, step: int = 0):
        self.first, self.last = first, first + steps - 1
        self.out_dir, self.rank, self.cuda = Path(out_dir), rank, cuda
        self.path: Path | None = None  # the trace, once written
        self.prof = None  # the running torch.profiler.profile
        self.span = None  # the record_function of the step being recorded
        self.recorded: list[int] = []
        if first - 1 <= step < self.last:  # resumed inside the window: record what is left of it
            self.start(step)

    @classmethod
    def from_config(cls, profile_cfg, run_dir: Path, device: torch.device, rank: int,
                    step: int = 0) -> "StepProfiler | NoProfiler":
        """profile_cfg: the config's train.profile (None: off); step: the steps already done (a resume)."""
        if profile_cfg is None:
            return NoProfiler()
        return cls(profile_cfg.start_step, profile_cfg.steps, Path(run_dir) / "profile", rank,
                   device.type == "cuda", step)

    def after_step(self, step: int) -> None:
        """Called once optimizer step `step` (the new step count) is done."""
        if self.prof is None:
            if step == self.first - 1:
                self.start(step)
            return
        self.recorded.append(step)
        if step >= self.last:
            self.finish()
        else:
            self.open_span(step + 1)

    def close(self) -> None:
        """The loop ended (or failed) inside the window: keep what was recorded."""
        if self.prof is not None:
            self.finish()

    # ------------------------------------------------------------ internals

    def start(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # No shapes, stacks or memory events: the trace stays small enough to open in a browser.
        self.prof = profile(activities=activities)
        self.prof.start()
        self.open_span(step + 1)

    def open_span(self, step: int) -> None:
        self.close_span()
        self.span = torch.profiler.record_function(f"step {step}")
        self.span.__enter__()

    def close_span(self) -> None:
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None

    def finish(self) -> None:
        self.close_span()
        if self.cuda:
            torch.cuda.synchronize()  # the steps' kernels belong in the trace
        prof, self.prof = self.prof, None
        prof.stop()
        if not self.recorded:
            return  # stopped before a whole step ran: no trace worth a file
        steps = f"{self.recorded[0]}-{self.recorded[-1]}"
        # Each rank its own file; `.pt.trace.json` is the name TensorBoard's profiler plugin looks for.
        self.path = self.out_dir / f"rank{self.rank}.steps_{steps}.pt.trace.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        say(f"profile of steps {steps} written to {self.path} (open it in ui.perfetto.dev or TensorBoard)")
