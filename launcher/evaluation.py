"""Validation (docs/design.md, Batch math: sharded validation without padding).

Rank r takes every W-th validation sample; a rank with fewer batches runs a repeat that is not
counted, so sharded models see every rank in every forward. Each value is summed as (total,
count) over the counted batches and reduced over the ranks in one all-reduce: validation on W
ranks equals one process's.
"""
from __future__ import annotations

import torch

from .data import to_device
from .env import all_reduce_sum
from .stream import eval_data


class Evaluator:
    def __init__(self, val_set, batch_size: int, env, device: torch.device, precision, num_workers: int, collate,
                 run, watchdog):
        self.val_set, self.batch_size, self.env, self.device = val_set, batch_size, env, device
        self.precision, self.num_workers, self.collate = precision, num_workers, collate
        self.run, self.watchdog = run, watchdog  # run: the recipe's or the LightningModule's calls

    @torch.no_grad()
    def validate(self, model, step: int, epoch: int) -> dict | None:
        """The validation row at `step`, the same on every rank; None without a validation set."""
        if self.val_set is None:
            return None
        model.eval()
        self.run.hook("on_validation_start")
        self.run.hook("on_validation_epoch_start")
        sums: dict[str, torch.Tensor] = {}
        batches = eval_data(self.val_set, self.batch_size, self.env.rank, self.env.world_size, self.num_workers,
                            self.collate)
        for i, (batch, n, counts) in enumerate(batches):
            self.watchdog.beat(step, i, "validation")
            batch = to_device(batch, self.device)
            with self.precision.autocast():
                values = self.run.validation_values(model, batch, i, n, counts)
            for key, value in values.items():
                # A pair is (total, count); a scalar is a mean over the batch's n samples.
                total, count = value if isinstance(value, (tuple, list)) else (value * n, n)
                acc = sums.setdefault(key, torch.zeros(2, device=self.device, dtype=torch.float64))
                if counts:
                    acc += torch.stack([torch.as_tensor(total, dtype=torch.float64, device=self.device),
                                        torch.as_tensor(count, dtype=torch.float64, device=self.device)])
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist() if keys else []
        row = {"step": step, "epoch": epoch, "split": "val"}
        row.update({k: t / c if c else float("nan") for k, (t, c) in zip(keys, reduced)})
        row.update(self.run.end_validation())
        self.run.hook("on_validation_end")
        model.train()
        return row
