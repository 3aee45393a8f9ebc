"""train.profile: a torch.profiler trace of a few training steps.

`train.profile: {start_step: N, steps: K}` records optimizer steps N .. N+K-1 (step 1 is
the run's first) on the CPU, and on the GPU too with CUDA, and writes them as one Chrome
trace JSON per rank to RUN_DIR/profile/, which Perfetto (ui.perfetto.dev) and
TensorBoard's profiler plugin open. Each recorded step is one span named `ProfilerStep#N`,
torch's own, by which TensorBoard's plugin and HTA break a trace down, with N the optimizer
step. A run that ends inside the window has one more span, of what ran after its last step.

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
            self.prof.step()  # ends ProfilerStep#step, begins ProfilerStep#step+1

    def close(self) -> None:
        """The loop ended (or failed) inside the window: keep what was recorded."""
        if self.prof is not None:
            self.finish()

    # ------------------------------------------------------------ internals

    def start(self, step: int) -> None:
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # No shapes, stacks or memory events: the trace stays small enough to open in a browser.
        # A schedule (any) makes torch mark each step() with a ProfilerStep#<step_num> span; this
        # one records every step, and step_num starts at the launcher's step, not torch's 0.
        self.prof = profile(activities=activities, schedule=lambda _: ProfilerAction.RECORD)
        self.prof.step_num = step + 1
        self.prof.start()

    def finish(self) -> None:
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
