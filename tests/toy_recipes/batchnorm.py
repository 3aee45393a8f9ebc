"""The digits MLP with a BatchNorm layer: its statistics are those of each micro-batch."""
from torch import nn

from recipes.digits import Config, data, eval_step, loss  # noqa: F401


def model(cfg):
    return nn.Sequential(nn.Linear(64, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
