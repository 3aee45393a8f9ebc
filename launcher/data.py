"""Sharded, seeded, resumable data loading.

The rule that makes world sizes equivalent (docs/design.md, Batch math): one permutation of
the data per epoch from (seed, epoch), whatever the world size W; rank r takes
every W-th index starting at r, and its micro-batches are consecutive runs of M of
those. Step k then covers exactly positions k*G ... (k+1)*G - 1 of the permutation.

Resuming is exact because the position is derived from the trainer's own step
counter (samples already consumed in the epoch), not from an iterator's state:
it does not depend on num_workers or prefetching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of a run: G = A * M * W."""

    global_batch: int
    micro_batch: int
    world_size: int
    dataset_len: int
    tail: str = "drop"

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        if self.tail == "wrap":
            return -(-self.dataset_len // self.global_batch)
        return self.dataset_len // self.global_batch

    @property
    def per_rank_step(self) -> int:
        return self.accumulation * self.micro_batch


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class ShardedSampler(Sampler[int]):
    """This rank's indices for one epoch, from a given step on."""

    def __init__(self, plan: BatchPlan, rank: int, seed: int, shuffle: bool):
        self.plan, self.rank, self.seed, self.shuffle = plan, rank, seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        plan = self.plan
        perm = epoch_permutation(plan.dataset_len, self.seed, self.epoch, self.shuffle)
        used = plan.steps_per_epoch * plan.global_batch
        if used > len(perm):  # tail: "wrap" fills the last step from the start (again and again)
            perm = perm.repeat(-(-used // len(perm)))
        mine = perm[:used][self.rank :: plan.world_size][self.start_step * plan.per_rank_step :]
        # In chunks: a list of Python ints costs ~6 times the tensor, which matters for token files
        # of many millions of windows.
        return (i for chunk in mine.split(1 << 16) for i in chunk.tolist())

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.per_rank_step


def train_loader(dataset: Dataset, plan: BatchPlan, rank: int, seed: int, shuffle: bool,
                 num_workers: int, collate, pin_memory: bool | str, prefetch_factor: int | None = None) -> DataLoader:
    """The order does not depend on the workers: the sampler runs in this process and the loader
    hands the batches back in sampler order, however many workers load them.

    pin_memory (data.pin_memory): page-locked batches, so that to_device's non_blocking copy runs
    asynchronously; only CUDA has a use for them, which is what "auto" means.
    """
    pin_memory = resolve_pin_memory(pin_memory)
    sampler = ShardedSampler(plan, rank, seed, shuffle)
    workers = num_workers > 0
    return DataLoader(
        dataset, batch_size=plan.micro_batch, sampler=sampler, num_workers=num_workers,
        collate_fn=collate, pin_memory=bool(pin_memory), drop_last=False,
        # Workers start once, not every epoch (set_epoch reaches them through the indices the sampler
        # yields here); torch refuses a prefetch_factor without workers.
        persistent_workers=workers, prefetch_factor=prefetch_factor if workers else None,
    )


def resolve_pin_memory(pin_memory: bool | str) -> bool:
    """data.pin_memory: auto is on exactly with CUDA (the launcher trains on CUDA when it is there)."""
    if pin_memory == "auto":
        return torch.cuda.is_available()
    if pin_memory and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("data.pin_memory=true needs CUDA (page-locked memory only speeds up copies to a GPU): "
                          "set data.pin_memory=auto or false")
    return bool(pin_memory)


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's validation batches as (indices, counts).

    Rank r takes indices r, r+W, ... with no padding, so no sample is counted twice.
    Ranks may then hold different numbers of batches; sharded models (FSDP, ZeRO-3)
    need every rank in every forward, so the short ranks repeat a batch that is
    not counted (counts=False).
    """
    mine = list(range(rank, n, world_size))
    batches = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    most = -(-(-(-n // world_size)) // batch_size)  # ceil(ceil(n / W) / B)
    while len(batches) < most:
        batches.append(((batches[0][0] if batches else [0]), False))
    return batches


class EvalLoader:
    """Iterates (batch, num_samples, counts) for this rank's validation shard."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int,
                 num_workers: int, collate):
        self.plan = eval_batches(len(dataset), batch_size, rank, world_size)
        self.loader = DataLoader(dataset, batch_sampler=[b for b, _ in self.plan],
                                 num_workers=num_workers, collate_fn=collate)

    def __iter__(self):
        for (indices, counts), batch in zip(self.plan, self.loader):
            yield batch, len(indices), counts


def to_device(batch, device: torch.device):
    """Host to device, asynchronous when the batch is pinned (data.pin_memory), else a plain copy.
    Safe: the kernels that read the batch queue behind the copy on the same stream, and torch's pinned
    allocator does not reuse the source until the copy is done."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch
