"""Checkpoints: save, find the newest complete one, load, prune, export.

Layout (docs/design.md, Checkpoints):

    checkpoints/step_000500/         one complete checkpoint
        .metadata, __0_0.distcp ...  model + optimizer (torch.distributed.checkpoint),
                                     or DeepSpeed's own files for the deepspeed strategy
        meta.json                    trainer counters, schedule, grad scaler (rank 0)
        rng_0.pt, rng_1.pt ...       each rank's RNG states (tensors and plain values only)
    checkpoints/latest               the name of the newest complete checkpoint
    checkpoints/best                 the name of the checkpoint of the best validation (checkpoint.best)

The checkpoints directory is checkpoint.dir: RUN_DIR/checkpoints by default, or object storage
(launcher/storage.py). Locally a save goes to step_000500.tmp/ and is renamed only once every
rank has written its part; in object storage, which cannot rename, it goes to step_000500/
directly. Either way meta.json is written last, by rank 0, once every rank's part is there: a
checkpoint without it is not complete and never used. `latest` is replaced atomically after
that. A save that fails (a full disk) leaves the previous checkpoint and `latest` as they were.
What launcher writes itself is read back without unpickling code (weights_only); a damaged
checkpoint is set aside before any worker starts and the previous complete one is used.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointWriteError, ConfigError
from .fs import warn
from .storage import dcp_reader, is_remote, location, make_dir, move_tree, remove_tree, write_text

STEP_DIR = re.compile(r"step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(ckpt_cfg, run_dir) -> Path:
    """checkpoint.dir, or RUN_DIR/checkpoints: a Path, or a UPath for object storage."""
    return location(ckpt_cfg.dir) if ckpt_cfg.dir else Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / "meta.json").is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path, note=lambda message: None) -> Path | None:
    """The checkpoint `latest` names; if it is missing or incomplete, say so (to `note`) and use the
    newest complete one."""
    complete = complete_checkpoints(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if is_complete(named):
            return named
        note(f"checkpoints/latest names {named.name}, which is missing or incomplete; "
             + (f"using the newest complete checkpoint, {complete[-1].name}" if complete else "no complete checkpoint: starting fresh"))
    return complete[-1] if complete else None


def best_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `best` names (checkpoint.best), if it is complete."""
    pointer = ckpt_dir / "best"
    if not pointer.is_file():
        return None
    named = ckpt_dir / pointer.read_text().strip()
    return named if is_complete(named) else None


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values, so they load with weights_only."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():  # this process's GPU only: a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        device, cuda = torch.cuda.current_device(), state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's, by index
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def save_file(value, path: Path) -> None:
    with path.open("wb") as f:  # a local file or an object
        torch.save(value, f)


def load_safely(path: Path) -> dict:
    """A file of tensors and plain values launcher wrote (a rank's RNG states, a module's
    checkpoint additions), read without running any code it might carry."""
    try:
        with path.open("rb") as f:
            return torch.load(f, weights_only=True)
    except Exception as e:
        raise ConfigError(f"refusing to load {path}: it is not the plain tensors launcher writes ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). It may have been tampered with; delete that "
                          "checkpoint directory, or start afresh with checkpoint.resume=never") from None


