"""--nproc: hand the same command to torch.distributed.run, in this process.

Signals: torchrun's agent (this process) passes SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) on
to the workers, which save at their next step and exit 3, and waits for them (--shutdown-timeout,
dist.timeout_s where torch has it). The workers run in sessions of their own, so a terminal's
Ctrl-C reaches them only this way. A second SIGINT while they save goes to them at once: they stop
without saving (exit 130). What this process then says about checkpoints is read from the disk.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed import DistError
from torch.distributed.elastic.agent.server.api import WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
from torch.distributed.run import get_args_parser, run

from .checkpoint import newest_note
from .errors import BAD_INPUT, DONE, FAILED, STOPPED
from .fs import error, say


@dataclass(frozen=True)
class Elastic:
    """An elastic job's rendezvous (docs/design.md, Elastic jobs): MIN to MAX nodes meet under one id."""

    min_nodes: int
    max_nodes: int
    run_id: str
    conf: str | None = None  # more c10d settings, KEY=VALUE,...


def rdzv_id(endpoint: str) -> str:
    """The id every node of an elastic job derives alike: the SLURM job's, else one from the endpoint
    (its host binds the port: no two jobs running now share one; a path could differ between nodes)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return f"launcher-{hashlib.sha256(endpoint.encode()).hexdigest()[:16]}"


def torchrun_args(worker_argv: list[str], nproc: int, nnodes: int | str, node_rank: int | None,
                  rdzv_endpoint: str | None, max_restarts: int, timeout_s: float = 600,
                  elastic: Elastic | None = None) -> list[str]:
    if elastic is not None:
        nnodes = f"{elastic.min_nodes}:{elastic.max_nodes}"
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", str(max_restarts),
            # SIGUSR1 too (SLURM's preemption warning): the agent passes it on to the workers,
            # which checkpoint at the next step and exit 3.
            # SIGINT is this module's own (Interrupts): a second one must reach the workers at once.
            "--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT,SIGUSR1"]
    if "--shutdown-timeout" in get_args_parser()._option_string_actions:  # torch 2.10+: time to save
        args += ["--shutdown-timeout", str(int(timeout_s))]
    if elastic is not None:
        # The c10d rendezvous: nodes join and leave between rounds. A node waits dist.timeout_s for
        # at least MIN nodes, and for the host at the endpoint (it serves the rendezvous' TCP store)
        # to come up: torch's own read_timeout, 60 s, would end a node started a minute early.
        conf = f"join_timeout={int(timeout_s)},read_timeout={int(timeout_s)}" + (f",{elastic.conf}" if elastic.conf else "")
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", elastic.run_id,
                 "--rdzv-conf", conf]
    elif rdzv_endpoint:
        # Static rendezvous: every node names the same endpoint and its own rank; a node that
        # never arrives ends the wait after dist.timeout_s.
        args += ["--rdzv-endpoint", rdzv_endpoint, "--node-rank", str(node_rank or 0),
                 "--rdzv-conf", f"timeout={int(timeout_s)}"]
    elif nnodes == 1:
        args += ["--standalone"]  # a free local port, nothing to configure
    return args + ["-m", "launcher", "run", *worker_argv]


def spawn(worker_argv: list[str], ckpt_dir: Path, **options) -> int:
    """Start the workers and wait. Returns the exit code for the launcher.

    If the workers that exited on their own all exited with 2 (bad input found
    inside a worker, e.g. a data set smaller than one global batch) or all with 3
    (stopped by a signal after a checkpoint), the launcher exits with that code too.
    Workers the agent terminated after the first exit have negative codes.
    """
    args = get_args_parser().parse_args(torchrun_args(worker_argv, **options))
    os.environ["LAUNCHER_SPAWNED"] = "1"  # the workers leave the stop messages to this process
    if options.get("elastic"):
        # A node that stays rank 0 across rounds does not publish the workers' address in the new
        # round's store when it shares its TCP store with the workers (torch 2.13): a node joining
        # later waits for it forever. Each round's rank 0 then publishes a fresh address.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        LocalElasticAgent._stop_workers = stop_workers_for_a_new_round
        quiet_cpp_warnings()
    set_worker_threads(options["nproc"])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its shutdown notes: ours say it
    interrupts = Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts.handle)
    try:
        run(args)
    except (RendezvousError, DistError) as e:
        if not options.get("elastic"):
            if isinstance(e, RendezvousError):
                raise
            error(f"the {options['nnodes']} nodes did not all meet at {options['rdzv_endpoint']} within "
                  f"{options.get('timeout_s', 600):g} s (dist.timeout_s): start every node with the same --nnodes "
                  f"and --rdzv-endpoint, each with its own --node-rank, and check that the port is reachable from "
                  f"every node ({str(e).splitlines()[0]})")
            return FAILED
        error(elastic_rendezvous_failed(e, ckpt_dir, **options))
        return FAILED
    except SignalException as e:  # this process was signalled and passed it on to the workers
        if interrupts.count > 1:
            say(f"stopped at once by a second SIGINT: {newest_note(ckpt_dir)}")
            return 130
        say(f"stopped by {e.sigval.name}: {newest_note(ckpt_dir)}")
        return STOPPED
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values() if failure.exitcode > 0}
        return codes.pop() if codes in ({BAD_INPUT}, {STOPPED}) else FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
    return DONE


def stop_workers_for_a_new_round(agent, worker_group) -> None:
    """torchrun's own stops a healthy group for a node that joins with 30 s to spare, whatever
    --shutdown-timeout says: too little for a large checkpoint, and the steps since the newest one
    would be redone. A healthy group here gets half the shutdown timeout (dist.timeout_s) to save:
    the node that joined waits dist.timeout_s in all for the round. A failed group, whose ranks may
    wait on a dead peer, still gets 30 s. (Set on the class: this process runs one agent.)"""
    healthy = worker_group.state == WorkerState.HEALTHY
    agent._shutdown(timeout=max(30, getattr(agent, "_shutdown_timeout", 60) // 2) if healthy else 30)


def elastic_rendezvous_failed(e: Exception, ckpt_dir: Path, elastic: Elastic, rdzv_endpoint: str,
                              timeout_s: float, nproc: int, **_) -> str:
    """An elastic job's rendezvous that could not complete: what the job had and needs, and that nothing
    is lost."""
    last = last_world_size(ckpt_dir)
    if connection_closed(e):
        had = f" It last trained on {last // nproc} node(s) (world size {last})." if last else ""
        return (f"lost the rendezvous host {rdzv_endpoint}: the node at that address, which hosts this elastic job's "
                f"rendezvous, went away (its connection closed), and the job cannot go on without it (torchrun has no "
                f"failover for it).{had} Nothing is lost: {newest_note(ckpt_dir)}. Start the job again with the same "
                f"command on every node, the one at {rdzv_endpoint} first")
    if isinstance(e, RendezvousTimeoutError):
        what = f"fewer than {elastic.min_nodes} node(s) met at {rdzv_endpoint} within {timeout_s:g} s (dist.timeout_s)"
    else:
        what = (f"the rendezvous at {rdzv_endpoint} could not be reached: the node at that address hosts it, and it "
                f"has not started, has stopped or finished, or the address is wrong ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0][:160]})")
    had = f"it last trained on {last // nproc} node(s) (world size {last}); " if last else ""
    return (f"this elastic job needs at least {elastic.min_nodes} of at most {elastic.max_nodes} node(s) (--nnodes "
            f"{elastic.min_nodes}:{elastic.max_nodes}), and {what}: {had}this node ({socket.gethostname()}) was one of "
            f"the ones waiting. Nothing is lost: {newest_note(ckpt_dir)}. Start the missing nodes with the same "
            "command (or use a smaller MIN)")


def connection_closed(e: BaseException) -> bool:
    """The rendezvous store's connection was open and broke (its host went away), as opposed to one
    that never opened (the host not up yet, a wrong address): the C++ error is the exception's cause."""
    text = "".join(traceback.format_exception(e, limit=0))  # the messages of the chain, no frames
    return any(s in text for s in ("Failed to recv, got 0 bytes", "Broken pipe", "Connection reset by peer"))


