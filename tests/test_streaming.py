"""Streaming data sets (docs/design.md, Streaming data): the order rule at any world size, streams
that read only their rank's part, loader workers, exact resume both ways, validation streams.

The toy recipe (TOY, written to a file per test) streams samples that carry their position and
epoch, and logs what each process read and what each rank trained on, so the rule can be checked
position by position. Tolerances are test_distributed.py's: runs differ only in the order float32
sums are taken.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from helpers import check, losses, max_rel, metrics, run, write_config
from launcher import stream
from launcher.batch import BatchSizes

LOSS_RTOL = 1e-5

TOY = '''
"""A toy stream: at position p of pass e, a sample made from (p, e); logs reads and trained positions."""
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import IterableDataset


@dataclass
class Config:
    n: Optional[int] = 100        # samples a pass; None: endless
    has_len: bool = False         # __len__ (the whole stream's)
    sharded: bool = False         # shards_by_rank: reads only this rank's positions
    stateful: bool = False        # state_dict() / load_state_dict()
    val_n: int = 0                # validation stream samples (0: none)
    dim: int = 8


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Stream(IterableDataset):
    def __init__(self, cfg, n, split):
        self.cfg, self.n, self.split, self.epoch = cfg, n, split, 0
        self.k = 0  # the next index into this process's sequence
        self.resume = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def part(self):
        return 0, 1

    def sample(self, pos):
        n = self.n or 10**9
        sid = (pos * 37 + self.epoch * 11) % n + (10**6 if self.split == "val" else 0)  # reshuffled each pass
        x = torch.sin(torch.arange(self.cfg.dim) * 0.37 * (sid % 997 + 1) + sid)
        return {"x": x, "y": x[:3].sum(0, keepdim=True) - 0.5 * x[3:].sum(0, keepdim=True), "pos": pos,
                "epoch": self.epoch}

    def __iter__(self):
        first, stride = self.part()
        self.k, self.resume = (self.resume or 0), None
        log = None
        if RECORD and self.split == "train":
            log = open(os.path.join(RECORD, f"reads_{rank_world()[0]}_{os.getpid()}.txt"), "a", buffering=1)
        while self.n is None or first + self.k * stride < self.n:
            pos = first + self.k * stride
            self.k += 1
            if log:
                log.write(f"{self.epoch} {pos}\\n")
            yield self.sample(pos)


class Sharded(Stream):
    shards_by_rank = True

    def part(self):
        return rank_world()


class Sized:
    def __len__(self):
        return self.n


class Stateful:
    def state_dict(self):
        return {"k": self.k, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.resume = state["k"]


KINDS = {}
for sharded in (False, True):
    for sized in (False, True):
        for stateful in (False, True):
            name = "Toy" + "Sharded" * sharded + "Sized" * sized + "Stateful" * stateful
            bases = ((Stateful,) if stateful else ()) + ((Sized,) if sized else ()) + (Sharded if sharded else Stream,)
            KINDS[sharded, sized, stateful] = globals()[name] = type(name, bases, {})


RECORD = os.environ.get("TOY_RECORD")  # a directory for the logs


def data(cfg):
    cls = KINDS[cfg.sharded, cfg.has_len, cfg.stateful]
    return cls(cfg, cfg.n, "train"), (KINDS[cfg.sharded, False, False](cfg, cfg.val_n, "val") if cfg.val_n else None)


def model(cfg):
    return nn.Linear(cfg.dim, 1)


def loss(model, batch):
    if model.training and RECORD:
        with open(os.path.join(RECORD, f"consumed_{rank_world()[0]}.jsonl"), "a") as f:
            f.write(json.dumps([batch["epoch"].tolist(), batch["pos"].tolist()]) + "\\n")
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def metrics(model, batch):
    return {"mean_pos": (batch["pos"].sum().double(), batch["pos"].numel())}  # each sample counted once?
'''


def toy_config(tmp_path, name, recipe=None, **sections):
    """The toy at G=16; micro batch 4 (accumulation 4 on one process, 2 on two)."""
    record = tmp_path / name / "record"
    record.mkdir(parents=True, exist_ok=True)
    toy = tmp_path / "toy_stream.py"
    toy.write_text(TOY)
    config = {
        "recipe": {"name": str(toy), **(recipe or {})},
        "run_dir": str(tmp_path / name / "run"),
        "train": {"global_batch_size": 16, "micro_batch_size": 4, "max_steps": 15, "log_every_steps": 1, "seed": 0},
        "optim": {"name": "adamw", "lr": 1e-2},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path / f"{name}.yaml", config), tmp_path / name


def toy_run(tmp_path, name, nproc=1, recipe=None, **sections):
    cfg, where = toy_config(tmp_path, name, recipe, **sections)
    toy_launch(cfg, where, nproc)
    return where


def toy_launch(cfg, where, nproc=1):
    return check(run(["run", cfg] + (["--nproc", nproc] if nproc > 1 else []), env={"TOY_RECORD": str(where / "record")}))


def by_step(where):
    rows = metrics(where / "run")[0]
    return {r["step"]: r["loss"] for r in rows}


def consumed(where, rank):
    """[(epoch, positions)] per micro-batch this rank trained on, in order."""
    out = []
    for line in (where / "record" / f"consumed_{rank}.jsonl").read_text().splitlines():
        epochs, positions = json.loads(line)
        out.append((epochs[0] if len(set(epochs)) == 1 else epochs, positions))
    return out


def reads(where, rank):
    """{pid: [(epoch, pos)]} of what each process of this rank read from the training stream."""
    out = {}
    for file in sorted((where / "record").glob(f"reads_{rank}_*.txt")):
        out[file.stem] = [tuple(map(int, line.split())) for line in file.read_text().splitlines()]
    return out


def rule(step, n, G, M, W, r, A):
    """The rule: (epoch, positions) of rank r's micro-batches at global step `step` (tail dropped)."""
    per_epoch = n // G
    epoch, k = divmod(step, per_epoch)
    mine = list(range(k * G, (k + 1) * G))[r::W]
    return [(epoch, mine[j * M : (j + 1) * M]) for j in range(A)]


