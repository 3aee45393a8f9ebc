"""--nproc: hand the same command to torch.distributed.run, in this process.

Signals: torchrun's agent (this process) passes SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) on
to the workers, which save at their next step and exit 3, and waits for them (--shutdown-timeout,
dist.timeout_s where torch has it). The workers run in sessions of their own, so a terminal's
Ctrl-C reaches them only this way. A second SIGINT while they save goes to them at once: they stop
without saving (exit 130). What this process then says about checkpoints is read from the disk.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from .checkpoint import newest_note
from .errors import BAD_INPUT, DONE, FAILED, STOPPED
from .fs import error, say


def torchrun_args(worker_argv: list[str], nproc: int, nnodes: int, node_rank: int | None,
                  rdzv_endpoint: str | None, max_restarts: int, timeout_s: float = 600) -> list[str]:
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", str(max_restarts),
            # SIGUSR1 too (SLURM's preemption warning): the agent passes it on to the workers,
            # which checkpoint at the next step and exit 3.
            # SIGINT is this module's own (Interrupts): a second one must reach the workers at once.
            "--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT,SIGUSR1"]
    if "--shutdown-timeout" in get_args_parser()._option_string_actions:  # torch 2.10+: time to save
        args += ["--shutdown-timeout", str(int(timeout_s))]
    if rdzv_endpoint:
        # Static rendezvous: every node names the same endpoint and its own rank; a node that
        # never arrives ends the wait after dist.timeout_s.
        args += ["--rdzv-endpoint", rdzv_endpoint, "--node-rank", str(node_rank or 0),
                 "--rdzv-conf", f"timeout={int(timeout_s)}"]
    elif nnodes == 1:
        args += ["--standalone"]  # a free local port, nothing to configure
    return args + ["-m", "launcher", "run", *worker_argv]


def spawn(worker_argv: list[str], run_dir: Path, **options) -> int:
    """Start the workers and wait. Returns the exit code for the launcher.

    If the workers that exited on their own all exited with 2 (bad input found
    inside a worker, e.g. a data set smaller than one global batch) or all with 3
    (stopped by a signal after a checkpoint), the launcher exits with that code too.
    Workers the agent terminated after the first exit have negative codes.
    """
    args = get_args_parser().parse_args(torchrun_args(worker_argv, **options))
    os.environ["LAUNCHER_SPAWNED"] = "1"  # the workers leave the stop messages to this process
    set_worker_threads(options["nproc"])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its shutdown notes: ours say it
    interrupts = Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts.handle)
    try:
        run(args)
    except DistError as e:  # the rendezvous: a node did not arrive, or the endpoint is unreachable
        error(f"the {options['nnodes']} nodes did not all meet at {options['rdzv_endpoint']} within "
              f"{options.get('timeout_s', 600):g} s (dist.timeout_s): start every node with the same --nnodes and "
              f"--rdzv-endpoint, each with its own --node-rank, and check that the port is reachable from every node "
              f"({str(e).splitlines()[0]})")
        return FAILED
    except SignalException as e:  # this process was signalled and passed it on to the workers
        if interrupts.count > 1:
            say(f"stopped at once by a second SIGINT: {newest_note(run_dir)}")
            return 130
        say(f"stopped by {e.sigval.name}: {newest_note(run_dir)}")
        return STOPPED
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values() if failure.exitcode > 0}
        return codes.pop() if codes in ({BAD_INPUT}, {STOPPED}) else FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
    return DONE


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
