"""A PEFT LoRA model, unchanged library code: peft's get_peft_model around the tiny transformers Llama of
wild_hf (non-persistent rotary buffers; frozen base weights, trainable LoRA adapters). PEFT starts each
adapter's B at zero, so the first steps change only B; the losses still differ per step from the first.
"""
from __future__ import annotations

from dataclasses import dataclass

from toy_recipes.wild_hf import Config as HFConfig
from toy_recipes.wild_hf import data as hf_data
from toy_recipes.wild_hf import loss  # noqa: F401
from toy_recipes.wild_hf import model as hf_model


@dataclass
class Config:
    n_layer: int = 2
    d_model: int = 32
    seq_len: int = 32
    rank: int = 4


def data(cfg: Config):
    return hf_data(HFConfig(arch="llama", n_layer=cfg.n_layer, d_model=cfg.d_model, seq_len=cfg.seq_len))


def model(cfg: Config):
    from peft import LoraConfig, get_peft_model

    base = hf_model(HFConfig(arch="llama", n_layer=cfg.n_layer, d_model=cfg.d_model, seq_len=cfg.seq_len))
    return get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
