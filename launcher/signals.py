"""Stop requests (docs/design.md, Checkpoints: saved after a stop signal).

SIGTERM, SIGUSR1 (SLURM's warning before a time limit or a preemption) and a first SIGINT (Ctrl-C)
ask the run to stop: it saves at the next step it can (every step on one process, at the next
row on several, which agree in that row's all-reduce) and exits 3. A second SIGINT stops at once,
exit 130, saying where a rerun resumes (read from the disk). Under `launcher run --nproc` the
launching process says these things, once, and the workers keep quiet.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from .checkpoint import newest_note
from .fs import say

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = ckpt_dir
        self.requested = False  # set by a handler on this rank
        self.first: str | None = None  # the name of the signal that asked first
        self.previous: dict = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. a test harness): no handlers
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum, frame) -> None:
        quiet = bool(os.environ.get("LAUNCHER_SPAWNED"))  # the launching process speaks for its workers
        if signum == signal.SIGINT and self.requested:
            if not quiet:
                say(f"stopped at once by a second SIGINT: {newest_note(self.ckpt_dir)}")
            raise KeyboardInterrupt  # out through every `finally` (the run dir's hold too): exit 130
        if signum == signal.SIGINT and not quiet:
            say("SIGINT: saving a checkpoint at the next step, then stopping (Ctrl-C again stops at once)")
        self.requested = True
        self.first = self.first or signal.Signals(signum).name
