"""Lightning's demo `LightningTransformer` (lightning.pytorch.demos.transformer), unchanged code.

`model()` returns the LightningModule: its `training_step` (NLL of the
encoder-decoder `nn.Transformer` on a batch `(inputs, target)`) is the loss, its
`configure_optimizers` (a bare `SGD(lr=0.1)` over `self.model`) the optimizer.
Its width is fixed by the demo (ninp = nhid = 200, 2 encoder and 2 decoder
layers); only the vocabulary is a constructor argument: 256, bytes.

Data: WikiText2 downloads, so instead `(inputs, target)` windows of Python's
standard library sources, the batch format `training_step` reads (two (B, T)
LongTensors, target = inputs shifted by one), from recipes.gpt's data().

Dropout: the demo hard-codes `dropout=0.2` (positional encoding and every
transformer layer) and its constructor cannot change it. `dropout: null` trains
the module exactly as it ships; the random masks then differ between 1 and 2
processes (each rank draws its own), so losses cannot be compared step by step
and the tests only check that it trains. `dropout: 0.0` sets p = 0 on every
nn.Dropout and nn.MultiheadAttention after construction (a setting, not code):
the model is then deterministic and the equivalence tests compare losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

import recipes.gpt as gpt


@dataclass
class Config:
    seq_len: int = 16
    max_chars: int = 20_000
    val_fraction: float = 0.1
    dropout: Optional[float] = None  # None: as shipped (0.2); a number: set on every dropout after construction


def data(cfg: Config):
    return gpt.data(gpt.Config(seq_len=cfg.seq_len, max_chars=cfg.max_chars, val_fraction=cfg.val_fraction))


def model(cfg: Config):
    from lightning.pytorch.demos import LightningTransformer

    module = LightningTransformer(vocab_size=gpt.VOCAB)
    if cfg.dropout is not None:
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = cfg.dropout
            elif isinstance(m, nn.MultiheadAttention):
                m.dropout = cfg.dropout  # a float attribute, not a module
    return module
