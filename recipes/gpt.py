"""A small byte-level GPT (decoder-only transformer) on Python's own standard library sources or any text file."""
from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB = 256  # bytes: works for any file, no tokenizer to train or ship


@dataclass
class Config:
    text_file: Optional[str] = None  # None: the .py sources of Python's own standard library
    max_chars: int = 2_000_000        # cap on the corpus size (bytes)
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    tie_weights: bool = True          # head shares the token embedding's weight
    val_fraction: float = 0.05


# ---------------------------------------------------------------- data

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_corpus(max_chars: int) -> bytes:
    """The standard library's .py files, in sorted path order, up to max_chars bytes.

    Deterministic for one Python installation: directories are walked top-down
    with sorted names, installed packages and the (large) test suites are left out.
    """
    root = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                blob = Path(dirpath, name).read_bytes()
            except OSError:  # an unreadable file: the same on every rank, skip it
                continue
            parts.append(blob)
            size += len(blob)
            if size >= max_chars:
                return b"".join(parts)[:max_chars]
    return b"".join(parts)[:max_chars]


def read_corpus(cfg: Config) -> bytes:
    if cfg.text_file is None:
        return stdlib_corpus(cfg.max_chars)
    path = Path(cfg.text_file).expanduser()
    if not path.is_file():
        raise ValueError(f"recipe.text_file={cfg.text_file}: no such file (give a path to a text file, "
                         "or leave text_file unset to train on the Python standard library's sources)")
    with open(path, "rb") as f:
        return f.read(cfg.max_chars)


class Windows(Dataset):
    """Non-overlapping windows of seq_len + 1 bytes: (x, y) = (window[:-1], window[1:])."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows  # (n, seq_len + 1) uint8

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i].long()
        return w[:-1], w[1:]


def data(cfg: Config):
    if cfg.seq_len < 1:
        raise ValueError(f"recipe.seq_len={cfg.seq_len} must be at least 1")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"recipe.val_fraction={cfg.val_fraction} must be in [0, 1)")
    corpus = read_corpus(cfg)
    width = cfg.seq_len + 1
    n = len(corpus) // width
    if n < 2:
        raise ValueError(f"the corpus holds {len(corpus)} bytes, fewer than two windows of seq_len + 1 = {width}: "
                         "use a longer text_file or larger max_chars, or a smaller seq_len")
    windows = torch.from_numpy(np.frombuffer(corpus, dtype=np.uint8, count=n * width).reshape(n, width).copy())
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction))) if cfg.val_fraction > 0 else 0
    train = Windows(windows[: n - n_val])
    val = Windows(windows[n - n_val :]) if n_val else None
    return train, val


# ---------------------------------------------------------------- model


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.seq_len = cfg.seq_len
        self.tok_emb = nn.Embedding(VOCAB, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        self.apply(init_weights)
        # GPT-2: the projections that write into the residual stream get std 0.02 / sqrt(2 * n_layer),
        # so the residual's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight  # one Parameter, after init

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len={self.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def model(cfg: Config) -> nn.Module:
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"recipe.d_model={cfg.d_model} must be a multiple of recipe.n_head={cfg.n_head}")
    return GPT(cfg)


# ---------------------------------------------------------------- loss and metrics


def loss(model: nn.Module, batch):
    """(summed cross-entropy over every target byte, number of target bytes)."""
    x, y = batch
    return summed_loss(model(x), y)


def summed_loss(logits: torch.Tensor, y: torch.Tensor):
    logits = logits.float()  # the softmax in fp32 whatever the autocast dtype
    total = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum")
    return total, torch.tensor(y.numel(), device=y.device)


def eval_step(model: nn.Module, batch) -> dict:
    """Validation from one forward pass: the loss and how often the likeliest next byte is right."""
    x, y = batch
    logits = model(x)
    total, count = summed_loss(logits, y)
    return {"loss": (total, count), "accuracy": ((logits.argmax(-1) == y).sum(), count)}


# ---------------------------------------------------------------- throughput


def flops_per_sample(cfg: Config) -> float:
    """Training FLOPs for one sequence of seq_len tokens (forward + backward).

    Per token, 6 * N for the matmul weights N (2 for the forward multiply-add, 4
    for the backward's two products), plus attention's scores and weighted sum,
    QK^T and AV: 2 * 2 * d_model * T forward per layer, x3 with the backward,
    i.e. 12 * n_layer * d_model * T (counted in full, as in PaLM's appendix B,
    although the causal mask lets a kernel skip half). Per sequence, x T:

        6 * N * T + 12 * n_layer * d_model * T^2

    N, the non-embedding parameters: 12 * d_model^2 a block (qkv 3 d^2, proj d^2,
    MLP 8 d^2; biases and LayerNorms are negligible) plus the output head's
    VOCAB * d_model, a real matmul even when it shares its weight with the
    embedding; the embedding lookups cost no FLOPs.
    """
    d, T, L = cfg.d_model, cfg.seq_len, cfg.n_layer
    n_params = 12 * L * d * d + VOCAB * d
    return 6 * n_params * T + 12 * L * d * T * T


def tokens_per_sample(cfg: Config) -> int:
    return cfg.seq_len
