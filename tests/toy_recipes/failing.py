"""The digits recipe, except that one rank raises at a given micro-step."""
import os
from dataclasses import dataclass

from recipes import digits

calls = 0
FAIL = {"rank": 1, "at": 3}


@dataclass
class Config(digits.Config):
    fail_rank: int = 1
    fail_at: int = 3


def model(cfg):
    return digits.model(cfg)


def data(cfg):
    FAIL.update(rank=cfg.fail_rank, at=cfg.fail_at)
    return digits.data(cfg)


def loss(model, batch):
    global calls
    calls += 1
    if int(os.environ.get("RANK", 0)) == FAIL["rank"] and calls == FAIL["at"]:
        raise RuntimeError(f"deliberate failure on rank {FAIL['rank']} at micro-step {calls}")
    return digits.loss(model, batch)
