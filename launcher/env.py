"""Who am I: torchrun / accelerate, SLURM srun, or a single process.

Detection order: torchrun-style variables first (torchrun, torch elastic and
`accelerate launch` all set RANK/WORLD_SIZE/LOCAL_RANK), so a torchrun started
inside a SLURM job is torchrun; then SLURM srun with one task per worker; else a
single process.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError
from .watchdog import COLLECTIVE_GRACE_S


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    # One srun task per worker. (A batch script's own shell also has these variables:
    # start workers with srun, as `launcher slurm` writes it.)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ntasks = int(env["SLURM_NTASKS"])
        nodes = max(1, int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1))))
        return DistEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=tasks_on_this_node(env, ntasks // nodes),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0"))),
        )
    return DistEnv(launcher="single")


def tasks_on_this_node(env, default: int) -> int:
    """SLURM_TASKS_PER_NODE reads "4(x2),3": 4 tasks on each of 2 nodes, then 3 on one."""
    counts = []
    for part in env.get("SLURM_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "")).split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return default
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else default


def slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike, spread so that jobs sharing a node differ."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        return nodelist
    prefix, _, ranges = first.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def device_for(env: DistEnv) -> torch.device:
    """This process's device: GPU local_rank of those it sees (under srun with one GPU bound per task,
    that one); refused where the node has more processes than GPUs, since two ranks on one GPU fail
    in NCCL. The CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.launcher == "slurm" and count == 1:
        # srun --gpus-per-task=1 / --gpu-bind: each task sees its own GPU, as device 0
        return torch.device("cuda", 0)
    if env.local_world_size > count or env.local_rank >= count:  # every process of the node refuses alike
        raise ConfigError(too_few_gpus(max(env.local_world_size, env.local_rank + 1), count))
    return torch.device("cuda", env.local_rank)


def check_gpus(nproc_per_node: int) -> None:
    """Before any worker starts: one GPU for each process of this node. A no-op without CUDA."""
    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise ConfigError(too_few_gpus(nproc_per_node, torch.cuda.device_count()))


def too_few_gpus(processes: int, gpus: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{processes} processes on this node but only {gpus} GPU(s) visible"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + ": each process needs a GPU of its own (two on one GPU fail in NCCL with 'Duplicate GPU "
            f"detected'). Lower --nproc (or srun's tasks per node) to {gpus}, or make more GPUs visible "
            "(CUDA_VISIBLE_DEVICES)")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, with gloo beside it for CPU tensors (the norm of FSDP's CPU-offloaded
    gradients, the fp16 scaler's checks of them); gloo on the CPU."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


_store: dist.Store | None = None  # the rendezvous store of this process's group, once joined


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float) -> None:
    """Join the group (NCCL and gloo with CUDA, gloo on the CPU: backend_for); a no-op for one process.

    Collectives time out a grace period after dist.timeout_s, so that the watchdog's
    report of a stalled rank (launcher/watchdog.py) comes before a bare backend error.
    """
    global _store
    if not env.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # LOCAL_RANK is the device this process uses (DeepSpeed calls set_device(LOCAL_RANK)): under srun
    # with one GPU per task that is 0, not SLURM_LOCALID. LAUNCHER_LOCAL_RANK keeps the rank on the node.
    local = device.index if device.type == "cuda" else env.local_rank
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(local),
                      LAUNCHER_LOCAL_RANK=str(env.local_rank))
    _store = rendezvous_store(env, timeout_s)
    dist.init_process_group(
        backend=backend_for(device),
        store=_store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s + COLLECTIVE_GRACE_S),
        device_id=device if device.type == "cuda" else None,
    )


def rendezvous() -> dist.Store | None:
    return _store


def rendezvous_store(env: DistEnv, timeout_s: float) -> dist.Store:
    """The key-value store the ranks meet in.

    Under torchrun the agent hosts it (TORCHELASTIC_USE_AGENT_STORE) and keeps it
    across restarts of the worker group, so each attempt gets a prefix of its own:
    otherwise restarted workers read the dead workers' addresses and fail to connect.
    Elsewhere (srun) rank 0 hosts it.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, world_size=env.world_size,
                          is_master=env.rank == 0 and not agent_hosts, timeout=timedelta(seconds=timeout_s))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"launcher/attempt_{attempt}", store)


def ensure_process_group(device: torch.device) -> None:
    """FSDP and DeepSpeed need a process group even for one process: join a private one of size 1."""
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # init_process_group joins the real group first
        raise RuntimeError("a distributed run reached the strategy before its process group was initialised")
    dist.init_process_group(backend=backend_for(device), store=dist.HashStore(),
                            rank=0, world_size=1, device_id=device if device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place; t itself on one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