def assert_same_losses(a, b):
    assert sorted(a) == sorted(b) and a
    assert [a[k] for k in sorted(a)] == pytest.approx([b[k] for k in sorted(b)], rel=LOSS_RTOL)


# ---------------------------------------------------------------- the reader, in this process


class Positions(IterableDataset):
    """0, 1, ..., n-1 (endless if n is None); with shards_by_rank, rank/world come from attributes."""

    def __init__(self, n, rank=0, world=1):
        self.n, self.rank, self.world, self.read = n, rank, world, 0

    def __iter__(self):
        p = self.rank if getattr(self, "shards_by_rank", False) else 0
        step = self.world if getattr(self, "shards_by_rank", False) else 1
        while self.n is None or p < self.n:
            self.read += 1
            yield torch.tensor(p)
            p += step


class ShardedPositions(Positions):
    shards_by_rank = True


class StatefulPositions(Positions):
    def __iter__(self):
        start, self.start = getattr(self, "start", 0), 0
        for p in range(start, self.n):
            self.read += 1
            self.next = p + 1
            yield torch.tensor(p)

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.start = state["next"]


def reader_steps(dataset, r, W, A, M, workers=0, **kw):
    plan = BatchSizes(A * M * W, M, W, 0)
    per_step = plan.per_rank_step if stream.shards_by_rank(dataset) else plan.global_batch
    reader = stream.Reader(dataset, r, W, per_step, M, None, whole=True, **kw)
    units = list(stream.loader(reader, workers))
    return [[u[0].tolist() for u in units[i : i + A]] for i in range(0, len(units), A)], [u[2] for u in units]


@pytest.mark.parametrize("W, A, M", [(1, 1, 4), (1, 4, 2), (2, 2, 3), (3, 1, 5)])
def test_reader_gives_each_rank_the_rules_positions(W, A, M):
    n, G = 101, A * M * W
    for r in range(W):
        steps, _ = reader_steps(Positions(n), r, W, A, M)
        assert len(steps) == n // G  # the last partial global batch is dropped
        for k, micro in enumerate(steps):
            mine = list(range(k * G, (k + 1) * G))[r::W]
            assert micro == [mine[j * M : (j + 1) * M] for j in range(A)]
        # A stream that reads only rank r's part gives rank r the same micro-batches.
        assert reader_steps(ShardedPositions(n, r, W), r, W, A, M)[0] == steps


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("workers", [2, 3])
def test_reader_workers_give_the_same_batches(workers):
    for r, W in [(0, 1), (1, 2)]:
        assert reader_steps(Positions(103), r, W, 3, 2, workers)[0] == reader_steps(Positions(103), r, W, 3, 2)[0]


def test_fast_forward_and_restored_state_continue_alike():
    full, _ = reader_steps(Positions(100), 1, 2, 2, 2)
    skipped, _ = reader_steps(Positions(100), 1, 2, 2, 2, skip=5 * 8)  # 5 steps of G=8
    assert skipped == full[5:]
    stateful = StatefulPositions(100)
    steps, states = reader_steps(stateful, 1, 2, 2, 2)
    assert steps == full
    at_5 = states[5 * 2 - 1]  # the state rides on each step's last micro-batch
    assert at_5 == {"next": 40} and all(s is None for s in states[::2])
    resumed = StatefulPositions(100)
    assert reader_steps(resumed, 1, 2, 2, 2, state=at_5)[0] == full[5:]
    assert resumed.read == 60  # from position 40 on: nothing read again


