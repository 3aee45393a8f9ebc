"""The MLP workload of scripts/bench.py, as a recipe: synthetic in-memory tensors, a small MLP,
cross-entropy. Small on purpose, so that a training loop's per-step overhead shows."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    samples: int = 3200  # 50 steps an epoch at batch 64
    inputs: int = 128
    hidden: int = 384
    depth: int = 2  # hidden layers
    classes: int = 10
    data_seed: int = 1234


def model(cfg: Config) -> nn.Module:
    layers, width = [], cfg.inputs
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    return nn.Sequential(*layers, nn.Linear(width, cfg.classes))


def data(cfg: Config):
    g = torch.Generator().manual_seed(cfg.data_seed)  # the same tensors in every framework
    x = torch.randn(cfg.samples, cfg.inputs, generator=g)
    y = torch.randint(0, cfg.classes, (cfg.samples,), generator=g)
    return TensorDataset(x, y), None


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)
