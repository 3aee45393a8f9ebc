"""--nproc: hand the same command to torch.distributed.run, in this process."""
from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def torchrun_args(worker_argv: list[str], nproc: int, nnodes: int, node_rank: int | None,
                  rdzv_endpoint: str | None, max_restarts: int) -> list[str]:
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", str(max_restarts)]
    if rdzv_endpoint:
        # Static rendezvous: every node names the same endpoint and its own rank.
        args += ["--rdzv-endpoint", rdzv_endpoint, "--node-rank", str(node_rank or 0)]
    elif nnodes == 1:
        args += ["--standalone"]  # a free local port, nothing to configure
    return args + ["-m", "launcher", "run", *worker_argv]


def spawn(worker_argv: list[str], **options) -> int:
    """Start the workers and wait. Returns the exit code for the launcher.

    If every failed worker exited with 2 (bad input found inside a worker, e.g. a
    data set smaller than one global batch) the launcher exits with 2 too.
    """
    args = get_args_parser().parse_args(torchrun_args(worker_argv, **options))
    try:
        run(args)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        return 2 if codes == {2} else (3 if codes == {3} else 1)
    return 0
