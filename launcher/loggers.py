"""Console, JSONL, W&B and TensorBoard; only rank 0 makes any of them.

W&B and TensorBoard get every numeric value of a row as `<split>/<key>` at the row's step,
where a training row's split is "train": train/loss, train/lr, train/step_time, val/val_loss,
val/accuracy, train_epoch/<name>. A train and a validation row of the same step thus share the
step and never share a key. metrics.jsonl keeps the plain keys.
"""
from __future__ import annotations

import json
import math
import numbers
import sys
import time
from pathlib import Path

from .errors import FAILED, STOPPED, Stopped, TrainingError
from .fs import warn, write_atomic


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

    def close(self, ended: BaseException | None = None) -> None:
        self.file.close()


def keep_rows_up_to(path: Path, step: int) -> None:
    """On resume, drop the rows a crashed run wrote after its checkpoint (they are redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if row_step(line) <= step]
    write_atomic(path, "".join(r + "\n" for r in kept))


def last_logged_step(path: Path) -> int | None:
    """The step of the last training row of a metrics.jsonl, None if it has none."""
    if not path.exists():
        return None
    steps = [row_step(line) for line in path.read_text().splitlines() if '"split"' not in line]
    return max((int(s) for s in steps if s != float("inf")), default=None)


def row_step(line: str) -> float:
    """A row's step; a line cut off by a crash mid-write counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class ConsoleLogger:
    """A progress bar on a terminal; a plain line per logging step otherwise."""

    # What a line shows of a train row, when the row has it (mem_*: CPU RSS, or CUDA's peaks).
    LINE_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "step_time",
                 "data_wait", "mem_rss_gib", "mem_max_allocated_gib", "mem_max_reserved_gib")

    def __init__(self, total_steps: int, start_step: int, mode: str):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.prog_bar: set[str] = set()  # more train values to show (a LightningModule's prog_bar=True)
        self.total_steps, self.start_step = total_steps, start_step
        self.clock = time.monotonic
        self.started = self.clock()

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
            fields = [f"{k}={fmt(row[k])}" for k in self.LINE_KEYS if k in row]
            if row.get("alloc_retries"):  # only when non-zero: the CUDA allocator ran out and had to retry
                fields.append(f"alloc_retries={row['alloc_retries']}")
            eta = self.eta(row["step"])
            if eta:
                fields.append(f"eta={eta}")
            fields += [f"{k}={fmt(row[k])}" for k in sorted(self.prog_bar) if k in row]
            print(" ".join(fields), flush=True)

    def eta(self, step: int) -> str | None:
        """h:mm:ss left at the rate since this logger started (it includes start-up: a cautious ETA)."""
        done = step - self.start_step
        if done <= 0 or self.total_steps is None:  # a stream of unknown length: no end to count down to
            return None
        seconds = (self.total_steps - step) * max(self.clock() - self.started, 0.0) / done
        return hms(seconds)

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self, ended: BaseException | None = None) -> None:
        if self.bar:
            self.bar.close()


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def hms(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plottable(row: dict) -> dict:
    """A row's numeric values keyed `<split>/<key>` (see the top of this file), for W&B and TensorBoard."""
    split = row.get("split", "train")
    return {f"{split}/{k}": v for k, v in row.items() if k != "step" and isinstance(v, numbers.Real)}


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


WANDB_STATE = "wandb_run.json"


class WandbLogger:
    """One W&B run per run dir, continued by every resume of it.

    RUN_DIR/wandb_run.json holds the run's id and, per split, the last step handed to W&B; a
    resume passes the id back (resume="allow"). W&B's history only grows, so the steps a crashed
    run had sent after its checkpoint are not sent again when redone: each step is there once,
    with its first values (the same losses, as resuming is exact; timings differ), while
    metrics.jsonl and TensorBoard keep the redone rows. W&B's rewind (resume_from) could replace
    them, but it is a preview feature that not every server offers.
    """

    def __init__(self, cfg, run_dir: Path, config: dict, resumed: bool):
        import wandb  # checked before any worker starts (cli.check_inputs); imported only when W&B is on

        self.state_path = run_dir / WANDB_STATE
        state = read_state(self.state_path) if resumed else {}
        self.sent: dict[str, int] = dict(state.get("sent", {}))
        self.earlier = dict(self.sent)  # what the runs before this resume sent
        same_run = {"id": state["id"], "resume": "allow"} if state.get("id") else {}
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode,
                              dir=str(run_dir), config=config, settings=wandb.Settings(quiet=True), **same_run)
        self.id = self.run.id
        self.save_state()

    def log(self, row: dict) -> None:
        split, step = row.get("split", "train"), row["step"]
        if self.run is None or step <= self.earlier.get(split, -1):
            return
        try:
            self.run.log(plottable(row), step=step)
        except Exception as e:  # noqa: BLE001 - a logger must not end the training
            warn(f"W&B failed at step {step} ({one_line(e)}): it is off for the rest of this run; "
                 "metrics.jsonl and the other loggers go on")
            self.run = None  # the run may be beyond repair: finish() could wait forever
            return
        self.sent[split] = step
        self.save_state()

    def save_state(self) -> None:
        write_atomic(self.state_path, json.dumps({"id": self.id, "sent": self.sent}))

    def close(self, ended: BaseException | None = None) -> None:
        """Finish the W&B run as the training ended: None (done), Stopped (preempted), else failed."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            if isinstance(ended, Stopped):
                run.mark_preempting()  # W&B shows it as preempted: the same command resumes it
            run.finish(exit_code=0 if ended is None else STOPPED if isinstance(ended, Stopped) else FAILED)
        except Exception as e:  # noqa: BLE001 - the training is done: only W&B's record of it is lost
            warn(f"W&B could not finish its run ({one_line(e)})")


def read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def start_wandb(cfg, run_dir: Path, config: dict, resumed: bool) -> WandbLogger | None:
    """W&B's logger; None when W&B cannot start (no network, no login), unless log.wandb.fatal."""
    try:
        return WandbLogger(cfg, run_dir, config, resumed)
    except Exception as e:  # noqa: BLE001 - whatever wandb raises
        why = one_line(e)
        if cfg.fatal:
            raise TrainingError(f"W&B could not start ({why}). The run stops because log.wandb.fatal=true; set "
                                "log.wandb.mode=offline (and `wandb sync` later), or log.wandb.fatal=false to train "
                                "without W&B") from None
        warn(f"W&B could not start ({why}): training goes on without it (log.wandb.fatal=true makes this an error)")
        return None


