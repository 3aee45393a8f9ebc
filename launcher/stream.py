"""Streaming data: a recipe's data() may return torch.utils.data.IterableDataset objects.

The rule (docs/design.md, Streaming data) is the map-style one with the stream's own order in
place of the permutation: step k of an epoch consumes stream positions k*G ... (k+1)*G - 1,
rank r takes every W-th of them starting at r, and its micro-batches are consecutive runs of
M of those. An epoch is one pass; a step that the pass cannot fill is dropped.

A stream is read whole by every rank, unless its class says `shards_by_rank = True`: then, in
rank r's process, it yields exactly positions r, r+W, r+2W, ... and nothing else.

With data.num_workers = K, each worker reads the (rank's) stream and yields micro-batches
b, b+K, ... of it; the DataLoader hands worker outputs back round-robin, so the batches are
those of K = 0.

Resume: the position is (epoch, step at which it began), kept in meta.json. A stream with
state_dict() / load_state_dict() is restored from the state it had at the checkpoint's step
(a per-rank file beside the checkpoint's shards); any other is fast-forwarded by re-reading
and discarding what the epoch had consumed.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .checkpoint import load_safely
from .data import EvalLoader, MapData, resolve_pin_memory
from .errors import ConfigError
from .fs import say


def is_stream(dataset) -> bool:
    return isinstance(dataset, IterableDataset)


def shards_by_rank(dataset) -> bool:
    return getattr(dataset, "shards_by_rank", False) is True


def is_stateful(dataset) -> bool:
    """torchdata's Stateful protocol."""
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def stream_length(dataset) -> int | None:
    """Samples in one pass of the whole stream (all ranks together), or None if it does not say."""
    try:
        return len(dataset)
    except (TypeError, NotImplementedError):
        return None


def train_length(cfg, dataset, say=None) -> int | None:
    """The length the batch sizes are built on. A stream without len() is as long as the run with
    train.max_steps; without it the length is unknown (None): train.epochs passes, each ending where
    the stream ends, found as it is read."""
    if not is_stream(dataset):
        return len(dataset)
    G = cfg.train.global_batch_size
    if cfg.data.tail == "wrap":
        raise ConfigError("data.tail=wrap needs a map-style training set: a stream's last partial global batch "
                          "of each pass is dropped. Set data.tail=drop")
    if say and "shuffle" in cfg.data.model_fields_set and cfg.data.shuffle:
        say("note: data.shuffle does not apply to a stream: it is read in its own order (a set_epoch(epoch) "
            "method lets it reshuffle each pass)")
    n = stream_length(dataset)
    if n is None:
        return cfg.train.max_steps * G if cfg.train.max_steps else None
    if n < G:
        raise ConfigError(f"train.global_batch_size={G} is larger than one pass of the training stream "
                          f"(len() says {n} samples): lower it")
    return n


# ---------------------------------------------------------------- reading (in each DataLoader worker)


class Reader(IterableDataset):
    """What each DataLoader worker (or, without workers, the main process) runs over the stream.

    It reads the stream in groups of `group` positions, keeps this rank's (every `world`-th from
    `rank`, or all of a self-sharding stream's), collates them into units of `unit` and yields
    this worker's units (every K-th) as (batch, samples, state). Training: a group is one step,
    a unit a micro-batch, and a group the stream cannot fill ends the epoch. Validation: a group
    is one round (a batch for each rank); a rank with nothing in the last round gets a filler
    (samples 0) read from the round, so every rank runs every forward.
    """

    def __init__(self, dataset, rank: int, world: int, group: int, unit: int, collate, *, whole: bool,
                 epoch: int | None = None, skip: int = 0, state=None, limit: int | None = None):
        self.dataset, self.rank, self.world, self.group, self.unit = dataset, rank, world, group, unit
        self.collate = collate or default_collate
        self.whole, self.epoch, self.skip, self.state, self.limit = whole, epoch, skip, state, limit
        self.sharded = shards_by_rank(dataset)
        self.stateful = whole and is_stateful(dataset)  # training only: validation always starts afresh

    def __iter__(self):
        info = get_worker_info()
        me, workers = (info.id, info.num_workers) if info else (0, 1)
        ds = self.dataset  # a worker's own copy, or the main process's object
        if self.epoch is not None and callable(getattr(ds, "set_epoch", None)):
            ds.set_epoch(self.epoch)
        if self.state is not None:
            ds.load_state_dict(self.state)
        it = iter(ds)
        try:
            # Fast-forward: what the epoch consumed before the checkpoint is read again and dropped.
            if self.skip and sum(1 for _ in itertools.islice(it, self.skip)) < self.skip:
                raise ConfigError(f"the training stream ended before the {self.skip} positions a resumed run must "
                                  "skip: it is shorter than when the checkpoint was saved")
            first, stride = (0, 1) if self.sharded else (self.rank, self.world)
            units = 0
            for g in itertools.count():
                if self.limit is not None and g == self.limit:
                    return
                group = list(itertools.islice(it, self.group))
                if not group or (self.whole and len(group) < self.group):
                    return
                mine = group[first::stride]
                chunks = [mine[i : i + self.unit] for i in range(0, len(mine), self.unit)] or [None]
                last = units + len(chunks) - 1
                # The state at this step's end rides on its last micro-batch: taken here, in the
                # process whose copy of the stream has read exactly this far.
                state = ds.state_dict() if self.stateful and last % workers == me else None
                for chunk in chunks:
                    if units % workers == me:
                        if chunk is None:
                            yield self.collate(group[: self.unit]), 0, None
                        else:
                            yield self.collate(chunk), len(chunk), state if units == last else None
                    units += 1
        finally:
            close = getattr(it, "close", None)  # a generator's own clean-up, now rather than at collection
            if close is not None:
                close()


