"""One module per strategy behind one interface (base.Strategy); imported lazily so
that a missing optional dependency only matters to the strategy that needs it."""
from __future__ import annotations

import importlib

from .base import Strategy

STRATEGIES = {
    "single": ("single", "SingleStrategy"),
    "ddp": ("ddp", "DDPStrategy"),
    "fsdp": ("fsdp", "FSDPStrategy"),
    "deepspeed": ("deepspeed", "DeepSpeedStrategy"),
}


def resolve_name(name: str, world_size: int, tp: int = 1) -> str:
    """auto: single for one process, ddp for several; with tensor parallelism (tp > 1) fsdp, which
    shards over the data-parallel ranks (a mesh of one when tp is the whole world)."""
    if name == "auto":
        return "fsdp" if tp > 1 else "single" if world_size == 1 else "ddp"
    return name


def strategy_class(name: str) -> type[Strategy]:
    module, cls = STRATEGIES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
