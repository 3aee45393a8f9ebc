"""A LightningModule-shaped model whose hooks record the order they run in and the weights each
sees (a checksum), one JSON line a call, to `record_to`."""
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recipes.digits import data  # noqa: F401  (the digits data)


@dataclass
class Config:
    hidden: int = 16
    record_to: str = "hooks.jsonl"
    val_fraction: float = 0.2
    split_seed: int = 0


class Recorded(nn.Module):
    def __init__(self, hidden: int, record_to: str):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.record_to = record_to

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def record(self, hook: str) -> None:
        checksum = sum(float(p.detach().double().sum()) for p in self.parameters())
        with open(self.record_to, "a") as f:
            f.write(json.dumps({"hook": hook, "weights": checksum}) + "\n")

    def on_train_batch_start(self, batch, batch_idx):
        self.record("on_train_batch_start")

    def on_before_optimizer_step(self, optimizer):
        self.record("on_before_optimizer_step")

    def on_before_zero_grad(self, optimizer):
        self.record("on_before_zero_grad")


def model(cfg: Config):
    return Recorded(cfg.hidden, cfg.record_to)
