"""Files and the console: the one atomic write, the writable check, and rank-aware messages.

Everything launcher publishes (checkpoint pointers, meta.json, config.yaml, metrics kept on a
resume, exported weights, job scripts) goes through `replaced_atomically`: written to a temp
file beside the target, flushed to the disk, then renamed over it, so that a crash leaves the
old file or the new one, never half of one.

Messages go to stderr from the job's main process only (`say`, `warn`): a job of 64 ranks
prints each line once. `error` prints once per node, since each node may keep its own log.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from pathlib import Path

from .errors import ConfigError


@contextlib.contextmanager
def replaced_atomically(path: Path):
    """Yields a temp path to write; once written it is fsynced and renamed to `path`. A failure
    removes the temp file and leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def check_writable(path: Path, what: str | None = None, fix: str = "choose another run_dir or fix its permissions") -> None:
    """Can `path` (a directory, perhaps not there yet) be written? Creates nothing: the probe
    file goes in `path` or, if it is not there yet, in its nearest existing parent, so that
    the nodes of a job checking one shared run dir at once cannot trip over each other."""
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a directory")
        probe = existing / f".launcher_write_test_{socket.gethostname()}_{os.getpid()}_{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what or f'run_dir={path}'} cannot be written ({e.strerror or e}): {fix}") from None


# ---------------------------------------------------------------- the console


def global_rank() -> int:
    """This process's rank in the job, from the launch variables: 0 in the launching process and
    in a single process (torchrun and accelerate set RANK, srun SLURM_PROCID)."""
    try:
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    except ValueError:  # a bad RANK is bad input (preflight says so): until then, speak
        return 0


def is_main_process() -> bool:
    return global_rank() == 0


def first_on_node() -> bool:
    """False in the workers of a node other than its first (torchrun and srun number them). LOCAL_RANK
    names a worker's GPU once it has joined (0 in every srun task bound to one GPU): the rank on the
    node is then in LAUNCHER_LOCAL_RANK."""
    return os.environ.get("LAUNCHER_LOCAL_RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == "0"


def say(message: str) -> None:
    """A line for the user, from the job's main process only."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    say(f"warning: {message}")


def error(message: str) -> None:
    """An error every rank meets alike: once per node (each node may keep its own log)."""
    if first_on_node():
        print(f"error: {message}", file=sys.stderr, flush=True)
