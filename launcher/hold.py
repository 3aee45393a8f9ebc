"""One run per run dir (docs/design.md, One run per run dir).

`launcher run` holds its run dir for as long as it runs: RUN_DIR/.launcher_hold.json, created
exclusively (O_EXCL) by a job's main process (the launching one, or rank 0), names the holder
(host, pid, start time) and its job, and is removed when the command ends. Every process of one job shares one job id (`job_id`), so the nodes of a
multi-node job and the workers under torchrun or srun find the hold theirs and go on, as does a
requeued attempt of a SLURM job. Another job finding it:

- a holder on this host whose pid is gone (SIGKILL, a second Ctrl-C, a hung run the watchdog
  ended): the hold is taken over, with a warning naming the old holder;
- otherwise (alive, or on another host, where the pid cannot be checked): exit 2 before
  anything is written, naming the holder and the fix.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import uuid
from pathlib import Path

from .errors import ConfigError
from .fs import check_writable, is_main_process, warn

HOLD_FILE = ".launcher_hold.json"
JOB_VARIABLE = "LAUNCHER_JOB_ID"  # the launching process's job id, inherited by its workers


def job_id(nproc: int | None, rdzv_endpoint: str | None, environ=None) -> str:
    """The id every process of this job derives alike, and no other job running now."""
    env = os.environ if environ is None else environ
    if env.get(JOB_VARIABLE):  # a worker of `launcher run --nproc`
        return env[JOB_VARIABLE]
    if env.get("SLURM_JOB_ID") and "SLURM_PROCID" in env:  # every task, every requeued attempt
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun's --rdzv-id (a uuid when --standalone)
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    if "RANK" in env and env.get("MASTER_ADDR"):  # another launcher: one job per address and port
        return f"rendezvous:{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}"
    if nproc and rdzv_endpoint:  # the nodes of one multi-node --nproc job name the same endpoint
        return f"rendezvous:{rdzv_endpoint}"
    return f"single:{uuid.uuid4().hex}"


@contextlib.contextmanager
def hold(run_dir: Path, job: str):
    """Hold `run_dir` for this job while the block runs (ConfigError if another job holds it).
    The job's other ranks only look: the process that removes a run dir a bad input leaves
    (the main one) is the one that may have created it. Processes started meanwhile inherit
    the job id."""
    path = Path(run_dir) / HOLD_FILE
    mine = record(job)
    owned = take(path, job, mine, may_take=is_main_process())
    previous = os.environ.get(JOB_VARIABLE)
    os.environ[JOB_VARIABLE] = job
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(JOB_VARIABLE, None)
        else:
            os.environ[JOB_VARIABLE] = previous
        if owned and read(path) == mine:  # not one a later run took over after we lost the run dir
            path.unlink(missing_ok=True)


def record(job: str) -> bytes:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started, "job": job,
                        "attempt": os.environ.get("SLURM_RESTART_COUNT", "0")}) + "\n").encode()


def take(path: Path, job: str, mine: bytes, may_take: bool) -> bool:
    """True: this process now holds the run dir. False: its job does, or (where it may not take
    it) will: only a job's main processes create the hold, and the run dir with it."""
    me = parse(mine)
    while True:
        if may_take and create(path, mine):
            return True
        found = read(path)
        if found is None:  # released meanwhile, or not taken yet
            if may_take:
                continue
            return False
        holder = parse(found)
        if holder.get("job") == job:
            if not may_take or not (dead(holder) or earlier_attempt(holder, me)):
                return False  # another process of this job holds it
            set_aside(path, found)
        elif not dead(holder):
            raise ConfigError(refusal(path, holder))
        elif not may_take:
            return False
        elif set_aside(path, found):  # one of the runs racing for a dead hold says so
            warn(f"{path.parent} was held by {describe(holder)}, which is no longer running: "
                 "this run takes it over")


def create(path: Path, data: bytes) -> bool:
    """Exclusive create: exactly one of the processes racing for the run dir gets True."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if path.parent.is_dir():
            return False
        check_writable(path.parent)  # raises, saying which part of the path is not a directory
        raise
    except OSError as e:
        raise ConfigError(f"run_dir={path.parent} cannot be written ({e.strerror or e}): "
                          "choose another run_dir or fix its permissions") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def read(path: Path) -> bytes | None:
    """The hold's contents, None if there is none. A hold is whole when it ends in a newline:
    one created this instant is given a moment to be written."""
    data = b""
    for _ in range(20):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if data.endswith(b"\n"):
            break
        time.sleep(0.05)
    return data


def parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:  # cut short by a crash, or edited: nobody can be named, so nobody is assumed gone
        return {}
    return holder if isinstance(holder, dict) else {}


def dead(holder: dict) -> bool:
    """The holder's process is gone: only knowable on its own host."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def earlier_attempt(holder: dict, me: dict) -> bool:
    """A hold left by an earlier attempt of this SLURM job: a requeue starts after it ended."""
    if not me["job"].startswith("slurm:"):
        return False
    try:
        return int(holder.get("attempt", 0)) < int(me["attempt"])
    except (TypeError, ValueError):  # edited by hand: not known to be earlier
        return False


def set_aside(path: Path, found: bytes) -> bool:
    """Remove the hold `found`, a dead one, unless another process replaced it meanwhile.
    True: this process removed it."""
    aside = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.old")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another run took it over first
        return False
    if aside.read_bytes() != found:  # that run's live hold, moved by mistake: put it back
        os.rename(aside, path)
        return False
    aside.unlink()
    return True


def describe(holder: dict) -> str:
    if not holder:
        return "a run whose hold cannot be read"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def refusal(path: Path, holder: dict) -> str:
    return (f"run_dir={path.parent} is in use by another run ({describe(holder)}, job {holder.get('job')}): "
            "two runs on one run dir would overwrite each other's checkpoints. Wait for that run to end, stop it, "
            f"or use another run_dir. If that run is gone (its host crashed, or its pid is now another process's), "
            f"delete {path}"
            + (". (The nodes of one job name the same --rdzv-endpoint, so as to share it)"
               if "rendezvous:" in str(holder.get("job")) else ""))