# ---------------------------------------------------------------- checking a checkpoint before resuming


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def problems(path: Path) -> list[str]:
    """What is missing or unreadable in a checkpoint that looks complete (empty: intact)."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return [f"meta.json is unreadable ({e})"]
    if meta.get("strategy") == "deepspeed":
        states = list(path.glob("*mp_rank_00_model_states.pt"))
        found = {p.name for p in path.glob("*optim_states.pt")}
        missing = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(meta.get("world_size", 1))
                   if f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" not in found]
        if not states:
            missing.append("mp_rank_00_model_states.pt")
        return [f"{name} is missing" for name in missing] if found or states else ["no DeepSpeed files in it"]
    try:
        metadata = dcp_reader(path).read_metadata()
    except Exception as e:
        return [f".metadata is missing or unreadable ({e.__class__.__name__})"]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    out = []
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            out.append(f"{name} is missing")
        elif file.stat().st_size < size:
            out.append(f"{name} is cut short ({file.stat().st_size} of {size} bytes)")
    return out


def check_loadable(path: Path) -> list[str]:
    """problems(), plus the RNG files read safely (a tampered one raises ConfigError)."""
    found = problems(path)
    if not found:
        for file in sorted(path.glob("rng_*.pt")) + sorted(path.glob("module_extra.pt")):
            load_safely(file)
    return found


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def resume_from(ckpt_cfg, run_dir: Path, world_size: int, may_move: bool) -> Path | None:
    """The one decision of where a run resumes from (checkpoint.resume: auto | never | a path).

    Asked before any worker starts and again by each worker, which get the same answer. An
    explicit checkpoint that is incomplete or damaged is bad input; under `auto` a damaged one is
    passed over for the previous complete one, and where `may_move` (the main process) set aside
    as step_N.damaged (never deleted), with a warning. A DeepSpeed checkpoint of another world
    size is bad input. None: a fresh start.
    """
    how = ckpt_cfg.resume
    if how == "never":
        return None
    if how != "auto":
        path = location(how)
        if not is_complete(path):
            raise ConfigError(f"checkpoint.resume={how} is not a complete checkpoint (a checkpoints/step_NNNNNN "
                              "directory with meta.json in it); use auto, never, or such a directory")
        found = check_loadable(path)
        if found:
            raise ConfigError(f"checkpoint.resume={how} is damaged: {'; '.join(found)}. Resume from an earlier "
                              "checkpoint (checkpoint.resume=<its directory>) or start afresh with checkpoint.resume=never")
        check_world_size(path, world_size)
        return path
    ckpt_dir = checkpoint_dir(ckpt_cfg, run_dir)
    path = latest_checkpoint(ckpt_dir, warn if may_move else lambda message: None)
    while path is not None:
        found = check_loadable(path)
        if not found:
            check_world_size(path, world_size)
            return path
        earlier = [p for p in complete_checkpoints(ckpt_dir) if step_of(p) < step_of(path)]
        if may_move:
            aside = path.with_name(path.name + ".damaged")
            warn(f"checkpoint {path} is damaged ({'; '.join(found)}): moved aside to {aside.name}; "
                 "resuming from the previous complete checkpoint instead")
            move_tree(path, aside)
            if earlier:
                write_text(ckpt_dir / "latest", earlier[-1].name)
            else:
                (ckpt_dir / "latest").unlink(missing_ok=True)
        path = earlier[-1] if earlier else None
    return None


def check_world_size(path: Path, world_size: int) -> None:
    meta = read_meta(path)
    saved = meta.get("world_size", world_size)
    if meta.get("strategy") == "deepspeed" and saved != world_size:
        raise ConfigError(
            f"{path} is a DeepSpeed checkpoint of {saved} ranks, and DeepSpeed cannot re-partition its optimizer "
            f"state for {world_size}: resume with {saved} processes (--nproc {saved}), or start afresh with "
            "checkpoint.resume=never")


def newest_note(ckpt_dir: Path) -> str:
    """Where a rerun resumes, read from the checkpoints directory: for messages that must be true."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return "no checkpoint is saved: the same command starts again from step 0"
    return f"the same command resumes from {path} (step {step_of(path)})"


