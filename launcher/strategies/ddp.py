"""DistributedDataParallel: full replicas, gradients all-reduced (averaged) in backward."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..env import ensure_process_group
from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    @classmethod
    def check(cls, cfg, sizes, world_size: int, local_world_size: int | None) -> None:
        super().check(cfg, sizes, world_size, local_world_size)
        # torch's static-graph reducer under no_sync: an internal assert on the first backward,
        # or (where that is avoided) gradients no longer all-reduced after the first step.
        if cfg.ddp.static_graph and sizes.accumulation > 1:
            raise ConfigError(
                f"ddp.static_graph=true cannot be combined with gradient accumulation (here {sizes.accumulation} "
                "micro-steps a step): torch's DistributedDataParallel mishandles static_graph under no_sync. Set "
                "ddp.static_graph=false, or train.micro_batch_size to global_batch_size / processes")

    def wrap(self, model: nn.Module) -> nn.Module:
        ddp = self.cfg.ddp
        ensure_process_group(self.device)  # strategy=ddp on one process: a group of one
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=ddp.bucket_cap_mb,
                                       static_graph=ddp.static_graph,
                                       gradient_as_bucket_view=ddp.gradient_as_bucket_view)

    @property
    def eval_model(self) -> nn.Module:
        # The plain module: DDP's forward may broadcast buffers, a collective that
        # would hang when ranks run different numbers of validation batches.
        return self.model.module

    def no_sync(self):
        return self.model.no_sync()
