"""Overhead of launcher's loop over a hand-written PyTorch loop, one process.

    python scripts/bench.py [--steps 300] [--repeats 3]

Trains the same recipe, data order and optimizer both ways, alternating, and
prints the ratio of wall times (launcher / plain; 1.00 means no overhead). Ratios,
not absolute times, are what to compare: the machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.config import validate  # noqa: E402
from launcher.data import epoch_permutation  # noqa: E402
from launcher.env import DistEnv  # noqa: E402
from launcher.recipe import Recipe  # noqa: E402
from launcher.trainer import Trainer  # noqa: E402

CASES = {
    "digits": ({"name": "recipes.digits", "hidden": 256}, 64),
    "gpt": ({"name": "recipes.gpt", "n_layer": 2, "d_model": 128, "n_head": 4, "seq_len": 128, "max_chars": 400000}, 16),
}


def launcher_run(recipe: dict, batch: int, steps: int, run_dir: str) -> float:
    cfg = validate({"recipe": recipe, "run_dir": run_dir, "optim": {"name": "adamw", "lr": 1e-3},
                    "train": {"global_batch_size": batch, "max_steps": steps, "log_every_steps": 50},
                    "log": {"progress": "lines"}, "checkpoint": {"resume": "never"}}, "bench")
    trainer = Trainer(cfg, DistEnv("single"), torch.device("cpu"))
    trainer.val_set = None  # time training only, as the plain loop does
    start = time.perf_counter()
    trainer.train_loop()
    return time.perf_counter() - start


def plain_run(recipe: dict, batch: int, steps: int) -> float:
    r = Recipe.load(recipe)
    train_set, _ = r.build_data()
    torch.manual_seed(0)
    model = r.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loader_collate = r.collate or torch.utils.data.default_collate
    start, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        order = epoch_permutation(len(train_set), 0, epoch, True).tolist()
        for k in range(min(len(train_set) // batch, steps - step)):
            batch_data = loader_collate([train_set[i] for i in order[k * batch:(k + 1) * batch]])
            out = r.loss(model, batch_data)
            loss = out[0] / out[1] if isinstance(out, tuple) else out
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        epoch += 1
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.cases:
        recipe, batch = CASES[name]
        ratios = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as run_dir:
                ours = launcher_run(recipe, batch, args.steps, run_dir)
            plain = plain_run(recipe, batch, args.steps)
            ratios.append(ours / plain)
        ratios.sort()
        print(f"{name}: launcher / plain wall time over {args.steps} steps: median {ratios[len(ratios) // 2]:.3f} "
              f"(runs: {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    main()
