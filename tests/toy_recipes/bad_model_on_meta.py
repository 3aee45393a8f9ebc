"""The digits recipe whose model() builds on the meta device: no real weights."""
import torch

from recipes.digits import Config, data, loss  # noqa: F401
from recipes import digits


def model(cfg):
    with torch.device("meta"):
        return digits.model(cfg)
