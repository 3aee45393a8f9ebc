"""The batch math of a run (docs/design.md, Batch math): G = A * M * W.

The user fixes the global batch G; the micro batch M is the largest within
train.micro_batch_size that makes the accumulation A = G / (M * W) whole at world size W.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class BatchSizes:
    """G, M and W of a run, and what follows from them."""

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


def batch_sizes(cfg, world_size: int, dataset_len: int | None = None) -> BatchSizes:
    """train.micro_batch_size is the most one device holds: the micro batch is the largest M within
    it that makes A whole. Raises ConfigError when no micro batch can serve G at this world size, or
    when the training set holds less than one global batch."""
    G, W = cfg.train.global_batch_size, world_size
    if G % W:
        glob = sorted({max(W, (G // W + d) * W) for d in (0, 1)})
        raise ConfigError(
            f"train.global_batch_size={G} cannot be split evenly over {W} processes, whatever the micro batch: "
            f"set it to a multiple of the world size, such as {' or '.join(map(str, glob))}"
        )
    most = min(cfg.train.micro_batch_size or G // W, G // W)
    M = max(m for m in range(1, most + 1) if (G // W) % m == 0)
    sizes = BatchSizes(G, M, W, dataset_len or 0, cfg.data.tail)
    if dataset_len is not None and sizes.steps_per_epoch == 0:
        raise ConfigError(
            f"train.global_batch_size={G} is larger than the training set ({dataset_len} samples): "
            f"lower it, or set data.tail=wrap"
        )
    return sizes


def total_steps(cfg, sizes: BatchSizes) -> int | None:
    """The run's length in optimizer steps; None where it is not known in advance (train.epochs of a
    stream without len(): it becomes known when the last pass ends)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return cfg.train.epochs * sizes.steps_per_epoch if sizes.steps_per_epoch else None


def describe_batch(cfg, sizes: BatchSizes) -> str:
    ranks = (f"{sizes.world_size} data-parallel ranks (each a TP group of {cfg.tp.size})" if cfg.tp.size > 1
             else f"{sizes.world_size} ranks")
    text = f"global batch {sizes.global_batch} = micro {sizes.micro_batch} x {ranks} x {sizes.accumulation} accumulation"
    asked = cfg.train.micro_batch_size
    if asked and asked != sizes.micro_batch:
        text += (f" (train.micro_batch_size={asked} is the most a device holds; {sizes.micro_batch} makes the "
                 "accumulation whole)")
    return text
