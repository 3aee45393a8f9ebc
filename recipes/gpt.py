"""A small GPT (decoder-only transformer): bytes of text, or the token ids of a token file.

The data, non-overlapping windows of seq_len + 1 tokens, (x, y) = (window[:-1], window[1:]),
comes from one of:

- nothing set: the .py sources of Python's own standard library, as bytes, up to max_chars;
- `text_file`: a text file, as bytes, up to max_chars, read into memory;
- `data_file`: a token file (`.bin`, e.g. from scripts/prepare_text.py): a flat array of
  little-endian token ids with no header (nanoGPT's layout), `token_dtype` uint8 (bytes, the
  default) or uint16. It is read through numpy.memmap, one window at a time, never whole:
  files larger than memory work, and max_chars does not apply. `vocab_size` must exceed every
  id (50257 for GPT-2's tokens); it sizes the embedding and the head.

Validation is the last val_fraction of the windows (the tail of the corpus), or with
`val_file` (data_file only) every window of that token file.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB = 256  # the default vocab_size, bytes: works for any file, no tokenizer to train or ship


@dataclass
class Config:
    text_file: Optional[str] = None  # None: the .py sources of Python's own standard library
    max_chars: int = 2_000_000        # cap on the corpus size (bytes); text only, a data_file is used whole
    data_file: Optional[str] = None   # a token file (.bin) read on demand, instead of text; not with text_file
    val_file: Optional[str] = None    # data_file's validation tokens; None: the last val_fraction of its windows
    token_dtype: Literal["uint8", "uint16"] = "uint8"  # the token files' ids: bytes, or up to 65536 ids
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    vocab_size: int = VOCAB           # embedding and head rows: more than the largest token id
    tie_weights: bool = True          # head shares the token embedding's weight
    val_fraction: float = 0.05        # held out for validation (the tail of the windows); unused with val_file


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


TOKEN_DTYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2")}  # little-endian on every host


class TokenFile(Dataset):
    """Windows start ... start + count - 1 of a token file, each read from a numpy.memmap on access.

    Pickles as its path and shape (DataLoader workers, spawn): each process maps the file
    itself on first access, so no process holds more of the file than the windows it reads.
    """

    def __init__(self, path: str, dtype: str, width: int, start: int, count: int, vocab_size: int):
        self.path, self.dtype, self.width = path, dtype, width
        self.start, self.count, self.vocab_size = start, count, vocab_size
        self._mm = None

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}  # a mapping does not pickle; the worker maps its own

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} of {self.count}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=TOKEN_DTYPES[self.dtype], mode="r")
            raw = getattr(self._mm, "_mmap", None)
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)  # windows come in random order: read-ahead would only waste I/O
        a = (self.start + i) * self.width
        w = torch.from_numpy(np.asarray(self._mm[a : a + self.width], dtype=np.int64))  # a copy of one window
        top = int(w.max())
        if top >= self.vocab_size:  # found here rather than as an index error deep in the embedding
            raise ValueError(f"token id {top} in window {i} of {self.path} is not below recipe.vocab_size="
                             f"{self.vocab_size}: set recipe.vocab_size above the largest id (50257 for GPT-2's "
                             f"tokens), and check recipe.token_dtype={self.dtype}")
        return w[:-1], w[1:]


def token_file_windows(path: str, key: str, cfg: Config, need: int) -> int:
    """How many whole windows the token file at `path` (recipe.`key`) holds, at least `need`."""
    file = Path(path).expanduser()
    dtype = TOKEN_DTYPES[cfg.token_dtype]
    if not file.is_file():
        raise ValueError(f"recipe.{key}={path}: no such file (give a token file of flat {cfg.token_dtype} token ids, "
                         "e.g. from scripts/prepare_text.py)")
    size = file.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"recipe.{key}={path} holds {size} bytes, not a whole number of {cfg.token_dtype} tokens "
                         f"({dtype.itemsize} bytes each): set recipe.token_dtype to the dtype the file was "
                         "written with, or write the file again (it may be cut short)")
    tokens = size // dtype.itemsize
    width = cfg.seq_len + 1
    if tokens // width < need:
        windows = "two windows" if need == 2 else "one window"
        raise ValueError(f"recipe.{key}={path} holds {tokens} tokens, fewer than {windows} of seq_len + 1 = {width}: "
                         "use a longer file or a smaller seq_len")
    return tokens // width


def token_file_data(cfg: Config):
    if cfg.text_file is not None:
        raise ValueError(f"recipe.text_file={cfg.text_file} and recipe.data_file={cfg.data_file} are both set: "
                         "give one (text_file: text read into memory as bytes; data_file: a token file read on demand)")
    width = cfg.seq_len + 1
    n = token_file_windows(cfg.data_file, "data_file", cfg, need=2)
    path = str(Path(cfg.data_file).expanduser())
    if cfg.val_file is None:
        n_val = val_windows(n, cfg.val_fraction)
        train = TokenFile(path, cfg.token_dtype, width, 0, n - n_val, cfg.vocab_size)
        val = TokenFile(path, cfg.token_dtype, width, n - n_val, n_val, cfg.vocab_size) if n_val else None
    else:
        n_val = token_file_windows(cfg.val_file, "val_file", cfg, need=1)
        train = TokenFile(path, cfg.token_dtype, width, 0, n, cfg.vocab_size)
        val = TokenFile(str(Path(cfg.val_file).expanduser()), cfg.token_dtype, width, 0, n_val, cfg.vocab_size)
    for dataset in (train, val):
        if dataset is not None:
            dataset[0]  # a vocab_size too small for the ids: most likely seen at once, before any worker starts
    return train, val


def val_windows(n: int, val_fraction: float) -> int:
    """The validation windows, the last of n: at least one (if any) and never all."""
    return min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 else 0


def data(cfg: Config):
    if cfg.seq_len < 1:
        raise ValueError(f"recipe.seq_len={cfg.seq_len} must be at least 1")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"recipe.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if cfg.data_file is not None:
        return token_file_data(cfg)
    if cfg.val_file is not None:
        raise ValueError(f"recipe.val_file={cfg.val_file} needs recipe.data_file (the training tokens); text is "
                         "split by recipe.val_fraction")
    if cfg.token_dtype != "uint8" or cfg.vocab_size < 256:
        raise ValueError(f"text is bytes: recipe.token_dtype={cfg.token_dtype} and recipe.vocab_size={cfg.vocab_size} "
                         "need recipe.data_file (a token file); for text keep uint8 and vocab_size 256 or more")
    corpus = read_corpus(cfg)
    width = cfg.seq_len + 1
    n = len(corpus) // width
    if n < 2:
        raise ValueError(f"the corpus holds {len(corpus)} bytes, fewer than two windows of seq_len + 1 = {width}: "
                         "use a longer text_file or larger max_chars, or a smaller seq_len")
    windows = torch.from_numpy(np.frombuffer(corpus, dtype=np.uint8, count=n * width).reshape(n, width).copy())
    n_val = val_windows(n, cfg.val_fraction)
    train = Windows(windows[: n - n_val])
    val = Windows(windows[n - n_val :]) if n_val else None
    return train, val


# ---------------------------------------------------------------- model


class SelfAttention(nn.Module):
    """Causal self-attention. q, k and v are separate projections, and the head count is read from their
    output (-1 below), so that tensor parallelism (tp_plan) can give each rank whole heads."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight  # one Parameter

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len={self.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def init_weights(model: GPT) -> None:
    """Every parameter's initial value (GPT-2's), in a fixed order. The launcher calls it on each
    rank's shards when it builds the model on the meta device (FSDP), so no process holds the whole
    model; model() calls it on a real device."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    # The projections that write into the residual stream get std 0.02 / sqrt(2 * n_layer), so the
    # residual's variance does not grow with depth.
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp[2]):
            nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(model.blocks)))


def model(cfg: Config) -> nn.Module:
    """The GPT with its initial weights on the default device; on the meta device (where the launcher
    builds it for sharding) without values: init_weights gives them later."""
    if cfg.vocab_size < 1:
        raise ValueError(f"recipe.vocab_size={cfg.vocab_size} must be at least 1")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"recipe.d_model={cfg.d_model} must be a multiple of recipe.n_head={cfg.n_head}")
    device = torch.get_default_device()
    with torch.device("meta"):  # the layers' own initialisation would only be overwritten
        gpt = GPT(cfg)
    if device.type != "meta":
        with swapping_parameters():  # keeps the tied head and embedding one Parameter
            gpt.to_empty(device=device)
        init_weights(gpt)
    return gpt


def tp_plan(model: GPT) -> dict:
    """Tensor parallelism (tp.size): each rank holds whole heads of q, k and v and the matching columns
    of proj (Megatron's split: one all-reduce after attention, one after the MLP), the MLP's hidden
    features, and a part of the vocabulary in the embedding and the head (tied: both split the rows).
    With tp.sequence_parallel the LayerNorms compute on a part of the sequence each, from the first
    block on (the position embedding is added whole)."""
    return {
        "tok_emb": "rowwise",
        "blocks.0": "sequence_start",
        "blocks.*.ln[12]": "sequence_parallel",
        "ln_f": "sequence_parallel",
        "blocks.*.attn.[qkv]": "colwise",
        "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.0": "colwise",
        "blocks.*.mlp.2": "rowwise",
        "head": "colwise_gather_output",  # the loss reads whole logits
    }


@contextlib.contextmanager
def swapping_parameters():
    """Module.to_empty from the meta device makes a new Parameter per module, which unties tied
    weights; swapping each tensor's contents in place keeps them one."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


# ---------------------------------------------------------------- loss and metrics


def loss(model: nn.Module, batch):
    """(summed cross-entropy over every target byte, number of target bytes)."""
    x, y = batch
    return summed_loss(model(x), y)


def summed_loss(logits: torch.Tensor, y: torch.Tensor):
    logits = logits.float()  # the softmax in fp32 whatever the autocast dtype
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
    # The count as a Python int: it is known on the host, and a tensor made from it on the GPU
    # would be a blocking copy every micro-step.
    return total, y.numel()


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

    N, the non-embedding parameters: 12 * d_model^2 a block (q, k, v 3 d^2, proj d^2,
    MLP 8 d^2; biases and LayerNorms are negligible) plus the output head's
    vocab_size * d_model, a real matmul even when it shares its weight with the
    embedding; the embedding lookups cost no FLOPs.
    """
    d, T, L = cfg.d_model, cfg.seq_len, cfg.n_layer
    n_params = 12 * L * d * d + cfg.vocab_size * d
    return 6 * n_params * T + 12 * L * d * T * T


def tokens_per_sample(cfg: Config) -> int:
    return cfg.seq_len
