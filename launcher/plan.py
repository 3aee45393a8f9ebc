"""`launcher plan`: the batch math and a memory estimate per rank, without training."""
from __future__ import annotations

import torch

from .strategies import resolve_name
from .trainer import batch_plan, describe_batch

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIM_STATES = {"sgd": 1, "adam": 2, "adamw": 2}  # fp32 tensors per parameter


def describe(cfg, recipe, world_size: int) -> str:
    plan = batch_plan(cfg, world_size)
    with torch.device("meta"):  # count parameters without allocating them
        model = recipe.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    strategy = resolve_name(cfg.strategy, world_size)
    zero = cfg.deepspeed.zero_stage if strategy == "deepspeed" else 0
    shard_params = strategy == "fsdp" or zero == 3
    shard_grads = shard_params or zero >= 2
    shard_optim = shard_params or zero >= 1
    gib = 1024**3
    params = n_params * 4 / (world_size if shard_params else 1)
    grads = n_train * 4 / (world_size if shard_grads else 1)
    optim = n_train * 4 * OPTIM_STATES[cfg.optim.name] / (world_size if shard_optim else 1)
    return "\n".join([
        f"strategy: {strategy}   world size: {world_size}   precision: {cfg.precision}",
        f"batch: {describe_batch(cfg, plan)}",
        f"optimizer: {recipe.replaces().get('optim', f'the config (optim.name={cfg.optim.name}, lr={cfg.optim.lr})')}",
        f"schedule: {recipe.replaces().get('schedule', f'the config (schedule.decay={cfg.schedule.decay}, warmup_steps={cfg.schedule.warmup_steps})')}",
        f"parameters: {n_params:,} ({n_train:,} trainable)",
        f"memory per rank (fp32 master weights, before activations): params {params / gib:.3f} GiB, "
        f"grads {grads / gib:.3f} GiB, optimizer {optim / gib:.3f} GiB, total {(params + grads + optim) / gib:.3f} GiB",
    ])
