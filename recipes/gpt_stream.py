"""recipes/gpt.py's GPT with its text streamed: an IterableDataset of byte windows, read file by file.

The example to copy for data too large to index. data() returns two streams
(torch.utils.data.IterableDataset); the launcher reads them in their own order (data.shuffle
does not apply), rank r training on every W-th window of each global batch, and resumes a run
by reading again, and dropping, the windows the epoch had consumed (docs/design.md, Streaming
data). A stream with state_dict()/load_state_dict() would be restored instead; one that reads
only its rank's part declares `shards_by_rank = True`.

The text: the .py sources of Python's standard library (as recipes/gpt.py), or `text_file`,
up to max_chars bytes. Every val_every-th window is held out for validation.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import IterableDataset

# The model, loss and figures are recipes/gpt.py's; only the data differs.
from recipes.gpt import SKIP_DIRS, eval_step, flops_per_sample, loss, model, tokens_per_sample  # noqa: F401


@dataclass
class Config:
    text_file: Optional[str] = None  # None: the standard library's .py sources
    max_chars: int = 2_000_000        # bytes read from the text each pass
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    vocab_size: int = 256             # bytes
    tie_weights: bool = True
    val_every: int = 20               # window i is validation when i % val_every == val_every - 1


def text_chunks(cfg: Config):
    """The text as a sequence of byte strings, read lazily: one file (or 1 MiB of text_file) at a time."""
    if cfg.text_file is not None:
        with open(Path(cfg.text_file).expanduser(), "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        return
    # recipes/gpt.py's order: directories top-down, names sorted; tests and installed packages left out.
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                try:
                    yield Path(dirpath, name).read_bytes()
                except OSError:  # unreadable: skipped alike on every rank
                    continue


class TextWindows(IterableDataset):
    """Non-overlapping windows of seq_len + 1 bytes, (x, y) = (window[:-1], window[1:]), in text order:
    the training windows (split="train") or every val_every-th one (split="val")."""

    def __init__(self, cfg: Config, split: str):
        self.cfg, self.split = cfg, split

    def __iter__(self):
        # No rank or worker logic here: the launcher gives each rank and worker its windows.
        cfg, width = self.cfg, self.cfg.seq_len + 1
        left, carry, i = cfg.max_chars, b"", 0
        for chunk in text_chunks(cfg):
            data = carry + chunk[:left]
            left -= min(left, len(chunk))
            whole = len(data) // width * width
            for start in range(0, whole, width):
                if (i % cfg.val_every == cfg.val_every - 1) == (self.split == "val"):
                    w = torch.frombuffer(bytearray(data[start : start + width]), dtype=torch.uint8).long()
                    yield w[:-1], w[1:]
                i += 1
            carry = data[whole:]
            if left == 0:
                return


def data(cfg: Config):
    if cfg.seq_len < 1 or cfg.val_every < 2:
        raise ValueError(f"recipe.seq_len={cfg.seq_len} must be at least 1 and recipe.val_every={cfg.val_every} "
                         "at least 2")
    if cfg.text_file is not None and not Path(cfg.text_file).expanduser().is_file():
        raise ValueError(f"recipe.text_file={cfg.text_file}: no such file")
    return TextWindows(cfg, "train"), TextWindows(cfg, "val")
