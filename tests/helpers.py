"""Shared test plumbing: run the launcher in a subprocess and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEST_RECIPES = Path(__file__).resolve().parent / "toy_recipes"  # importable as toy_recipes.NAME


def worker_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TEST_RECIPES.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 300,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` (or PREFIX ARGS), output captured."""
    cmd = (prefix or [sys.executable, "-m", "launcher"]) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, env=worker_env(env), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "val"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)[0]]


def digits_config(run_dir: Path, **sections) -> dict:
    """A small, quick digits config logging every step; sections override whole keys."""
    config = {
        "recipe": {"name": "recipes.digits", "hidden": 32},
        "run_dir": str(run_dir),
        "train": {"global_batch_size": 64, "micro_batch_size": 64, "max_steps": 20, "log_every_steps": 1,
                  "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def outcome(fn):
    """fn() or the exception it raised: a failed launch is reported by every test using it, run once."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - re-raised by reraise()
        return e


def reraise(value):
    if isinstance(value, Exception):
        raise value
    return value


def max_rel(a: list[float], b: list[float]) -> float:
    """The largest relative difference of b from a, element by element (a is the reference)."""
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