def kept_note(ckpt_dir: Path) -> str:
    """The checkpoint a failed run leaves for a rerun, read from the checkpoints directory."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return "No checkpoint was saved before it"
    return f"The newest checkpoint, {path} (step {step_of(path)}), is kept: the same command resumes from it"


def write_failure(error: BaseException) -> str | None:
    """The OS error behind a failed save ('No space left on device: .../__1_0.distcp'), or None.
    DCP gathers each rank's exception into one CheckpointException on every rank."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return f"{e.strerror or e}: {e.filename}" if e.filename else (e.strerror or str(e))
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, stack)}
        if isinstance(failures, dict):
            for failure in failures.values():
                todo += [f for f in (failure if isinstance(failure, tuple) else (failure,))
                         if isinstance(f, BaseException)]
    return None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, run_dir: Path, cfg, rank: int):
        self.dir = checkpoint_dir(cfg, run_dir)
        self.cfg, self.rank = cfg, rank
        self.pending = None  # an async save in flight: (upload future, finalize, step, tmp)
        self.staging = None  # its copy of the state, while still in progress in the background
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------ save

    def save(self, step: int, strategy, meta: dict, files: dict | None = None, overlap: bool = True,
             best: bool = False) -> None:
        """Every rank calls this at the same step. best: it is the best so far (`best` names it). `files`:
        {name: tensors and plain values} this rank writes beside its part (a stream's state, a module's
        additions), published with the rest or not at all. Returns once this rank's part is written
        (sync); for an async save, once the copy of the state has started (overlap: wait_staged()
        before the state changes) or completed (not overlap)."""
        self.wait()  # one save in flight at a time
        if step == self.last_saved_step:  # e.g. the end, right after an every_steps save
            return
        self.last_saved_step = step
        final = self.dir / step_dir_name(step)
        # Object storage cannot rename: the save goes where it stays, and meta.json, last, publishes it.
        tmp = final if is_remote(final) else self.dir / (final.name + ".tmp")
        if self.rank == 0:
            remove_tree(tmp)  # the remains of a save cut off earlier (or, remote, a later abandoned timeline's)
        with self.failure_reported(step, tmp):
            if self.rank == 0:
                make_dir(tmp)
            barrier()
            save_file(rng_state(), tmp / f"rng_{self.rank}.pt")
            for name, value in (files or {}).items():
                save_file(value, tmp / name)
            result = strategy.save_checkpoint(tmp, async_save=self.cfg.async_save)

        def finalize() -> None:
            # Rank 0 publishes only after every rank has written its part: for sync
            # saves the barrier says so, for async ones DCP's coordinator writes the
            # metadata last, after gathering every rank's write results.
            if self.rank != 0:
                return
            write_text(tmp / "meta.json", json.dumps(meta))
            if tmp != final:
                if final.exists():  # a later checkpoint of an abandoned timeline (resumed from an earlier one)
                    remove_tree(final)
                os.replace(tmp, final)
            write_text(self.dir / "latest", final.name)
            if best:
                write_text(self.dir / "best", final.name)
            self.prune()

        if result is None:
            barrier()
            finalize()
            barrier()  # nobody reads `latest` or prunes before rank 0 published
            return
        # DCP's response where staging runs in the background, else the upload's future alone.
        self.staging = getattr(result, "staging_completion", None)
        self.pending = (getattr(result, "upload_completion", result), finalize, step, tmp)
        if not overlap:
            self.wait_staged()

    @contextlib.contextmanager
    def failure_reported(self, step: int, tmp: Path):
        """A write that fails (a full disk, a quota, an I/O error) ends the run with a message that
        names the disk and the step; what was saved before stays as it was."""
        try:
            yield
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            reason = write_failure(e)
            if reason is None:
                raise
            if self.rank == 0:
                remove_tree(tmp)  # the partial save: free what it took
            latest = self.dir / "latest"
            kept = f"{self.dir.name}/{latest.read_text().strip()}" if latest.is_file() else "no earlier checkpoint"
            fix = ("Free space on that disk (or set run_dir elsewhere)" if not self.cfg.dir else
                   "Make room there (space, a quota, permissions), or set checkpoint.dir elsewhere")
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written to {self.dir} ({reason}); {kept} and "
                f"{self.dir.name}/latest are untouched. {fix}, then run the same command to resume") from e

    def wait_staged(self) -> None:
        """Called before the weights or the optimizer state change (the optimizer step): an async
        save's copy of them must be complete, so that it holds its own step's state."""
        if self.staging is None:
            return
        staging, self.staging = self.staging, None
        _, _, step, tmp = self.pending
        with self.failure_reported(step, tmp):
            staging.result()

    def wait(self) -> None:
        """Finish an async save in flight (before the next save, and at exit)."""
        self.staging = None  # the upload begins where the copy ends: its end covers both
        if self.pending is None:
            return
        future, finalize, step, tmp = self.pending
        self.pending = None
        with self.failure_reported(step, tmp):
            future.result()
        barrier()
        finalize()
        barrier()

    def mark_finished(self, step: int, after: dict | None = None) -> None:
        """The run ended with this checkpoint and its final validation: a rerun has nothing to do.
        `after`: what meta.json holds once that validation is done (its values, the monitors)."""
        path = self.dir / step_dir_name(step)
        if self.rank == 0 and is_complete(path):
            write_text(path / "meta.json", json.dumps({**read_meta(path), **(after or {}), "finished": True}))

    def mark_best(self, step: int) -> None:
        """The checkpoint of `step`, already saved, turned out the best (the final validation's)."""
        if self.rank == 0 and is_complete(self.dir / step_dir_name(step)):
            write_text(self.dir / "best", step_dir_name(step))
            self.prune()  # the previous best, if keep_last no longer holds it

    def name_best(self, step: int | None) -> None:
        """On a resume: `best` names the best of the resumed timeline (step), or nothing if that one is
        gone, never a later checkpoint of an abandoned one."""
        if self.rank != 0:
            return
        if step is not None and is_complete(self.dir / step_dir_name(step)):
            write_text(self.dir / "best", step_dir_name(step))
        elif (self.dir / "best").is_file():
            (self.dir / "best").unlink()

    def prune(self) -> None:
        keep = set(complete_checkpoints(self.dir)[-self.cfg.keep_last :])
        for name in ("latest", "best"):  # never the ones `latest` and `best` name
            pointer = self.dir / name
            if pointer.is_file():
                keep.add(self.dir / pointer.read_text().strip())
        for path in complete_checkpoints(self.dir):
            if path not in keep:
                remove_tree(path)

    # ------------------------------------------------------------ resume

    def set_aside(self) -> None:
        """A fresh start: move an earlier run's checkpoints out of the way (never delete them),
        so that neither `latest` nor pruning mixes the two runs."""
        if self.rank == 0 and self.dir.is_dir() and any(self.dir.iterdir()):
            move_tree(self.dir, self.dir.with_name(f"{self.dir.name}.{time.time_ns()}"))

    def load_extra(self, path: Path) -> dict:
        """What the module added to the checkpoint (on_save_checkpoint), read safely; {} if nothing."""
        file = path / "module_extra.pt"
        return load_safely(file) if file.is_file() else {}

    def load(self, path: Path, strategy) -> dict:
        """Load model, optimizer and this rank's RNG states; return meta.json."""
        strategy.load_checkpoint(path)
        rng = path / f"rng_{self.rank}.pt"
        if rng.is_file():  # a different world size has no file for the new ranks
            set_rng_state(load_safely(rng))
        return read_meta(path)
