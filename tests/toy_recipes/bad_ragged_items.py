"""Items of different lengths and no collate(): torch's default collate cannot batch them."""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    hidden: int = 8


class Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        return torch.ones(1 + i % 5), torch.tensor(i % 2)


def model(cfg):
    return nn.Linear(5, 2)


def data(cfg):
    return Ragged(), None


def loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