def quiet_cpp_warnings() -> None:
    """When the node hosting the rendezvous goes away, every call to its TCP store logs a C++ warning with
    ~15 lines of stack frames: in this process (the agent's heartbeats and its next rendezvous) and, under
    NCCL, in the workers (the heartbeat monitor's "should dump" check). One line says it instead
    (elastic_rendezvous_failed). C++ errors still print; a TORCH_CPP_LOG_LEVEL of the user's decides."""
    if "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # the workers, which read it when they load torch
    # This process loaded torch already, which read the variable then: set the flag it keeps the level in.
    with contextlib.suppress(OSError, ValueError):
        libc10 = Path(torch.__file__).parent / "lib" / "libc10.so"
        ctypes.c_int.in_dll(ctypes.CDLL(str(libc10)), "FLAGS_caffe2_log_level").value = 2  # ERROR


def last_world_size(ckpt_dir: Path) -> int | None:
    """The world size of the newest checkpoint, if any."""
    from .checkpoint import latest_checkpoint, read_meta

    path = latest_checkpoint(ckpt_dir)
    return read_meta(path).get("world_size") if path is not None else None


class Interrupts:
    """SIGINT in the process that started the workers. The first stops the agent as torchrun's own
    handler would (it passes SIGINT on and waits for the workers to save); a second goes straight to
    the workers, which then stop at once."""

    def __init__(self):
        self.count = 0

    def handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            raise SignalException(f"Process {os.getpid()} got signal: SIGINT", sigval=signal.SIGINT)
        for pid in children():
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def set_worker_threads(nproc: int) -> None:
    """One share of the cores a worker, as torchrun would (it warns when it does it): said once."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    say(f"each of the {nproc} workers uses {threads} CPU thread(s) (OMP_NUM_THREADS={threads}; set it to choose)")


def children(parent: int | None = None) -> list[int]:
    """The live child processes of `parent` (default: this process, whose children are the workers),
    from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry.name))
    return found
