"""precision: float8: bf16 autocast, and the model's linear layers computing their matmuls in float8
through torchao's float8 training (docs/design.md, Float8).

`convert_to_float8_training` swaps each chosen nn.Linear for torchao's Float8Linear, a subclass with
the same parameters (state dicts, checkpoints and exports are a plain model's). Its inputs, weights
and output gradients are scaled into float8 at each matmul, with a scale per tensor (tensorwise) or
per row (rowwise); the weights, gradients and optimizer state stay fp32 (FSDP: bf16 compute copies).
A layer whose in or out features are not multiples of 16 stays bf16 (the float8 kernels need it), so
do those matching `float8.skip`. Without a GPU of compute capability 8.9 or newer (H100, H200, L4,
RTX 4090) torchao emulates the float8 matmul: the same numbers, computed in fp32; that is how the CPU
tests run it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util

import torch
from torch import nn

from .errors import ConfigError

ALIGN = 16  # torch._scaled_mm's dimensions: multiples of 16


def check(cfg, strategy: str) -> None:
    """Before any worker: torchao present, a strategy float8 runs under (`strategy`: the resolved one), no
    float8 settings without it."""
    f8 = cfg.float8
    if cfg.precision != "float8":
        if f8.skip or f8.recipe != "tensorwise":
            raise ConfigError(f"float8 settings are set, but precision={cfg.precision}: set precision=float8, or leave "
                              "the float8: section out")
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("precision=float8 needs torchao, which is not installed: pip install 'launcher[float8]' "
                          "(or pip install torchao)")
    if strategy == "deepspeed":
        raise ConfigError("precision=float8 with strategy=deepspeed is not supported: use strategy=fsdp (or ddp, "
                          "single), or precision=bf16")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError(f"precision=float8 needs a GPU with float8 matmuls (compute capability 8.9 or newer: H100, "
                          f"H200, L4, RTX 4090), and {torch.cuda.get_device_name()} is {major}.{minor}: use "
                          "precision=bf16")


def chosen(model: nn.Module, skip: list[str]) -> list[str]:
    """The names of the linear layers float8 converts: both widths multiples of 16, not skipped."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and m.in_features % ALIGN == 0 and m.out_features % ALIGN == 0
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]


def convert(model: nn.Module, cfg, device: torch.device) -> str:
    """The chosen linear layers as torchao's Float8Linear, in place (on the meta device too); returns a
    line saying which."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    f8 = cfg.float8
    config = Float8LinearConfig.from_recipe_name(f8.recipe)
    native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    config = dataclasses.replace(config, emulate=not native)
    names = set(chosen(model, f8.skip))
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _m, name: name in names)
    rest = sum(1 for m in model.modules() if type(m) is nn.Linear)
    return (f"float8 ({f8.recipe}{', emulated' if not native else ''}): {len(names)} linear layer(s) in float8"
            + (f", {rest} in bf16 (widths not multiples of {ALIGN}, or float8.skip)" if rest else ""))

