"""The digits recipe whose loss is multiplied by a huge factor at given micro-steps (fp16 overflow, NaN tests)."""
from dataclasses import dataclass

import torch

from recipes import digits

calls = 0
SPIKES = {5: 1e38, 6: 1e38}  # micro-step -> factor; scaled by fp16's loss scale it overflows


@dataclass
class Config(digits.Config):
    nan_at: int = 0  # >0: the loss is NaN at this micro-step instead


def model(cfg):
    return digits.model(cfg)


def data(cfg):
    global NAN_AT
    NAN_AT = cfg.nan_at
    return digits.data(cfg)


NAN_AT = 0


def loss(model, batch):
    global calls
    calls += 1
    value = digits.loss(model, batch)
    if NAN_AT:
        return value * float("nan") if calls == NAN_AT else value
    return value * torch.tensor(SPIKES.get(calls, 1.0), device=value.device)


def eval_step(model, batch):
    return digits.eval_step(model, batch)
