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

import copy
import dataclasses
from collections import UserDict
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch import BatchSizes
from .errors import ConfigError


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class ShardedSampler(Sampler[int]):
    """This rank's indices for one epoch, from a given step on."""

    def __init__(self, sizes: BatchSizes, rank: int, seed: int, shuffle: bool):
        self.sizes, self.rank, self.seed, self.shuffle = sizes, rank, seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        sizes = self.sizes
        perm = epoch_permutation(sizes.dataset_len, self.seed, self.epoch, self.shuffle)
        used = sizes.steps_per_epoch * sizes.global_batch
        if used > len(perm):  # tail: "wrap" fills the last step from the start (again and again)
            perm = perm.repeat(-(-used // len(perm)))
        mine = perm[:used][self.rank :: sizes.world_size][self.start_step * sizes.per_rank_step :]
        # In chunks: a list of Python ints costs ~6 times the tensor, which matters for token files
        # of many millions of windows.
        return (i for chunk in mine.split(1 << 16) for i in chunk.tolist())

    def __len__(self) -> int:
        return (self.sizes.steps_per_epoch - self.start_step) * self.sizes.per_rank_step


def train_loader(dataset: Dataset, sizes: BatchSizes, rank: int, seed: int, shuffle: bool,
                 num_workers: int, collate, pin_memory: bool | str, prefetch_factor: int | None = None) -> DataLoader:
    """The order does not depend on the workers: the sampler runs in this process and the loader
    hands the batches back in sampler order, however many workers load them.

    pin_memory (data.pin_memory): page-locked batches, so that to_device's non_blocking copy runs
    asynchronously; only CUDA has a use for them, which is what "auto" means.
    """
    pin_memory = resolve_pin_memory(pin_memory)
    sampler = ShardedSampler(sizes, rank, seed, shuffle)
    workers = num_workers > 0
    return DataLoader(
        dataset, batch_size=sizes.micro_batch, sampler=sampler, num_workers=num_workers,
        collate_fn=collate, pin_memory=bool(pin_memory), drop_last=False,
        # Workers start once, not every epoch (set_epoch reaches them through the indices the sampler
        # yields here); torch refuses a prefetch_factor without workers.
        persistent_workers=workers, prefetch_factor=prefetch_factor if workers else None,
    )


class MapData:
    """A map-style training set behind the train-data interface the loop holds (stream.StreamData
    answers the same): epochs of a known number of steps, the position derived from the step."""

    def __init__(self, dataset: Dataset, sizes: BatchSizes, rank: int, data_cfg, seed: int, collate):
        self.sizes = sizes
        self.loader = train_loader(dataset, sizes, rank, seed, data_cfg.shuffle, data_cfg.num_workers, collate,
                                   pin_memory=data_cfg.pin_memory, prefetch_factor=data_cfg.prefetch_factor)

    def epoch_from(self, step: int):
        """(epoch, batches, steps) from `step` on: the loop draws micro-batches from `batches` for each
        of `steps`, which runs out at the epoch's end."""
        epoch, start = divmod(step, self.sizes.steps_per_epoch)
        self.loader.sampler.set_epoch(epoch, start)
        return epoch, iter(self.loader), range(start, self.sizes.steps_per_epoch)

    def epoch_done(self, step: int) -> bool:
        """Has an epoch ended at `step`?"""
        return step % self.sizes.steps_per_epoch == 0

    def last_epoch(self, step: int) -> int:
        """The epoch of the step before `step`."""
        return max(0, step - 1) // self.sizes.steps_per_epoch

    def describe(self) -> str:
        return f"{self.sizes.steps_per_epoch} an epoch"

    def checkpoint(self, step: int) -> tuple[dict | None, dict]:
        """(what meta.json keeps of the data's position, files for this rank to save beside its
        part of the checkpoint): nothing, the step says it all."""
        return None, {}

    def restore(self, step: int, meta: dict, path) -> None:
        """Nothing to restore: epoch_from(step) finds the position."""


def resolve_pin_memory(pin_memory: bool | str) -> bool:
    """data.pin_memory: auto is on exactly with CUDA (the launcher trains on CUDA when it is there)."""
    if pin_memory == "auto":
        return torch.cuda.is_available()
    if pin_memory and not torch.cuda.is_available():
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
        self.batches = eval_batches(len(dataset), batch_size, rank, world_size)
        self.loader = DataLoader(dataset, batch_sampler=[b for b, _ in self.batches],
                                 num_workers=num_workers, collate_fn=collate)

    def __iter__(self):
        for (indices, counts), batch in zip(self.batches, self.loader):
            yield batch, len(indices), counts


def to_device(batch, device: torch.device):
    """Host to device, asynchronous when the batch is pinned (data.pin_memory), else a plain copy.
    Safe: the kernels that read the batch queue behind the copy on the same stream, and torch's pinned
    allocator does not reuse the source until the copy is done.

    Containers keep their type: mappings (a BatchEncoding, an OrderedDict; another Mapping becomes a
    dict), dataclasses, named tuples, lists and tuples."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict or not isinstance(batch, (dict, UserDict)):
            return moved
        new = copy.copy(batch)  # the same type, with its other attributes (a BatchEncoding's encodings)
        for k, v in moved.items():
            new[k] = v
        return new
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch
