"""--nproc: hand the same command to torch.distributed.run, in this process."""
from __future__ import annotations

from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from .errors import BAD_INPUT, DONE, FAILED, STOPPED
from .fs import error, say


def torchrun_args(worker_argv: list[str], nproc: int, nnodes: int, node_rank: int | None,
                  rdzv_endpoint: str | None, max_restarts: int, timeout_s: float = 600) -> list[str]:
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", str(max_restarts),
            # SIGUSR1 too (SLURM's preemption warning): the agent passes it on to the workers,
            # which checkpoint at the next step and exit 3.
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    if rdzv_endpoint:
        # Static rendezvous: every node names the same endpoint and its own rank; a node that
        # never arrives ends the wait after dist.timeout_s.
        args += ["--rdzv-endpoint", rdzv_endpoint, "--node-rank", str(node_rank or 0),
                 "--rdzv-conf", f"timeout={int(timeout_s)}"]
    elif nnodes == 1:
        args += ["--standalone"]  # a free local port, nothing to configure
    return args + ["-m", "launcher", "run", *worker_argv]


def spawn(worker_argv: list[str], **options) -> int:
    """Start the workers and wait. Returns the exit code for the launcher.

    If the workers that exited on their own all exited with 2 (bad input found
    inside a worker, e.g. a data set smaller than one global batch) or all with 3
    (stopped by a signal after a checkpoint), the launcher exits with that code too.
    Workers the agent terminated after the first exit have negative codes.
    """
    args = get_args_parser().parse_args(torchrun_args(worker_argv, **options))
    try:
        run(args)
    except DistError as e:  # the rendezvous: a node did not arrive, or the endpoint is unreachable
        error(f"the {options['nnodes']} nodes did not all meet at {options['rdzv_endpoint']} within "
              f"{options.get('timeout_s', 600):g} s (dist.timeout_s): start every node with the same --nnodes and "
              f"--rdzv-endpoint, each with its own --node-rank, and check that the port is reachable from every node "
              f"({str(e).splitlines()[0]})")
        return FAILED
    except SignalException as e:  # the launcher itself was signalled; the workers got it too
        say(f"launcher: {e.sigval.name} received; the workers saved a checkpoint. Run the same command to resume.")
        return STOPPED
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values() if failure.exitcode > 0}
        return codes.pop() if codes in ({BAD_INPUT}, {STOPPED}) else FAILED
    return DONE
