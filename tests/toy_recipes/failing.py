"""The digits recipe, except that one rank fails at a given micro-step: it raises, or it hangs
(stops making progress, sleeping inside loss)."""
import os
import time
from dataclasses import dataclass

from recipes import digits

calls = 0
FAIL = {"rank": 1, "at": 3, "how": "raise"}


@dataclass
class Config(digits.Config):
    fail_rank: int = 1
    fail_at: int = 3  # the micro-step (1-based, counted on that rank)
    fail_how: str = "raise"  # raise | hang


def model(cfg):
    return digits.model(cfg)


def data(cfg):
    FAIL.update(rank=cfg.fail_rank, at=cfg.fail_at, how=cfg.fail_how)
    return digits.data(cfg)


def loss(model, batch):
    global calls
    calls += 1
    if int(os.environ.get("RANK", 0)) == FAIL["rank"] and calls == FAIL["at"]:
        if FAIL["how"] == "hang":
            while True:
                time.sleep(1)
        raise RuntimeError(f"deliberate failure on rank {FAIL['rank']} at micro-step {calls}")
    return digits.loss(model, batch)
