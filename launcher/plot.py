"""`launcher plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`: a run's curves from its metrics.jsonl."""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# Fixed, so a plot's size does not depend on the runs (and tests can check it).
WIDTH_IN, HEIGHT_IN, DPI = 12.0, 8.0, 100
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # matplotlib's tab10, whatever the user's style


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl); "
                   "several are overlaid, labelled by their directory names")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="the image to write (.png, or .pdf, .svg); default: RUN_DIR/plot.png for one run, "
                   "plot.png in the working directory for several")


@dataclass
class Run:
    label: str
    train: list[dict]
    val: list[dict]


def cmd_plot(args) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    runs = [Run(label, *read_metrics(d)) for d, label in zip(dirs, run_labels(dirs))]
    out = Path(args.out) if args.out else (dirs[0] / "plot.png" if len(dirs) == 1 else Path("plot.png"))
    try:  # lazily: the CLI imports this module at every start, and matplotlib is an extra
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("launcher plot needs matplotlib: pip install 'launcher[plot]' "
                          "(or pip install matplotlib)") from None
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)  # Agg directly: no pyplot, no GUI backend, no global state
    formats = canvas.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"--out {out}: not an image format matplotlib writes; give FILE.png (or .pdf, .svg)")
    draw(fig, runs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI)
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be written ({e.strerror or e})") from None
    print(f"wrote {out}")
    return 0


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of RUN_DIR/metrics.jsonl."""
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} does not exist" if not run_dir.exists() else
                          f"{run_dir} is not a run directory: give the directory that holds metrics.jsonl")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl: is it a run's run_dir? (a run writes it at its "
                          "first logged step)")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # cut off mid-write: a crashed run, or one still running
                break
            raise ConfigError(f"{path}, line {i + 1}, is not a JSON row: {line[:80]!r}") from None
        if isinstance(row, dict) and number(row.get("step")) is not None:
            rows.append(row)
    train = [r for r in rows if "split" not in r]
    val = [r for r in rows if r.get("split") == "val"]
    if not train and not val:
        raise ConfigError(f"{path} holds no rows yet: plot it after the run has logged a step")
    return train, val


def run_labels(dirs: list[Path]) -> list[str]:
    """Each run's directory name; where names repeat, as many parent directories as tell them apart."""
    parts = [Path(os.path.abspath(d)).parts[1:] or ("/",) for d in dirs]
    depth = [1] * len(dirs)
    while True:
        labels = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        grow = [i for i, label in enumerate(labels) if depth[i] < len(parts[i]) and any(
            other == label and parts[j] != parts[i] for j, other in enumerate(labels))]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for label in labels:  # the same directory given twice
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} ({seen[label]})")
    return out


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(number(r["step"]), number(r.get(key))) for r in rows]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def resizes(runs: list[Run]) -> list[tuple[float, int, int]]:
    """(step, old, new) where an elastic job's world size changed between two training rows."""
    found = []
    for run in runs:
        sizes = [(number(r["step"]), r.get("world_size")) for r in run.train if isinstance(r.get("world_size"), int)]
        found += [(step, old, new) for (_, old), (step, new) in zip(sizes, sizes[1:]) if new != old]
    return found


def draw(fig, runs: list[Run]) -> None:
    from matplotlib.lines import Line2D

    # tokens/s only when every run has it: the runs stay comparable on one axis.
    speed = "tokens_per_s" if all(any("tokens_per_s" in r for r in run.train) for run in runs) else "samples_per_s"
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
              (speed, speed.replace("_per_s", " / s"))]
    axes = fig.subplots(2, 2, sharex=True).flatten()
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        for i, run in enumerate(runs):
            colour = COLOURS[i % len(COLOURS)]
            ax.plot(*series(run.train, key), color=colour, lw=1.5)
            if key == "loss":
                ax.plot(*series(run.val, "val_loss"), color=colour, lw=1.5, ls="--", marker="o", ms=4)
        for step, old, new in resizes(runs):
            ax.axvline(step, color="grey", lw=1, ls=":")
            if key == "loss":
                ax.annotate(f"{old}\u2192{new}", (step, 1), xycoords=("data", "axes fraction"), fontsize=8,
                            color="grey", ha="left", va="top", xytext=(2, -2), textcoords="offset points")
    for ax in axes[2:]:
        ax.set_xlabel("step")
    loss_ax = axes[0]
    values = [v for run in runs for v in series(run.train, "loss")[1] + series(run.val, "val_loss")[1]
              if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 30:
        loss_ax.set_yscale("log")  # a loss that falls by orders of magnitude
    loss_ax.legend(handles=[Line2D([], [], color="black", lw=1.5, label="train"),
                            Line2D([], [], color="black", lw=1.5, ls="--", marker="o", ms=4, label="validation")])
    fig.legend(handles=[Line2D([], [], color=COLOURS[i % len(COLOURS)], lw=3, label=run.label)
                        for i, run in enumerate(runs)],
               loc="outside upper center", ncols=min(len(runs), 4))
