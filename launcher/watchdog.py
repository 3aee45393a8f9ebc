"""Hangs are bounded: a rank that makes no progress for dist.timeout_s ends the job.

The training loop calls `beat(step, micro, phase)` as it moves on (a few attribute
writes, no I/O). A daemon thread checks the time of the last beat; when it is older
than the timeout, the rank says where it was (step, phase, its Python stack) and
exits 1, so torchrun or srun ends the other ranks. In a job of several ranks each
stalled rank also posts its position to the rendezvous store and rank 0 names the
rank(s) furthest behind: the one a hang is waiting for (docs/design.md, Hangs).

The process group's own collective timeout is set a grace period longer
(`COLLECTIVE_GRACE_S`), so that this report, not a bare backend timeout, comes first.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback

from .errors import exit_now

COLLECTIVE_GRACE_S = 30.0
PHASES = ("data", "forward", "backward", "optimizer", "logging", "validation")
DESCRIBE = {
    "data": "loading a batch",
    "forward": "the recipe's loss (forward)",
    "backward": "backward (with DDP/FSDP, the gradient reduction waits for every rank)",
    "optimizer": "the optimizer step (gradient norm, collectives)",
    "logging": "logging (an all-reduce of the logged values)",
    "validation": "validation",
}


class Watchdog:
    def __init__(self, timeout_s: float, rank: int = 0, world_size: int = 1, store=None, exit=None):
        self.timeout_s, self.rank, self.world_size, self.store = timeout_s, rank, world_size, store
        self.exit = exit or _exit
        self.position = (0, 0, "data")  # (step, micro-batch, phase): where this rank is
        self.last_beat = time.monotonic()
        self.suspended = False
        self._done = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)

    def start(self) -> None:
        """Watch from now on (Trainer.fit). A Trainer driven piece by piece, as tests and benchmarks
        do, is never watched: nothing would end a process that merely stopped calling it."""
        self.last_beat = time.monotonic()
        self._thread.start()

    def beat(self, step: int, micro: int, phase: str) -> None:
        self.position = (step, micro, phase)
        self.last_beat = time.monotonic()

    def suspend(self, suspended: bool) -> None:
        """Checkpoint saves take as long as the disk needs; the barrier after them bounds them."""
        self.suspended = suspended
        self.last_beat = time.monotonic()

    def close(self) -> None:
        self._done.set()

    # ------------------------------------------------------------ the thread

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._done.wait(poll):
            idle = time.monotonic() - self.last_beat
            if not self.suspended and idle > self.timeout_s:
                self._report(idle)
                self.exit(1)
                return

    def _report(self, idle: float) -> None:
        step, micro, phase = self.position
        frames = sys._current_frames().get(self._main)
        stack = "".join(traceback.format_stack(frames)[-8:]) if frames is not None else "  (unknown)\n"
        lines = [f"error: rank {self.rank} made no progress for {idle:.0f} s (dist.timeout_s={self.timeout_s:g}) "
                 f"in step {step + 1}, micro-batch {micro + 1}, in {DESCRIBE.get(phase, phase)}. Where it was:",
                 stack.rstrip()]
        if self.world_size > 1 and self.store is not None:
            summary = self._compare_ranks(step, micro, phase)
            if summary and self.rank == 0:
                lines.append(summary)
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()

    def _compare_ranks(self, step: int, micro: int, phase: str) -> str | None:
        """Post this rank's position; rank 0 collects the others' and names the laggards. The
        other ranks wait for that (boundedly) before exiting, so that their exit does not end
        the job before rank 0 has spoken."""
        deadline = time.monotonic() + min(10.0, self.timeout_s / 2)
        try:
            self.store.set(f"watchdog/{self.rank}", f"{step} {micro} {phase}")
            if self.rank != 0:
                while time.monotonic() < deadline and not self.store.check(["watchdog/reported"]):
                    time.sleep(0.1)
                return None
            keys = [f"watchdog/{r}" for r in range(self.world_size)]
            while time.monotonic() < deadline and not self.store.check(keys):
                time.sleep(0.1)
            positions = {}
            for r, key in enumerate(keys):
                if self.store.check([key]):
                    s, m, p = self.store.get(key).decode().split()
                    positions[r] = (int(s), int(m), PHASES.index(p) if p in PHASES else 0, p)
            self.store.set("watchdog/reported", "1")
        except Exception as e:  # the store itself may be gone: the per-rank lines still stand
            return f"(could not compare the ranks' positions: {e})"
        silent = [r for r in range(self.world_size) if r not in positions]
        behind = min(v[:3] for v in positions.values())
        laggards = [r for r, v in positions.items() if v[:3] == behind]
        text = []
        if silent:
            text.append(f"rank(s) {silent} did not report: they may be stuck where Python cannot run")
        if len(laggards) < len(positions):
            s, m, _, p = positions[laggards[0]]
            text.append(f"the job is waiting for rank(s) {laggards}, stuck in step {s + 1}, micro-batch {m + 1}, "
                        f"in {DESCRIBE.get(p, p)}; the other ranks are further on")
        elif not silent:
            text.append("every rank stalled at the same point: a collective that never completes, or a step slower "
                        "than dist.timeout_s (raise it for slow steps)")
        return "hang: " + "; ".join(text)


def _exit(code: int) -> None:
    exit_now(code)
