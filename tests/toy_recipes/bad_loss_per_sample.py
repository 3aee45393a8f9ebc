"""A recipe whose loss() returns per-sample losses (reduction="none") instead of their mean."""
import torch.nn.functional as F

from recipes.digits import Config, data, model  # noqa: F401


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")
