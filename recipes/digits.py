"""Classify scikit-learn's 8x8 handwritten digits with an MLP (data ships inside scikit-learn)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    hidden: int = 128
    depth: int = 2  # hidden layers
    val_fraction: float = 0.2
    split_seed: int = 0


def model(cfg: Config) -> nn.Module:
    layers, width = [], 64
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def data(cfg: Config):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = int(len(x) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def eval_step(model: nn.Module, batch) -> dict:
    """Validation from one forward pass: the loss and the accuracy (means over the batch)."""
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "accuracy": (logits.argmax(-1) == y).float().mean()}
