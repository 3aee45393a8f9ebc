"""Checkpoints: save, find the newest complete one, load, prune, export.

Layout (DESIGN section 5):

    checkpoints/step_000500/         one complete checkpoint
        .metadata, __0_0.distcp ...  model + optimizer (torch.distributed.checkpoint),
                                     or DeepSpeed's own files for the deepspeed strategy
        meta.json                    trainer counters, schedule, grad scaler (rank 0)
        rng_0.pt, rng_1.pt ...       each rank's RNG states
    checkpoints/latest               the name of the newest complete checkpoint

A save goes to step_000500.tmp/ and is renamed only once every rank has written
its part; `latest` is replaced atomically after that. A save cut off halfway stays
a .tmp directory and is never used.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and STEP_DIR.match(path.name) is not None and (path / "meta.json").is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path, warn=print) -> Path | None:
    """The checkpoint `latest` names; if it is missing or incomplete, say so and use the newest complete one."""
    complete = complete_checkpoints(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if is_complete(named):
            return named
        warn(f"checkpoints/latest names {named.name}, which is missing or incomplete; "
             + (f"using the newest complete checkpoint, {complete[-1].name}" if complete else "no complete checkpoint: starting fresh"))
    return complete[-1] if complete else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, run_dir: Path, cfg, rank: int):
        self.dir = run_dir / "checkpoints"
        self.cfg, self.rank = cfg, rank
        self.pending = None  # an async save in flight: (future, finalize)
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------ save

    def save(self, step: int, strategy, meta: dict) -> None:
        """Every rank calls this at the same step. Returns once this rank's part is
        written (sync) or staged (async)."""
        self.wait()  # one save in flight at a time
        if step == self.last_saved_step:  # e.g. the end, right after an every_steps save
            return
        self.last_saved_step = step
        final = self.dir / step_dir_name(step)
        tmp = self.dir / (final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save cut off earlier
            tmp.mkdir(parents=True)
        barrier()
        torch.save(rng_state(), tmp / f"rng_{self.rank}.pt")

        def finalize() -> None:
            # Rank 0 publishes only after every rank has written its part: for sync
            # saves the barrier says so, for async ones DCP's coordinator writes the
            # metadata last, after gathering every rank's write results.
            if self.rank != 0:
                return
            write_atomic(tmp / "meta.json", json.dumps(meta))
            if final.exists():  # a later checkpoint of an abandoned timeline (resumed from an earlier one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.dir / "latest", final.name)
            self.prune()

        future = strategy.save_checkpoint(tmp, async_save=self.cfg.async_save)
        if future is None:
            barrier()
            finalize()
            barrier()  # nobody reads `latest` or prunes before rank 0 published
        else:
            self.pending = (future, finalize)

    def wait(self) -> None:
        """Finish an async save in flight (before the next save, and at exit)."""
        if self.pending is None:
            return
        future, finalize = self.pending
        self.pending = None
        future.result()
        barrier()
        finalize()
        barrier()

    def prune(self) -> None:
        keep = set(complete_checkpoints(self.dir)[-self.cfg.keep_last :])
        pointer = self.dir / "latest"
        if pointer.is_file():
            keep.add(self.dir / pointer.read_text().strip())  # never the one `latest` names
        for path in complete_checkpoints(self.dir):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------ resume

    def set_aside(self) -> None:
        """A fresh start: move an earlier run's checkpoints out of the way (never delete them),
        so that neither `latest` nor pruning mixes the two runs."""
        if self.rank == 0 and self.dir.is_dir() and any(self.dir.iterdir()):
            self.dir.rename(self.dir.with_name(f"checkpoints.{time.time_ns()}"))

    def resume_path(self) -> Path | None:
        """Where to resume from per checkpoint.resume: auto | never | a path."""
        how = self.cfg.resume
        if how == "never":
            return None
        if how == "auto":
            warn = (lambda m: print(f"warning: {m}", file=sys.stderr)) if self.rank == 0 else (lambda m: None)
            return latest_checkpoint(self.dir, warn)
        return Path(how)

    def load(self, path: Path, strategy) -> dict:
        """Load model, optimizer and this rank's RNG states; return meta.json."""
        strategy.load_checkpoint(path)
        rng = path / f"rng_{self.rank}.pt"
        if rng.is_file():  # a different world size has no file for the new ranks
            set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / "meta.json").read_text())
