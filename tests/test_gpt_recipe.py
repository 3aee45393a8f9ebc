"""Unit tests of the gpt recipe and the toy tokens recipe: data, loss pairs, weight tying, causality."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ROOT, TEST_RECIPES  # noqa: E402

for path in (str(ROOT), str(TEST_RECIPES.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

from recipes import gpt  # noqa: E402
from toy_recipes import tokens  # noqa: E402

TINY = dict(max_chars=20_000, seq_len=16, n_layer=2, n_head=2, d_model=32)


def tiny(**kw) -> gpt.Config:
    return gpt.Config(**{**TINY, **kw})


def batch_of(dataset, n: int):
    return torch.utils.data.default_collate([dataset[i] for i in range(n)])


# ---------------------------------------------------------------- gpt: data


def test_gpt_windows_are_shifted_by_one():
    cfg = tiny()
    train, val = gpt.data(cfg)
    corpus = gpt.read_corpus(cfg)
    width = cfg.seq_len + 1
    n = len(corpus) // width
    assert len(train) + len(val) == n
    assert len(val) == round(n * cfg.val_fraction)
    for i in (0, 1, len(train) - 1):
        x, y = train[i]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (cfg.seq_len,)
        assert torch.equal(x[1:], y[:-1])
        assert bytes(x.tolist()) + bytes(y[-1:].tolist()) == corpus[i * width : (i + 1) * width]  # non-overlapping
    x, y = val[len(val) - 1]  # validation is the tail of the corpus
    assert bytes(y.tolist())[-1] == corpus[n * width - 1]


def test_gpt_corpus_is_deterministic_and_capped():
    a, b = gpt.read_corpus(tiny()), gpt.read_corpus(tiny())
    assert a == b and len(a) == TINY["max_chars"]


def test_gpt_val_fraction_zero_gives_no_validation():
    train, val = gpt.data(tiny(val_fraction=0.0))
    assert val is None and len(train) == TINY["max_chars"] // (TINY["seq_len"] + 1)


def test_gpt_text_file(tmp_path):
    text = "hello, world! " * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    cfg = tiny(text_file=str(path), seq_len=8, val_fraction=0.25)
    train, val = gpt.data(cfg)
    n = len(text) // 9
    assert len(train) + len(val) == n
    x, y = train[0]
    assert bytes(x.tolist()) == text[:8].encode() and bytes(y.tolist()) == text[1:9].encode()
    # max_chars caps a text file too
    train, val = gpt.data(tiny(text_file=str(path), seq_len=8, max_chars=90, val_fraction=0.0))
    assert len(train) == 10 and val is None


def test_gpt_missing_text_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        gpt.data(tiny(text_file=str(tmp_path / "nope.txt")))


# ---------------------------------------------------------------- gpt: model and loss


def test_gpt_loss_pair_at_init():
    cfg = tiny()
    torch.manual_seed(0)
    model = gpt.model(cfg)
    train, _ = gpt.data(cfg)
    batch = batch_of(train, 4)
    total, count = gpt.loss(model, batch)
    assert isinstance(count, int) and count == 4 * cfg.seq_len  # known on the host: no copy to the device
    assert total.dtype == torch.float32 and total.dim() == 0
    assert abs(float(total.detach() / count) - math.log(256)) < 0.15
    total.backward()  # the pair is differentiable through the total
    with torch.no_grad():
        values = gpt.eval_step(model, batch)  # one forward: the same loss, and the accuracy
    assert float(values["loss"][0]) == pytest.approx(float(total.detach()), rel=1e-6) and int(values["loss"][1]) == int(count)
    correct, n = values["accuracy"]
    assert int(n) == 4 * cfg.seq_len and 0 <= int(correct) <= int(n)


def test_gpt_tied_weights_are_one_parameter():
    model = gpt.model(tiny())
    assert model.head.weight is model.tok_emb.weight
    params = list(model.parameters())
    assert sum(p is model.tok_emb.weight for p in params) == 1
    untied = gpt.model(tiny(tie_weights=False))
    assert untied.head.weight is not untied.tok_emb.weight
    n_tied = sum(p.numel() for p in params)
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 256 * TINY["d_model"]


def test_gpt_blocks_are_the_shard_units():
    model = gpt.model(tiny())
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == TINY["n_layer"]
    units = [c for m in model.modules() if isinstance(m, torch.nn.ModuleList) for c in m]
    assert units == list(model.blocks)


def test_gpt_is_causal():
    cfg = tiny()
    torch.manual_seed(0)
    model = gpt.model(cfg).eval()
    x = torch.randint(0, 256, (2, cfg.seq_len))
    changed = x.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 7) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])  # earlier positions see nothing of token t
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gpt_is_deterministic():
    cfg = tiny()
    x = torch.randint(0, 256, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(gpt.model(cfg)(x))
    assert torch.equal(*outs)


def test_gpt_throughput_numbers():
    cfg = tiny()
    d, T, L = cfg.d_model, cfg.seq_len, cfg.n_layer
    assert gpt.tokens_per_sample(cfg) == T
    assert gpt.flops_per_sample(cfg) == 6 * (12 * L * d * d + 256 * d) * T + 12 * L * d * T * T


# ---------------------------------------------------------------- toy tokens recipe


def test_tokens_data_is_deterministic_with_various_lengths():
    cfg = tokens.Config()
    train, val = tokens.data(cfg)
    assert len(train) + len(val) == cfg.n_samples and len(val) == int(cfg.n_samples * 0.2)
    lengths = {len(train[i]) for i in range(len(train))}
    assert min(lengths) >= cfg.min_len and max(lengths) <= cfg.max_len and len(lengths) > 5
    again, _ = tokens.data(cfg)
    assert all(torch.equal(train[i], again[i]) for i in range(len(train)))
    other, _ = tokens.data(tokens.Config(seed=1))
    assert not all(torch.equal(train[i], other[i]) for i in range(20))


def test_tokens_collate_pads_and_masks():
    samples = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8]), torch.tensor([9, 10])]
    inputs, targets = tokens.collate(samples)
    assert inputs.shape == targets.shape == (3, 4)
    assert inputs.tolist() == [[1, 2, tokens.PAD, tokens.PAD], [4, 5, 6, 7], [9, tokens.PAD, tokens.PAD, tokens.PAD]]
    assert targets.tolist() == [[2, 3, -100, -100], [5, 6, 7, 8], [10, -100, -100, -100]]


def test_tokens_loss_counts_real_targets_only():
    cfg = tokens.Config()
    train, _ = tokens.data(cfg)
    samples = [train[i] for i in range(8)]
    batch = tokens.collate(samples)
    torch.manual_seed(0)
    model = tokens.model(cfg)
    with torch.no_grad():
        total, count = tokens.loss(model, batch)
        alone = sum(float(tokens.loss(model, tokens.collate([s]))[0]) for s in samples)
    assert int(count) == sum(len(s) - 1 for s in samples)
    # the same sum as each sample on its own, unpadded: padding contributes nothing
    assert float(total) == pytest.approx(alone, rel=1e-5)
    correct, n = tokens.metrics(model, batch)["accuracy"]
    assert int(n) == int(count) and 0 <= int(correct) <= int(n)
