"""A recipe whose model() returns a dict of tensors instead of an nn.Module."""
import torch

from recipes.digits import Config, data, loss  # noqa: F401


def model(cfg):
    return {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}
