"""Regress disease progression on scikit-learn's diabetes data with an MLP and MSE (data ships inside scikit-learn)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    hidden: int = 64
    val_fraction: float = 0.2
    split_seed: int = 0


def model(cfg: Config) -> nn.Module:
    return nn.Sequential(nn.Linear(10, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
                         nn.Linear(cfg.hidden, 1))


def data(cfg: Config):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = int(len(x) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    # Standardise with the training split's statistics only.
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    x, y = (x - x_mean) / x_std, (y - y_mean) / y_std
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).squeeze(-1), y)


def eval_step(model: nn.Module, batch) -> dict:
    """Validation from one forward pass: the loss and the mean absolute error."""
    x, y = batch
    error = model(x).squeeze(-1) - y
    return {"loss": error.pow(2).mean(), "mae": error.abs().mean()}  # in standard deviations of the target