def test_eval_stream_counts_every_item_once_with_equal_batches_per_rank():
    n, B, W = 23, 4, 3
    seen, rounds = [], set()
    for r in range(W):
        batches = list(stream.EvalStream(Positions(n), B, r, W, 0, None))
        rounds.add(len(batches))
        seen += [p for batch, count, counts in batches if counts for p in batch.tolist()]
        assert all(len(batch) == count for batch, count, counts in batches if counts)
    assert sorted(seen) == list(range(n)) and rounds == {2}  # ceil(ceil(23 / 3) / 4): every rank runs each forward


@pytest.mark.slow  # two processes
def test_a_finite_stream_without_length_trains_its_epochs_at_any_world_size(tmp_path):
    """40 samples a pass, G = 16: each of the 2 passes is 2 steps (the partial third is dropped), found
    by reading, and the steps are the same on 1 and 2 processes."""
    sections = dict(train={"max_steps": None, "epochs": 2}, schedule={"decay": "constant"})
    one = toy_run(tmp_path, "one", 1, {"n": 40}, **sections)
    two = toy_run(tmp_path, "two", 2, {"n": 40}, **sections)
    rows = metrics(one / "run")[0]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    consumed = [json.loads(line) for line in (one / "record" / "consumed_0.jsonl").read_text().splitlines()]
    per_epoch = {e: sorted(p for epochs, pos in consumed for e2, p in zip(epochs, pos) if e2 == e) for e in (0, 1)}
    assert per_epoch == {0: list(range(32)), 1: list(range(32))}  # each pass up to where it ends, whole steps
    assert max_rel(losses(one / "run"), losses(two / "run")) < 1e-6


def test_a_stream_without_length_refuses_what_needs_the_total(tmp_path):
    cfg, _ = toy_config(tmp_path, "cosine", {"n": 40}, train={"max_steps": None, "epochs": 2},
                        schedule={"decay": "cosine"})
    proc = run(["run", cfg])
    assert proc.returncode == 2 and "schedule.decay=cosine needs the run's length" in proc.stderr, proc.stderr
    assert "set train.max_steps" in proc.stderr and not (tmp_path / "cosine" / "run").exists()


def test_gpt_stream_windows_are_gpt_windows():
    import numpy as np

    from recipes import gpt, gpt_stream

    cfg = gpt_stream.Config(max_chars=50_000, seq_len=64, val_every=10)
    train, val = gpt_stream.data(cfg)
    corpus = gpt.stdlib_corpus(cfg.max_chars)
    n = len(corpus) // 65
    windows = torch.from_numpy(np.frombuffer(corpus, dtype=np.uint8, count=n * 65).reshape(n, 65).copy()).long()
    for split, keep in [(train, lambda i: i % 10 != 9), (val, lambda i: i % 10 == 9)]:
        got = [torch.cat([x[:1], y]) for x, y in split]
        want = [windows[i] for i in range(n) if keep(i)]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------- launcher runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, accumulation 4, a stream of 100 with no length: 6 steps a pass, 15 steps reach pass 2."""
    return toy_run(tmp_path_factory.mktemp("ref"), "one", recipe={"val_n": 31}, train={"eval_batch_size": 5})


@pytest.mark.slow  # an end-to-end run: the full suite
def test_a_stream_with_a_length_trains_as_one_without(tmp_path, reference):
    """len() only tells the trainer the epoch's size in advance: the same steps, bit for bit."""
    sized = toy_run(tmp_path, "sized", recipe={"val_n": 31, "has_len": True}, train={"eval_batch_size": 5})
    assert by_step(sized) == by_step(reference)
    assert consumed(sized, 0) == consumed(reference, 0)
    assert [r["epoch"] for r in metrics(sized / "run")[0]] == [0] * 6 + [1] * 6 + [2] * 3


@pytest.mark.slow
def test_two_processes_equal_one_and_follow_the_rule(tmp_path, reference):
    two = toy_run(tmp_path, "two", 2, recipe={"val_n": 31}, train={"eval_batch_size": 5})
    assert_same_losses(by_step(two), by_step(reference))
    for where, W, A in [(reference, 1, 4), (two, 2, 2)]:
        for r in range(W):
            assert consumed(where, r) == [mb for step in range(15) for mb in rule(step, 100, 16, 4, W, r, A)]
    rows = {w: metrics(w / "run") for w in (reference, two)}
    assert [r["epoch"] for r in rows[two][0]] == [0] * 6 + [1] * 6 + [2] * 3  # a pass is an epoch
    # Validation: 31 samples in batches of 5 on 2 ranks (16 and 15: a filler batch on rank 1) equal 1 rank.
    val = {w: rows[w][1][-1] for w in rows}
    assert val[two]["val_loss"] == pytest.approx(val[reference]["val_loss"], rel=LOSS_RTOL)
    assert val[two]["mean_pos"] == val[reference]["mean_pos"] == 15.0


