"""launcher plot: loss, learning rate and throughput of runs, overlaid in one image."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import check, digits_config, run, write_config
from launcher.cli import main
from launcher.plot import COLOURS, DPI, HEIGHT_IN, WIDTH_IN, Run, read_metrics, resizes, run_labels

pytest.importorskip("matplotlib")  # the `plot` extra (part of `dev`)
SIZE = (round(HEIGHT_IN * DPI), round(WIDTH_IN * DPI))  # (rows, columns) of every plot


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short digits runs at different learning rates, in directories of the same name."""
    root = tmp_path_factory.mktemp("plot")
    dirs = []
    for parent, lr in (("a", 3e-3), ("b", 3e-4)):
        run_dir = root / parent / "digits"
        config = digits_config(run_dir, train={"max_steps": 12, "eval_every_steps": 4}, optim={"lr": lr})
        check(run(["run", write_config(root / f"{parent}.yaml", config)]))
        dirs.append(run_dir)
    return dirs


def pixels(path: Path) -> np.ndarray:
    """The image as (rows, columns, RGB) bytes."""
    from matplotlib.image import imread

    image = imread(path)
    return np.round(image[..., :3] * 255).astype(np.uint8)


def count_colour(image: np.ndarray, hex_colour: str) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    return int((image == rgb).all(-1).sum())


def fake_run(run_dir: Path, rows: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


def train_row(step: int, **extra) -> dict:
    return {"step": step, "epoch": 0, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 100.0 + step,
            "time": 0.1 * step, **extra}


@pytest.mark.slow  # an end-to-end run: the full suite
def test_two_runs_overlaid(two_runs, tmp_path):
    out = tmp_path / "compare.png"
    proc = check(run(["plot", *two_runs, "--out", out]))
    assert f"wrote {out}" in proc.stdout
    image = pixels(out)
    assert image.shape[:2] == SIZE
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # text, lines, anti-aliasing: not blank
    for colour in COLOURS[:2]:  # each run's lines are drawn
        assert count_colour(image, colour) > 300, colour


def test_one_run_defaults_to_its_run_dir(tmp_path):
    run_dir = fake_run(tmp_path / "gpt", [train_row(s, tokens_per_s=1000.0 * s) for s in range(1, 11)]
                       + [{"step": 10, "epoch": 0, "split": "val", "val_loss": 0.3, "accuracy": 0.5}])
    assert main(["plot", str(run_dir)]) == 0
    image = pixels(run_dir / "plot.png")
    assert image.shape[:2] == SIZE
    assert count_colour(image, COLOURS[0]) > 300 and count_colour(image, COLOURS[1]) == 0


def test_missing_run_dir_or_metrics_is_bad_input(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = run(["plot", fake_run(tmp_path / "r", [train_row(1), train_row(2)]), missing, "--out", tmp_path / "x.png"])
    assert proc.returncode == 2, proc.stderr
    assert f"run dir {missing} does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run(["plot", tmp_path / "empty", "--out", tmp_path / "x.png"])
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_out_and_missing_matplotlib_are_bad_input(tmp_path, monkeypatch, capsys):
    run_dir = fake_run(tmp_path / "r", [train_row(1), train_row(2)])
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "plot.txt")]) == 2
    assert "FILE.png" in capsys.readouterr().err
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(run_dir)]) == 2
    assert "pip install 'launcher[plot]'" in capsys.readouterr().err
    assert not (run_dir / "plot.png").exists()


def test_truncated_last_line_is_skipped(tmp_path):
    run_dir = fake_run(tmp_path / "r", [train_row(1), train_row(2), {"step": 2, "split": "val", "val_loss": 1.0}],
                       tail='{"step": 3, "epoch": 0, "lo')  # a run killed mid-write
    train, val = read_metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2] and [r["val_loss"] for r in val] == [1.0]
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(Exception, match="line 2"):  # a broken row in the middle is not a cut-off
        read_metrics(run_dir)


def test_labels_are_directory_names_told_apart():
    assert run_labels([Path("x/a/run"), Path("y/a/run"), Path("z/other")]) == ["x/a/run", "y/a/run", "other"]
    assert run_labels([Path("runs/a"), Path("runs/b")]) == ["a", "b"]
    assert run_labels([Path("runs/a"), Path("runs/a")]) == ["a (1)", "a (2)"]


def test_an_elastic_runs_resizes_are_marked(tmp_path):
    """Where the world size changes between rows, a grey dotted line in every panel."""
    sizes = [2] * 5 + [1] * 5 + [2] * 5
    run_dir = fake_run(tmp_path / "elastic", [{**train_row(s), "world_size": w} for s, w in zip(range(1, 16), sizes)])
    train, val = read_metrics(run_dir)
    assert resizes([Run("elastic", train, val)]) == [(6, 2, 1), (11, 1, 2)]
    steady = fake_run(tmp_path / "steady", [{**train_row(s), "world_size": 2} for s in range(1, 16)])
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "elastic.png")]) == 0
    assert main(["plot", str(steady), "--out", str(tmp_path / "steady.png")]) == 0
    grey = "#808080"
    assert count_colour(pixels(tmp_path / "elastic.png"), grey) > 200 > 20 > count_colour(pixels(tmp_path / "steady.png"), grey)
