"""Autocast and the fp16 gradient scaler."""
from __future__ import annotations

import contextlib

import torch

# float8 computes under bf16 autocast; its linear layers' matmuls are float8 (launcher/float8.py).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "float8": torch.bfloat16}


class Precision:
    def __init__(self, name: str, device: torch.device, use_scaler: bool = True):
        self.name, self.device = name, device
        self.dtype = DTYPES[name]
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range.
        # (DeepSpeed brings its own and passes use_scaler=False.)
        enabled = name == "fp16" and use_scaler
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled) if enabled else None

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
