"""Token files: scripts/prepare_text.py, recipes.gpt's data_file / val_file / token_dtype / vocab_size,
and training on a file far larger than what it reads."""
from __future__ import annotations

import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ROOT, check, losses, metrics, run, write_config  # noqa: E402

for path in (str(ROOT), str(ROOT / "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import prepare_text  # noqa: E402
from recipes import gpt  # noqa: E402

TINY = dict(seq_len=16, n_layer=1, n_head=2, d_model=32)


def tiny(**kw) -> gpt.Config:
    return gpt.Config(**{**TINY, **kw})


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def same_windows(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
                                    for i in range(len(a)))


# ---------------------------------------------------------------- prepare_text


def test_prepare_text_writes_the_concatenation_split_at_the_tail(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    files = {"b.txt": b"bee " * 300, "a.txt": "alpha \u00e9 ".encode() * 200, "sub/c.txt": b"sea\n" * 250,
             "z.txt": b"zed" * 100, "skip.md": b"not text"}
    for name, blob in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(blob)
    corpus = b"".join(files[n] for n in ("a.txt", "b.txt", "sub/c.txt", "z.txt"))  # sorted paths, *.txt only

    assert prepare_text.main([str(src), str(out), "--val-fraction", "0.1"]) == 0
    train, val = (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()
    assert train + val == corpus and len(val) == round(len(corpus) * 0.1)
    printed = capsys.readouterr().out
    assert f"{len(train)} tokens" in printed and f"{len(val)} tokens" in printed
    assert not list(out.glob("*.tmp"))

    # --val-fraction 0: train.bin alone, and an earlier val.bin is not left to mismatch it
    assert prepare_text.main([str(src), str(out), "--val-fraction", "0", "--glob", "*.md"]) == 0
    assert (out / "train.bin").read_bytes() == b"not text" and not (out / "val.bin").exists()

    assert prepare_text.main([str(src), str(out), "--glob", "*.csv"]) == 2
    assert "no files match" in capsys.readouterr().err


# ---------------------------------------------------------------- the recipe's data


def test_data_file_gives_the_windows_of_the_text_path(tmp_path):
    corpus = random_bytes(17 * 40 + 5)
    (tmp_path / "corpus.txt").write_bytes(corpus)
    (tmp_path / "corpus.bin").write_bytes(corpus)
    text_train, text_val = gpt.data(tiny(text_file=str(tmp_path / "corpus.txt"), val_fraction=0.1))
    train, val = gpt.data(tiny(data_file=str(tmp_path / "corpus.bin"), val_fraction=0.1))
    assert len(train) == 36 and len(val) == 4
    assert same_windows(train, text_train) and same_windows(val, text_val)
    x, y = train[-1]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (16,)

    train, val = gpt.data(tiny(data_file=str(tmp_path / "corpus.bin"), val_fraction=0.0))
    assert len(train) == 40 and val is None


def test_val_file_is_all_validation(tmp_path):
    (tmp_path / "train.bin").write_bytes(random_bytes(17 * 10))
    (tmp_path / "val.bin").write_bytes(random_bytes(17 * 3 + 16, seed=1))
    train, val = gpt.data(tiny(data_file=str(tmp_path / "train.bin"), val_file=str(tmp_path / "val.bin")))
    assert len(train) == 10 and len(val) == 3  # val_fraction does not apply
    first, _ = gpt.data(tiny(data_file=str(tmp_path / "val.bin"), val_fraction=0.0))
    assert same_windows(val, first)


def test_uint16_token_file_needs_a_vocab_size_above_its_ids(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, 17 * 8, dtype=np.uint16)
    ids[5] = 999
    path = tmp_path / "tokens.bin"
    path.write_bytes(ids.astype("<u2").tobytes())  # little-endian, as prepare scripts write it
    cfg = tiny(data_file=str(path), token_dtype="uint16", vocab_size=1000, val_fraction=0.25)
    train, val = gpt.data(cfg)
    assert len(train) == 6 and len(val) == 2
    x, y = train[0]
    assert x.tolist() == ids[:16].tolist() and y.tolist() == ids[1:17].tolist()
    assert val[1][1].tolist() == ids[8 * 17 - 16 :].tolist()

    torch.manual_seed(0)
    model = gpt.model(cfg)
    assert model.tok_emb.weight.shape == (1000, 32) and model.head.weight.shape == (1000, 32)
    with torch.no_grad():
        total, count = gpt.loss(model, torch.utils.data.default_collate([train[0], train[1]]))
    assert abs(float(total) / int(count) - np.log(1000)) < 0.2
    d, T, L = cfg.d_model, cfg.seq_len, cfg.n_layer
    assert gpt.flops_per_sample(cfg) == 6 * (12 * L * d * d + 1000 * d) * T + 12 * L * d * T * T

    with pytest.raises(ValueError, match=r"token id 999 in window 0 of .*tokens\.bin is not below recipe\.vocab_size=256"):
        gpt.data(tiny(data_file=str(path), token_dtype="uint16"))


def test_bad_token_files_are_value_errors_naming_the_file_and_the_fix(tmp_path):
    good = tmp_path / "good.bin"
    good.write_bytes(random_bytes(17 * 4))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(random_bytes(17 * 4 + 1))
    short = tmp_path / "short.bin"
    short.write_bytes(random_bytes(17 * 2 - 1))
    cases = [
        (dict(data_file=str(tmp_path / "nope.bin")), r"recipe\.data_file=.*nope\.bin: no such file"),
        (dict(data_file=str(odd), token_dtype="uint16"), r"odd\.bin holds 69 bytes, not a whole number of uint16 tokens"
                                                          r".*set recipe\.token_dtype"),
        (dict(data_file=str(short)), r"short\.bin holds 33 tokens, fewer than two windows of seq_len \+ 1 = 17"),
        (dict(data_file=str(good), val_file=str(short)[:-4] + "x.bin"), r"recipe\.val_file=.*shortx\.bin: no such file"),
        (dict(data_file=str(good), val_file=str(tmp_path / "empty.bin")), r"empty\.bin holds 0 tokens, fewer than one"),
        (dict(data_file=str(good), text_file=str(good)), r"text_file=.* and recipe\.data_file=.* are both set: give one"),
        (dict(val_file=str(good)), r"recipe\.val_file=.*good\.bin needs recipe\.data_file"),
        (dict(token_dtype="uint16"), r"text is bytes: recipe\.token_dtype=uint16 .* need recipe\.data_file"),
    ]
    (tmp_path / "empty.bin").write_bytes(b"")
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            gpt.data(tiny(**fields))


def test_bad_token_file_is_bad_input_for_the_launcher(tmp_path):
    (tmp_path / "odd.bin").write_bytes(random_bytes(101))
    proc = run(["run", write_config(tmp_path / "c.yaml", gpt_config(tmp_path / "run", tmp_path / "odd.bin",
                                                                       token_dtype="uint16"))])
    assert proc.returncode == 2, proc.stderr
    assert "odd.bin holds 101 bytes, not a whole number of uint16 tokens" in proc.stderr


def test_token_file_dataset_pickles_without_the_mapping(tmp_path):
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of zeros, sparse: no disk, and nothing read unless touched
    train, val = gpt.data(tiny(data_file=str(path)))
    assert len(train) + len(val) == (1 << 30) // 17
    train[len(train) - 1]  # maps the file in this process
    blob = pickle.dumps(train)
    assert len(blob) < 1000  # the path and the shape, not the data or a mapping
    copy = pickle.loads(blob)
    assert copy._mm is None and torch.equal(copy[123][0], train[123][0])


# ---------------------------------------------------------------- training


def gpt_config(run_dir: Path, data_file: Path, **recipe) -> dict:
    return {
        "recipe": {"name": "recipes.gpt", **TINY, "data_file": str(data_file), **recipe},
        "run_dir": str(run_dir),
        "train": {"global_batch_size": 4, "max_steps": 6, "log_every_steps": 1, "eval_every_steps": 3, "seed": 0},
        "optim": {"name": "adamw", "lr": 1e-3},
    }


@pytest.mark.slow  # an end-to-end run: the full suite
def test_dataloader_workers_give_the_same_losses(tmp_path):
    (tmp_path / "tokens.bin").write_bytes(random_bytes(17 * 300))
    for workers in (0, 2):
        config = gpt_config(tmp_path / f"w{workers}", tmp_path / "tokens.bin")
        config["data"] = {"num_workers": workers}
        check(run(["run", write_config(tmp_path / f"w{workers}.yaml", config)]))
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2") and len(losses(tmp_path / "w0")) == 6
    assert [r["val_loss"] for r in metrics(tmp_path / "w0")[1]] == [r["val_loss"] for r in metrics(tmp_path / "w2")[1]]


# The peak resident memory of the command it runs (its only child), printed last on stderr.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")


@pytest.mark.slow  # an end-to-end run: the full suite
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and sparse files: Linux")
def test_training_memory_does_not_grow_with_the_token_file(tmp_path):
    big_size = 4 << 30
    if shutil.disk_usage(tmp_path).free < (1 << 30):
        pytest.skip("less than 1 GiB free on the temp disk")  # the sparse file needs none, its metadata little
    small, big, val = tmp_path / "small.bin", tmp_path / "big.bin", tmp_path / "val.bin"
    small.write_bytes(random_bytes(1 << 20))
    with open(big, "wb") as f:
        f.truncate(big_size)  # sparse: zeros, no disk
    val.write_bytes(random_bytes(1 << 16, seed=1))  # the same validation for both: only the training file differs
    # Long windows: the sampler keeps ~48 bytes per window of the epoch (launcher/data.py), and that is
    # not the data set's cost; at 2049 bytes a window it stays near 2% of the file.
    recipe = dict(seq_len=2048, val_file=str(val))
    peak = {}
    try:
        for name, data_file in (("small", small), ("big", big)):
            config = gpt_config(tmp_path / name, data_file, **recipe)
            config["train"] = {**config["train"], "global_batch_size": 2, "max_steps": 3}
            proc = check(run(["run", write_config(tmp_path / f"{name}.yaml", config)],
                             prefix=[sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "launcher"]))
            peak[name] = int(re.findall(r"peak_rss_kib (\d+)", proc.stderr)[-1]) * 1024
            assert len(losses(tmp_path / name)) == 3
    finally:
        big.unlink(missing_ok=True)
    print(f"peak RSS: small file {peak['small'] / 2**20:.0f} MiB, {big_size >> 30} GiB file {peak['big'] / 2**20:.0f} MiB")
    assert peak["big"] - peak["small"] < 0.1 * big_size, peak
