"""Toy recipe whose model holds every kind of state a built model can: a persistent buffer (a learned
model's running statistic), a non-persistent buffer (a table computed at construction, in no state
dict and so in no checkpoint), and tied weights. The buffers change the output, so a rank that got
them wrong computes other losses than one process.

The same padded sequences and (total, count) loss as the token recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from toy_recipes.tokens import collate, loss  # noqa: F401
from toy_recipes.tokens import Config as TokensConfig
from toy_recipes.tokens import data as tokens_data


@dataclass
class Config:
    vocab: int = 32
    hidden: int = 32
    depth: int = 2
    n_samples: int = 256
    max_len: int = 16


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mix = nn.Linear(hidden, hidden)
        self.register_buffer("gain", torch.full((hidden,), 0.5))  # persistent: in the state dict

    def forward(self, h):
        return h + self.gain * torch.tanh(self.mix(h))


class BufferedModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        # Sinusoidal positions, computed here and never saved: only construction gives them values.
        position = torch.arange(cfg.max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, cfg.hidden, 2) * (-math.log(1000.0) / cfg.hidden))
        table = torch.zeros(cfg.max_len, cfg.hidden)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("positions", table, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.hidden) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, idx):
        h = self.embed(idx) + self.positions[: idx.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def data(cfg: Config):
    return tokens_data(TokensConfig(vocab=cfg.vocab, n_samples=cfg.n_samples, max_len=cfg.max_len))


def model(cfg: Config) -> nn.Module:
    return BufferedModel(cfg)
