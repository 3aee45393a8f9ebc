"""A LightningModule-shaped model: training_step returns the loss, configure_optimizers the optimizer."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recipes.digits import data  # noqa: F401  (the same data as the digits recipe)


@dataclass
class Config:
    hidden: int = 32
    lr: float = 3e-3
    val_fraction: float = 0.2
    split_seed: int = 0


class DigitsModule(nn.Module):
    def __init__(self, hidden: int, lr: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"accuracy": (self(x).argmax(-1) == y).float().mean()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def model(cfg: Config):
    return DigitsModule(cfg.hidden, cfg.lr)
