"""The digits recipe, except that one rank stops making progress (sleeps) inside loss at a given step."""
import os
import time
from dataclasses import dataclass

from recipes import digits

calls = 0
STUCK = {"rank": 1, "at": 3}


@dataclass
class Config(digits.Config):
    stuck_rank: int = 1
    stuck_at: int = 3  # the micro-step (1-based, counted on that rank) that never returns


def model(cfg):
    return digits.model(cfg)


def data(cfg):
    STUCK.update(rank=cfg.stuck_rank, at=cfg.stuck_at)
    return digits.data(cfg)


def loss(model, batch):
    global calls
    calls += 1
    if int(os.environ.get("RANK", 0)) == STUCK["rank"] and calls == STUCK["at"]:
        while True:
            time.sleep(1)
    return digits.loss(model, batch)