class TensorBoardLogger:
    """RUN_DIR/tb, with W&B's names as tags and the row's step as the global step.

    A resumed run writes a purge step (TensorBoard's own mechanism): what a crashed run had logged
    after the checkpoint is hidden, and the redone rows are shown, as in metrics.jsonl.
    """

    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / "tb"
        if resume_step is None and path.exists():  # a fresh start: the earlier run's events go beside, kept
            path.rename(run_dir / f"tb.{time.time_ns()}")
        self.writer = SummaryWriter(str(path), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        for tag, value in plottable(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()  # as metrics.jsonl: a crash loses no row logged

    def close(self, ended: BaseException | None = None) -> None:
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
        # W&B first: when it cannot start and that is fatal, nothing else has been opened.
        wandb_cfg = cfg.log.wandb
        wandb = (start_wandb(wandb_cfg, run_dir, cfg.to_dict(), resumed)
                 if wandb_cfg.project and wandb_cfg.mode != "disabled" else None)
        console = ConsoleLogger(total_steps, start_step, cfg.log.progress)
        loggers = [JsonlLogger(run_dir / "metrics.jsonl", start_step if resumed else None), console]
        if wandb:
            loggers.append(wandb)
        if cfg.log.tensorboard:
            loggers.append(TensorBoardLogger(run_dir, start_step if resumed else None))
        return cls(loggers, console)

    def log(self, row: dict, prog_bar: set[str] | None = None) -> None:
        """prog_bar: the names of a train row's values the progress bar shows too (a LightningModule's
        prog_bar=True)."""
        if prog_bar is not None and self.console:
            self.console.prog_bar = prog_bar
        for logger in self.loggers:
            logger.log(row)

    def advance(self, steps: int = 1) -> None:
        if self.console:
            self.console.advance(steps)

    def close(self, ended: BaseException | None = None) -> None:
        """Close every logger; `ended` is how the training ended (None: it finished)."""
        for logger in self.loggers:
            logger.close(ended)
