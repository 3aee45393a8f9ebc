"""The digits recipe with its own optimizer (parameter groups by name, as nanoGPT's
configure_optimizers builds them) and its own scheduler, through the recipe hooks."""
from dataclasses import dataclass

import torch

from recipes import digits

SEEN = {}


@dataclass
class Config(digits.Config):
    lr: float = 0.1
    step_size: int = 3


model, data, loss, eval_step = digits.model, digits.data, digits.loss, digits.eval_step


def optimizer(model, cfg):
    """Gets the model as the recipe built it (not a DDP wrapper): names as written."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    SEEN["names"] = sorted(n for n, _ in model.named_parameters())
    return torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr)


def scheduler(optimizer, cfg, total_steps):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=0.5)
