"""Lightning's own `BoringModel` (lightning.pytorch.demos), unchanged.

`model()` returns the LightningModule as it ships: no loss function here, its
`training_step` (an MSE of `Linear(32, 2)` against ones, returned as
{"loss": ...}) is the loss, and its `configure_optimizers` the optimizer, in the
list form `([SGD(lr=0.1)], [StepLR(step_size=1)])`. Its `validation_step` returns
{"x": loss}. No dropout, no randomness in the forward: equivalence holds exactly.

`data()` is the demo's own `RandomDataset(32, n)` (the batch format
`training_step` expects: a (B, 32) float tensor), drawn under a fixed seed in a
forked RNG so that it is the same in every process and leaves the global RNG alone.
Its training set is 64 samples, as `BoringModel.train_dataloader` has it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Config:
    n_train: int = 64
    n_val: int = 32
    seed: int = 0


def data(cfg: Config):
    from lightning.pytorch.demos.boring_classes import RandomDataset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return RandomDataset(32, cfg.n_train), RandomDataset(32, cfg.n_val)


def model(cfg: Config):
    from lightning.pytorch.demos import BoringModel

    return BoringModel()
