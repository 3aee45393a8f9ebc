"""A recipe whose data() returns the training set alone instead of (train, val)."""
from recipes import digits
from recipes.digits import Config, loss, model  # noqa: F401


def data(cfg):
    train, _ = digits.data(cfg)
    return train
