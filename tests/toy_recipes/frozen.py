"""Toy recipe with frozen parameters: a fixed random feature layer (requires_grad=False) under trainable layers.

The frozen layer must come out of training bit-for-bit unchanged under every strategy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    inputs: int = 16
    hidden: int = 32
    classes: int = 4
    n_samples: int = 512
    seed: int = 0


class FrozenFeatures(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.features = nn.Linear(cfg.inputs, cfg.hidden)
        self.features.requires_grad_(False)  # frozen: no gradient, not in the optimizer
        self.layers = nn.ModuleList([nn.Linear(cfg.hidden, cfg.hidden), nn.Linear(cfg.hidden, cfg.classes)])

    def forward(self, x):
        h = torch.tanh(self.features(x))
        h = torch.relu(self.layers[0](h))
        return self.layers[1](h)


def model(cfg: Config) -> nn.Module:
    return FrozenFeatures(cfg)


def data(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_samples, cfg.inputs, generator=g)
    w = torch.randn(cfg.inputs, cfg.classes, generator=g)
    y = (x @ w).argmax(-1)
    cut = cfg.n_samples * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def loss(model: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)
