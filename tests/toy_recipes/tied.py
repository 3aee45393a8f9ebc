"""Toy recipe with tied weights: the output head shares the token embedding's Parameter.

Variable-length sequences padded per batch and a (total, count) loss, so the
number of counted tokens differs between micro-batches and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The same padded batches and (total, count) loss as the token recipe; only the model differs.
from toy_recipes.tokens import Sequences, collate, loss  # noqa: F401


@dataclass
class Config:
    vocab: int = 24
    hidden: int = 32
    depth: int = 2
    n_samples: int = 384
    min_len: int = 4
    max_len: int = 12
    seed: int = 0


def data(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    seqs = []
    for _ in range(cfg.n_samples):
        n = int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=g))
        start, step = torch.randint(0, cfg.vocab, (2,), generator=g).tolist()
        seqs.append((start + torch.arange(n) * (step | 1)) % cfg.vocab)  # an arithmetic progression mod vocab
    cut = cfg.n_samples * 3 // 4
    return Sequences(seqs[:cut]), Sequences(seqs[cut:])


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