def loader(reader: Reader, num_workers: int, pin_memory: bool = False, prefetch_factor: int | None = None):
    workers = num_workers > 0
    return DataLoader(reader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch_factor if workers else None)


_group = None  # gloo: the agreements below are on the CPU, whatever the training backend


def agree(value: int, op) -> int:
    """value reduced over the ranks (op: MIN or MAX); value itself on one process."""
    global _group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    if _group is None:
        _group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=op, group=_group)
    return int(t.item())


# ---------------------------------------------------------------- training


class StreamData:
    """The training stream, epoch by epoch, behind the train-data interface of data.MapData."""

    def __init__(self, dataset, sizes, rank: int, num_workers: int, collate, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        self.dataset, self.sizes, self.rank = dataset, sizes, rank
        self.num_workers, self.collate, self.pin_memory, self.prefetch_factor = (num_workers, collate, pin_memory,
                                                                                 prefetch_factor)
        self.sharded = shards_by_rank(dataset)
        self.known = stream_length(dataset) is not None  # then an epoch is sizes.steps_per_epoch steps
        self.epoch, self.epoch_start = 0, 0  # the epoch being read, and the step it began at
        self.state = None  # the stream's state at the resumed step, if it was restored
        self.current: StreamEpoch | None = None

    def epoch_from(self, step: int):
        """(epoch, batches, steps) from `step` on, as data.MapData.epoch_from."""
        if self.current is not None and self.current.finished:
            self.epoch, self.epoch_start = self.epoch + 1, step
        sizes, offset = self.sizes, step - self.epoch_start
        per_step = sizes.per_rank_step if self.sharded else sizes.global_batch  # positions this rank reads a step
        reader = Reader(self.dataset, self.rank, sizes.world_size, per_step, sizes.micro_batch, self.collate,
                        whole=True, epoch=self.epoch, skip=0 if self.state is not None else offset * per_step,
                        state=self.state, limit=sizes.steps_per_epoch - offset if self.known else None)
        self.state = None
        self.current = StreamEpoch(iter(loader(reader, self.num_workers, self.pin_memory, self.prefetch_factor)),
                                   sizes.accumulation, reader.limit, self.sharded and sizes.world_size > 1, offset)
        return self.epoch, self.current, self.current.steps()

    def done(self, step: int) -> bool:
        """Has the epoch being read ended at `step`, as far as read?"""
        if self.current is not None and self.current.finished:
            return True
        return self.known and step - self.epoch_start >= self.sizes.steps_per_epoch

    def epoch_done(self, step: int) -> bool:
        """Has the epoch ended at `step`? Without a length, found by reading ahead: no whole step follows."""
        return self.done(step) or (self.current is not None and not self.current.has_step())

    def last_epoch(self, step: int) -> int:
        """The epoch of the last step read: known as the stream is read (its passes need not be whole steps)."""
        return self.epoch

    def describe(self) -> str:
        return f"{self.sizes.steps_per_epoch} an epoch" if self.known else "an epoch a pass of the stream"

    def checkpoint(self, step: int) -> tuple[dict, dict]:
        """(what meta.json keeps of the stream, {file name: state} for this rank to save beside its part):
        a stateful stream's state at `step` (one file for all ranks, rank 0's, when every rank reads the
        whole stream). It is published with the rest of the checkpoint or not at all."""
        if self.done(step):
            return {"epoch": self.epoch + 1, "epoch_start": step}, {}
        meta = {"epoch": self.epoch, "epoch_start": self.epoch_start}
        state = self.state
        if self.current is not None:
            state = self.current.state_at(step - self.epoch_start)
        if state is None or (self.rank != 0 and not self.sharded):
            return meta, {}
        return meta, {f"stream_{self.rank}.pt": state}

    def restore(self, step: int, meta: dict, path: Path) -> None:
        """Where the resumed epoch stands, and the stream's state if it was saved (else fast-forward)."""
        saved = meta.get("stream")
        if saved is not None:
            self.epoch, self.epoch_start = saved["epoch"], saved["epoch_start"]
        elif self.known:
            self.epoch = step // self.sizes.steps_per_epoch
            self.epoch_start = self.epoch * self.sizes.steps_per_epoch
        file = path / f"stream_{self.rank if self.sharded else 0}.pt"
        # A self-sharding stream's state is its rank's part at the saving world size: elsewhere, fast-forward.
        same_parts = not self.sharded or meta.get("world_size") == self.sizes.world_size
        if step > self.epoch_start and is_stateful(self.dataset) and same_parts and file.is_file():
            self.state = load_safely(file)
            how = "restored its state"
        else:
            per_step = self.sizes.per_rank_step if self.sharded else self.sizes.global_batch
            how = f"fast-forwarding {(step - self.epoch_start) * per_step} positions"
        if self.rank == 0 and step > self.epoch_start:
            say(f"training stream: epoch {self.epoch}, step {step - self.epoch_start} of it: {how}")


class StreamEpoch:
    """One epoch of the training stream as the loop reads it: micro-batches for train_step, and
    whether another whole step follows. When each rank reads only its own part, the ranks agree
    on that (one small CPU all-reduce a step): a step runs only if every rank can fill its share."""

    def __init__(self, batches, accumulation: int, limit: int | None, agree_ranks: bool, offset: int):
        self.batches, self.A, self.limit, self.agree_ranks, self.offset = batches, accumulation, limit, agree_ranks, offset
        self.peeked = None
        self.handed = self.steps_done = 0
        self.more: bool | None = None  # is there a next step (None: not looked yet)
        self.finished = False
        self.state, self.state_steps = None, -1  # the stream's state after `state_steps` steps of this epoch

    def __iter__(self):
        return self

    def __next__(self):
        item, self.peeked = (self.peeked or next(self.batches)), None
        batch, _, state = item
        self.handed += 1
        if self.handed % self.A == 0:
            self.steps_done += 1
            self.more = None
            if state is not None:
                self.state, self.state_steps = state, self.offset + self.steps_done
        return batch

    def state_at(self, steps: int):
        return self.state if self.state_steps == steps else None

    def steps(self):
        while self.has_step():
            yield

    def has_step(self) -> bool:
        if self.more is None:
            self.more = self.look()
            self.finished = not self.more
        return self.more

    def look(self) -> bool:
        if self.limit is not None and self.steps_done >= self.limit:
            return False
        if self.peeked is None:
            self.peeked = next(self.batches, None)  # a step's micro-batches come all or none
        mine = self.peeked is not None
        if (agree(int(mine), dist.ReduceOp.MIN) if self.agree_ranks else mine):
            return True
        self.peeked = None  # part of a step some rank cannot fill: dropped with the rest of the pass
        if self.limit is not None:
            raise ConfigError(f"the training stream ended {self.limit - self.steps_done} step(s) before the end of "
                              "the pass its len() promises: make __len__ the samples of one pass of the whole stream, "
                              "or remove it")
        if self.offset == 0 and self.steps_done == 0:
            raise ConfigError("a pass of the training stream holds less than one global batch: lower "
                              "train.global_batch_size, or check that the stream yields anything")
        return False


# ---------------------------------------------------------------- validation


class EvalStream:
    """(batch, num_samples, counts) for this rank's share of a validation stream, as data.EvalLoader:
    rank r takes every W-th item (no sample counted twice, none dropped), and a rank with fewer
    batches runs a filler that is not counted, so sharded models see every rank in every forward."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, num_workers: int, collate):
        self.sharded = shards_by_rank(dataset)
        group = batch_size if self.sharded else batch_size * world_size
        self.loader = loader(Reader(dataset, rank, world_size, group, batch_size, collate, whole=False), num_workers)
        self.rank, self.agree_ranks = rank, self.sharded and world_size > 1

    def __iter__(self):
        if not self.agree_ranks:  # every rank reads the whole stream: they run the same rounds
            for batch, n, _ in self.loader:
                yield batch, n, n > 0
            return
        it, first, left = iter(self.loader), None, True
        while True:
            item = next(it, None) if left else None
            left = item is not None
            if not agree(int(left), dist.ReduceOp.MAX):
                return
            if left:
                first = first or item
                yield item[0], item[1], True
            elif first is None:
                raise ConfigError(f"rank {self.rank}'s part of the validation stream is empty, but every rank needs a "
                                  "batch while another still has one (sharded models run every forward on every rank): "
                                  "use a longer validation stream or fewer processes")
            else:
                yield first[0], first[1], False


# ---------------------------------------------------------------- the one entry for both kinds


def train_data(dataset, sizes, rank: int, cfg, collate, device):
    """The training data the loop holds: a stream (StreamData) or a map-style set (data.MapData),
    which answer the same calls."""
    if is_stream(dataset):
        return StreamData(dataset, sizes, rank, cfg.data.num_workers, collate,
                          resolve_pin_memory(cfg.data.pin_memory), cfg.data.prefetch_factor)
    return MapData(dataset, sizes, rank, cfg.data, cfg.train.seed, collate)


def eval_data(dataset, batch_size: int, rank: int, world_size: int, num_workers: int, collate):
    """(batch, samples, counts) for this rank's share of the validation set, stream or map-style."""
    kind = EvalStream if is_stream(dataset) else EvalLoader
    return kind(dataset, batch_size, rank, world_size, num_workers, collate)
