"""A Hugging Face `transformers` causal LM, unchanged: GPT-2 or Llama built from a tiny config (no download).

The model is the library's own class (`GPT2LMHeadModel`, `LlamaForCausalLM`); the
recipe only chooses its sizes, feeds it Hugging Face-style dict batches
({"input_ids", "labels"}) and returns the model's own `.loss` (a mean over the
predicted tokens: every sequence has the same length, so a mean per micro-batch
is a mean over the global batch). The data is byte-level text from Python's
standard library (as recipes.gpt reads it), so the vocabulary is 256.

Dropout is off (GPT-2's attn/embd/resid_pdrop = 0; Llama has attention_dropout
only, 0): the equivalence tests need a deterministic model. GPT-2 ties lm_head to
wte (one Parameter under two names); the tiny Llama does not (tie_word_embeddings
defaults to False in LlamaConfig) and has non-persistent rotary buffers.

No shard_units: the default (the children of every nn.ModuleList) finds the
transformer blocks, `transformer.h` (GPT-2) or `model.layers` (Llama).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from recipes.gpt import stdlib_corpus

VOCAB = 256  # bytes


@dataclass
class Config:
    arch: str = "gpt2"      # gpt2 | llama
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    seq_len: int = 32
    max_chars: int = 40_000
    val_fraction: float = 0.1


class TokenWindows(Dataset):
    """Non-overlapping windows of seq_len bytes, as Hugging Face batches want them."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i) -> dict:
        ids = self.windows[i].long()
        return {"input_ids": ids, "labels": ids.clone()}  # the model shifts the labels itself


def data(cfg: Config):
    corpus = stdlib_corpus(cfg.max_chars)
    n = len(corpus) // cfg.seq_len
    windows = torch.frombuffer(bytearray(corpus[: n * cfg.seq_len]), dtype=torch.uint8).view(n, cfg.seq_len)
    n_val = max(1, int(n * cfg.val_fraction))
    return TokenWindows(windows[: n - n_val]), TokenWindows(windows[n - n_val:])


def hf_config(cfg: Config):
    # bos/eos inside the vocabulary (GPT-2's default 50256 is not: transformers warns otherwise). GPT-2
    # still logs "`loss_type=None` was set in the config but it is unrecognized. Using the default loss:
    # `ForCausalLMLoss`": transformers 5 derives loss_type from the class name, which GPT2LMHeadModel's
    # does not match; the loss it then uses is the right one, and a config value does not change that.
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=VOCAB, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0)
    if cfg.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=VOCAB, hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
                           num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                           num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.seq_len,
                           attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    raise ValueError(f"recipe.arch={cfg.arch!r}: use gpt2 or llama")


def model(cfg: Config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config(cfg))


def loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
