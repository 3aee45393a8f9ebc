"""DistributedDataParallel: full replicas, gradients all-reduced (averaged) in backward."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..env import ensure_process_group
from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.device)  # strategy=ddp on one process: a group of one
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    @property
    def eval_model(self) -> nn.Module:
        # The plain module: DDP's forward may broadcast buffers, a collective that
        # would hang when ranks run different numbers of validation batches.
        return self.model.module

    def no_sync(self):
        return self.model.no_sync()