@pytest.mark.slow
def test_self_sharding_stream_reads_only_its_part(tmp_path, reference):
    two = toy_run(tmp_path, "sharded", 2, recipe={"val_n": 31, "sharded": True}, train={"eval_batch_size": 5})
    assert_same_losses(by_step(two), by_step(reference))
    assert metrics(two / "run")[1][-1]["mean_pos"] == 15.0
    for r in range(2):
        assert consumed(two, r) == [mb for step in range(15) for mb in rule(step, 100, 16, 4, 2, r, 2)]
        (read,) = reads(two, r).values()
        # Passes 0 and 1 read to their end (to find it: 50 each), pass 2 the 3 steps trained: 8 a step.
        assert read == [(e, p) for e in (0, 1) for p in range(r, 100, 2)] + [(2, p) for p in range(r, 48, 2)]


@pytest.mark.slow
def test_loader_workers_give_the_same_losses(tmp_path, reference):
    workers = toy_run(tmp_path, "workers", recipe={"val_n": 31}, train={"eval_batch_size": 5},
                      data={"num_workers": 2})
    assert by_step(workers) == by_step(reference)  # the same batches in the same process: bit for bit
    assert metrics(workers / "run")[1][-1]["val_loss"] == metrics(reference / "run")[1][-1]["val_loss"]
    # Each of the two workers reads the whole pass (that is their cost), keeping every other micro-batch.
    assert sum(read.count((0, p)) for read in reads(workers, 0).values() for p in range(100)) == 2 * 100


def start_from_checkpoint(src: Path, step: int, dst: Path) -> None:
    """dst as a run that crashed right after saving `step` would leave it."""
    name = f"step_{step:06d}"
    (dst / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "run" / "checkpoints" / name, dst / "run" / "checkpoints" / name)
    (dst / "run" / "checkpoints" / "latest").write_text(name)
    rows = [line for line in (src / "run" / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "run" / "metrics.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("stateful, workers", [(False, 0), (True, 0), (True, 2)])
def test_resume_mid_epoch_is_exact(tmp_path, stateful, workers):
    """Saved every 4 steps; resumed from step 8, mid-pass 1 (a pass is 6 steps): fast-forward, or state."""
    recipe = {"stateful": stateful}
    sections = {"checkpoint": {"every_steps": 4, "keep_last": 5}, "data": {"num_workers": workers}}
    full = toy_run(tmp_path, "full", recipe=recipe, **sections)
    assert (full / "run" / "checkpoints" / "step_000008" / "stream_0.pt").is_file() == stateful
    start_from_checkpoint(full, 8, tmp_path / "resumed")
    cfg, where = toy_config(tmp_path, "resumed", recipe, **sections)
    proc = toy_launch(cfg, where)
    assert ("restored its state" if stateful else "fast-forwarding 32 positions") in proc.stderr
    assert by_step(where) == by_step(full)  # every step, bit for bit
    assert consumed(where, 0) == consumed(full, 0)[8 * 4 :]
    first_reads = {read[0] for read in reads(where, 0).values() if read[0][0] == 1}
    # A restored stream reads on from position 32 of pass 1; a fast-forward reads the pass again from 0.
    assert first_reads == {(1, 32) if stateful else (1, 0)}


@pytest.mark.slow
def test_self_sharding_stateful_resume_on_two_processes(tmp_path):
    recipe = {"stateful": True, "sharded": True, "has_len": True}
    sections = {"checkpoint": {"every_steps": 4, "keep_last": 5}}
    full = toy_run(tmp_path, "full", 2, recipe=recipe, **sections)
    assert {p.name for p in (full / "run" / "checkpoints" / "step_000008").glob("stream_*")} == {"stream_0.pt",
                                                                                               "stream_1.pt"}
    start_from_checkpoint(full, 8, tmp_path / "resumed")
    cfg, where = toy_config(tmp_path, "resumed", recipe, **sections)
    proc = toy_launch(cfg, where, 2)
    assert "restored its state" in proc.stderr
    assert_same_losses(by_step(where), by_step(full))
    for r in range(2):
        (read,) = reads(where, r).values()
        assert read[0] == (1, 32 + r)  # rank r's own part, from where it stood
