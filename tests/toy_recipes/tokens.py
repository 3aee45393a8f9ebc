"""Toy token recipe: variable-length sequences, padded batches and a (total, count) loss, for equivalence tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

PAD = 0          # input id at padded positions (their targets are ignored, so any id works)
IGNORE = -100    # target at padded positions: F.cross_entropy's default ignore_index


@dataclass
class Config:
    vocab: int = 32
    n_samples: int = 512
    min_len: int = 3      # tokens a sequence holds (>= 2: at least one input and one target)
    max_len: int = 16
    hidden: int = 32
    depth: int = 2        # residual layers, in an nn.ModuleList (FSDP's shard units)
    noise: float = 0.1    # probability that a token is random rather than (prev * 3 + 1) % vocab
    seed: int = 0
    val_fraction: float = 0.2


class Sequences(Dataset):
    def __init__(self, seqs: list[torch.Tensor]):
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i) -> torch.Tensor:
        return self.seqs[i]


def generate(cfg: Config) -> list[torch.Tensor]:
    """n_samples 1-D LongTensors of lengths uniform in [min_len, max_len], from cfg.seed alone."""
    if not 2 <= cfg.min_len <= cfg.max_len:
        raise ValueError(f"need 2 <= min_len <= max_len, got min_len={cfg.min_len}, max_len={cfg.max_len}")
    g = torch.Generator().manual_seed(cfg.seed)
    lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (cfg.n_samples,), generator=g)
    seqs = []
    for n in lengths.tolist():
        first = torch.randint(0, cfg.vocab, (1,), generator=g)
        noisy = torch.rand(n, generator=g) < cfg.noise
        random_ids = torch.randint(0, cfg.vocab, (n,), generator=g)
        seq = [int(first)]
        for t in range(1, n):
            seq.append(int(random_ids[t]) if noisy[t] else (seq[-1] * 3 + 1) % cfg.vocab)
        seqs.append(torch.tensor(seq, dtype=torch.long))
    return seqs


def data(cfg: Config):
    seqs = generate(cfg)
    n_val = int(len(seqs) * cfg.val_fraction)
    cut = len(seqs) - n_val
    return Sequences(seqs[:cut]), (Sequences(seqs[cut:]) if n_val else None)


def collate(samples: list[torch.Tensor]):
    """Pad to the batch's longest sequence: (inputs, targets), targets = IGNORE where padded."""
    width = max(len(s) for s in samples) - 1
    inputs = torch.full((len(samples), width), PAD, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        inputs[i, : len(s) - 1] = s[:-1]
        targets[i, : len(s) - 1] = s[1:]
    return inputs, targets


class Residual(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.linear(h))


class TokenModel(nn.Module):
    """Per position: Embedding -> residual tanh layers -> Linear to the vocabulary. No dropout, no batch norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Residual(cfg.hidden) for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def model(cfg: Config) -> nn.Module:
    return TokenModel(cfg)


def loss(model: nn.Module, batch):
    """(summed cross-entropy over the real targets, their number); padding is ignored."""
    inputs, targets = batch
    logits = model(inputs).float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def metrics(model: nn.Module, batch) -> dict:
    inputs, targets = batch
    real = targets != IGNORE
    correct = ((model(inputs).argmax(-1) == targets) & real).sum()
    return {"accuracy": (correct, real.sum())}
