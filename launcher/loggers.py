"""Console, JSONL, W&B and TensorBoard; only rank 0 makes any of them."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class JsonlLogger:
    """RUN_DIR/metrics.jsonl, one row a line, flushed so a crash loses nothing written."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None:
            keep_rows_up_to(path, resume_step)
        elif path.exists():  # a fresh start: keep the old history beside, never overwrite it
            path.replace(path.with_name(f"metrics.{time.time_ns()}.jsonl"))
        self.file = path.open("a")

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def keep_rows_up_to(path: Path, step: int) -> None:
    """On resume, drop the rows a crashed run wrote after its checkpoint (they are redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if row_step(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in kept))
    tmp.replace(path)


def row_step(line: str) -> float:
    """A row's step; a line cut off by a crash mid-write counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class ConsoleLogger:
    """A progress bar on a terminal; a plain line per logging step otherwise."""

    def __init__(self, total_steps: int, start_step: int, mode: str):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.prog_bar: set[str] = set()  # more train values to show (a LightningModule's prog_bar=True)

    def log(self, row: dict) -> None:
        if "split" in row:
            text = " ".join(f"{k}={fmt(v)}" for k, v in row.items() if k not in ("split", "time"))
            line = f"[{row['split']}] {text}"
            self.bar.write(line) if self.bar else print(line, flush=True)
            return
        if self.bar:
            self.bar.set_postfix(loss=fmt(row["loss"]), samples_s=fmt(row["samples_per_s"]), refresh=False,
                                 **{k: fmt(row[k]) for k in self.prog_bar if k in row})
        else:
            keys = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu",
                    *sorted(self.prog_bar))
            print(" ".join(f"{k}={fmt(row[k])}" for k in keys if k in row), flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, config: dict):
        import wandb  # checked before any worker starts (cli.check_inputs)

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode,
                              dir=str(run_dir), config=config, resume="allow")

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict) -> None:
        prefix = "val/" if row.get("split") == "val" else "train/"
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.writer.add_scalar(prefix + k, v, row["step"])

    def close(self) -> None:
        self.writer.close()


class Loggers:
    """Fans one row out to every logger. Empty on ranks other than 0."""

    def __init__(self, loggers: list, console: ConsoleLogger | None):
        self.loggers, self.console = loggers, console

    @classmethod
    def for_rank(cls, is_main: bool, cfg, run_dir: Path, total_steps: int, start_step: int,
                 resumed: bool) -> "Loggers":
        if not is_main:
            return cls([], None)
        console = ConsoleLogger(total_steps, start_step, cfg.log.progress)
        loggers = [JsonlLogger(run_dir / "metrics.jsonl", start_step if resumed else None), console]
        if cfg.log.wandb.project:
            loggers.append(WandbLogger(cfg.log.wandb, run_dir, cfg.to_dict()))
        if cfg.log.tensorboard:
            loggers.append(TensorBoardLogger(run_dir))
        return cls(loggers, console)

    def log(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log(row)

    def advance(self, steps: int = 1) -> None:
        if self.console:
            self.console.advance(steps)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
