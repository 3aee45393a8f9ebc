"""The digits recipe with a pause in every loss call, so that a test can signal or kill a run mid-way."""
import time
from dataclasses import dataclass

from recipes import digits

DELAY = {"s": 0.0}


@dataclass
class Config(digits.Config):
    delay_s: float = 0.05


def model(cfg):
    return digits.model(cfg)


def data(cfg):
    DELAY["s"] = cfg.delay_s
    return digits.data(cfg)


def loss(model, batch):
    time.sleep(DELAY["s"])
    return digits.loss(model, batch)


def eval_step(model, batch):
    return digits.eval_step(model, batch)
