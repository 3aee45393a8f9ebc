"""Toy recipe with tied weights: the output head shares the token embedding's Parameter.

Variable-length sequences padded per batch and a (total, count) loss, so the
number of counted tokens differs between micro-batches and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

IGNORE = -100


@dataclass
class Config:
    vocab: int = 24
    hidden: int = 32
    depth: int = 2
    n_samples: int = 384
    min_len: int = 4
    max_len: int = 12
    seed: int = 0


class Sequences(Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def data(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    seqs = []
    for _ in range(cfg.n_samples):
        n = int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=g))
        start, step = torch.randint(0, cfg.vocab, (2,), generator=g).tolist()
        seqs.append((start + torch.arange(n) * (step | 1)) % cfg.vocab)  # an arithmetic progression mod vocab
    cut = cfg.n_samples * 3 // 4
    return Sequences(seqs[:cut]), Sequences(seqs[cut:])


def collate(samples):
    width = max(len(s) for s in samples) - 1
    inputs = torch.zeros((len(samples), width), dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        inputs[i, : len(s) - 1] = s[:-1]
        targets[i, : len(s) - 1] = s[1:]
    return inputs, targets


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mix = nn.Linear(2 * hidden, hidden)  # sees this token and the previous one

    def forward(self, h):
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return h + torch.tanh(self.mix(torch.cat([h, prev], dim=-1)))


class TiedModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg.hidden) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.head.weight = self.embed.weight  # tied: one Parameter under two names

    def forward(self, idx):
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def model(cfg: Config) -> nn.Module:
    return TiedModel(cfg)


def loss(model: nn.Module, batch):
    inputs, targets = batch
    logits = model(inputs).float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return total, (targets != IGNORE).sum()
