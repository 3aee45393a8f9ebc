"""The one training loop: it builds the parts, then calls them in order.

Each part owns one decision (docs/design.md, Layout): the strategy how gradients and state are
distributed, step.StepRunner the micro-steps, the loss normalisation and the non-finite guard,
evaluation.Evaluator validation, rows.RowMaker what a logged row holds, run_state.RunState the
step counter, meta.json and when to log, evaluate and save, checkpoint.resume_from where to
resume. The trainer never asks which strategy, recipe kind or data kind it holds: plain recipes
and LightningModules answer the same calls (recipe.PlainRun, lightning.LightningRun), and so do
map-style data and streams (data.MapData, stream.StreamData).
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import STARTED_AT, float8
from .batch import batch_sizes, describe_batch, total_steps
from .build import ModelSource
from .checkpoint import Checkpointer, kept_note, resume_from, step_dir_name
from .config import Config, dump_config
from .env import DistEnv, rendezvous
from .errors import NonFiniteError, Stopped
from .evaluation import Evaluator
from .fs import say
from .loggers import Loggers, hms, last_logged_step
from .monitor import values
from .optim import Schedule, build_optimizer, build_scheduler
from .precision import Precision
from .profiling import StepProfiler
from .recipe import Recipe, batch_statistics_note
from .rows import RowMaker, Window, setup_memory_line
from .run_state import RunState
from .signals import StopSignals
from .step import StepRunner
from .stream import train_data, train_length
from .strategies import resolve_name, strategy_class
from .watchdog import Watchdog


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None):
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed)
        self.recipe = recipe or Recipe.load(cfg.recipe)
        train_set, val_set = self.recipe.build_data()
        # The ranks of one TP group (consecutive ranks) read the same micro-batches: the batch math runs
        # over the data-parallel ranks, world / tp.size (docs/design.md, Tensor parallelism).
        self.data_env = dataclasses.replace(env, rank=env.rank // cfg.tp.size,
                                            world_size=env.world_size // cfg.tp.size)
        self.sizes = batch_sizes(cfg, self.data_env.world_size, train_length(cfg, train_set))
        self.total_steps = total_steps(cfg, self.sizes)
        self.state = RunState(cfg, env, self.sizes, self.total_steps, device)
        self.data = train_data(train_set, self.sizes, self.data_env.rank, cfg, self.recipe.collate, device)

        # Known before the model is built: a resumed sharded model takes its weights from the checkpoint.
        self.resumed_from = resume_from(cfg.checkpoint, self.run_dir, env.world_size, may_move=False)
        cls = strategy_class(resolve_name(cfg.strategy, env.world_size, cfg.tp.size))
        # The same seed on every rank right before building: equal weights (docs/design.md, Building the model).
        source = ModelSource(self.recipe, cfg.train.seed, env.rank, device, resuming=self.resumed_from is not None)
        on_meta = cls.shards_parameters(cfg, self.sizes)
        model = source.build(on_meta)
        if cfg.precision == "float8":  # before any split: TP and FSDP take the float8 layers as they are
            say(float8.convert(model, cfg, device))
        self.recipe.check_trainable(model, built_on_meta=on_meta)
        self.run = self.recipe.run_for(model, self.state)  # the recipe's calls, or a LightningModule's
        self.precision = Precision(cfg.precision, device, use_scaler=cls.uses_torch_scaler)
        self.strategy = cls(cfg, env, device, self.precision, self.sizes, self.recipe.shard_units)
        own_schedule = self.strategy.setup(model, self.make_optimizer, source)
        self.schedule = own_schedule or self.make_schedule()
        if env.world_size > 1:
            say(setup_memory_line(device, env.world_size))

        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint, env.rank)
        self.watchdog = Watchdog(cfg.dist.timeout_s, env.rank, env.world_size, rendezvous())
        self.steps = StepRunner(cfg, env, self.sizes, device, self.strategy, self.precision, self.run, self.recipe,
                                self.checkpointer, self.watchdog, self.state)
        self.steps.schedule = self.schedule
        if self.resumed_from is not None:
            self.restore(self.resumed_from)
        else:
            self.checkpointer.set_aside()
        self.loggers = Loggers.for_rank(env.is_main, cfg, self.run_dir, self.total_steps, self.state.step,
                                        resumed=self.resumed_from is not None)
        self.rows = RowMaker(self.sizes, env.world_size, device, cfg.precision,
                             self.recipe.per_sample("tokens_per_sample"), self.recipe.per_sample("flops_per_sample"))
        self.evaluator = Evaluator(val_set, cfg.train.eval_batch_size or self.sizes.micro_batch, self.data_env, device,
                                   self.precision, cfg.data.num_workers, self.recipe.collate, self.run, self.watchdog)
        self.signals = StopSignals(self.checkpointer.dir)
        self.profiler = StepProfiler.from_config(cfg.train.profile, self.run_dir, device, env.rank, self.state.step)

    def make_optimizer(self, model):
        """(optimizer, schedule or None): the recipe's or the LightningModule's, else the config's."""
        optimizer, schedule = self.recipe.optimizer(model)
        return optimizer or build_optimizer(self.cfg.optim, model), schedule

    def make_schedule(self) -> Schedule:
        """The recipe's scheduler(), else the config's schedule: (a LightningModule's default: constant)."""
        optimizer = self.strategy.optimizer
        rates = self.run.schedule_config(self.cfg.schedule)
        return (self.recipe.schedule(optimizer, self.total_steps)
                or Schedule(build_scheduler(rates, optimizer, self.total_steps),
                            constant=rates.decay == "constant" and not rates.warmup_steps))

    def length(self) -> str:
        if self.total_steps is None:
            return f"{self.cfg.train.epochs} pass(es) of a stream without len(), each as long as the stream"
        return f"{self.total_steps} steps"

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------ the loop

    def fit(self) -> None:
        if self.env.is_main:
            dump_config(self.cfg, self.run_dir / "config.yaml")
        say(f"{self.recipe.name}: {self.strategy.name} on {self.env.world_size} process(es) ({self.device}), "
            f"{describe_batch(self.cfg, self.sizes)}; {self.length()}, {self.data.describe()}")
        note = batch_statistics_note(self.strategy.model, self.sizes, self.cfg.train.sync_batchnorm)
        if note:
            say(note)
        self.signals.install()
        self.watchdog.start()
        try:
            self.run.hook("on_fit_start")
            self.run.hook("on_train_start")
            self.train_loop()
            self.run.hook("on_train_end")
            self.save()  # before the final validation: a failure there loses no trained step
            self.checkpointer.wait()
            # Early stopping has just validated this step; else the final validation (monitored too).
            val = self.state.stopped_early or self.evaluate(self.data.last_epoch(self.state.step))
            if self.state.follows_final_validation() and self.state.monitors.follow(val, self.state.step)[0]:
                self.checkpointer.mark_best(self.state.step)  # the last checkpoint, saved before it
            self.checkpointer.mark_finished(self.state.step, self.state.after_final_validation())
            self.run.hook("on_fit_end")
            self.run.hook("teardown", "fit")
            say(self.summary(val))
            outcome = None
        except NonFiniteError as e:
            self.checkpointer.wait()  # an async save still in flight is the last good checkpoint
            e.args = (f"{e}. {kept_note(self.checkpointer.dir)}",)  # what the disk holds, once it is written
            outcome = e
            raise
        except BaseException as e:
            outcome = e
            raise
        finally:
            self.profiler.close()
            self.watchdog.close()
            self.signals.restore()
            self.loggers.close(outcome)

    def train_loop(self) -> None:
        state, window, started, first = self.state, Window(), time.perf_counter(), True
        while not state.done and not state.stopped_early:
            epoch, batches, steps = self.data.epoch_from(state.step)
            self.run.hook("on_train_epoch_start")
            for _ in steps:
                compiling = first and self.cfg.train.compile
                if compiling:
                    self.watchdog.suspend(True)  # a large model may compile for longer than dist.timeout_s
                out = self.steps.train_step(batches, window)
                state.step += 1
                self.profiler.after_step(state.step)
                window.add(out)
                if first:
                    self.first_step_done(window, compiling)
                    first = False
                self.loggers.advance()
                # A stream finds its epoch's end by reading ahead: not past the run's last step.
                epoch_over = state.done or self.data.epoch_done(state.step)
                if epoch_over and state.total_steps is None and epoch + 1 >= self.cfg.train.epochs:
                    state.total_steps = state.step  # the last pass of a stream of unknown length has ended
                # One process reads its own stop flag every step, at no cost; several sum theirs at
                # each row, so that every rank stops together.
                stop = self.signals.requested and self.env.world_size == 1
                if state.should_log(state.step):
                    stop = self.log_train(epoch, window, time.perf_counter() - started)
                    window = Window()
                if epoch_over:
                    self.end_epoch(epoch)
                best = early = False
                if state.should_evaluate(state.step):
                    # The values are the same on every rank: every rank decides alike.
                    best, early = state.monitors.follow(self.evaluate(epoch), state.step)
                    state.stopped_early = state.last_val if early else None
                if state.should_save(state.step) or best or early:
                    self.save(best=best)
                if stop and not early:  # early stopping ends the run as finished
                    self.save()
                    self.checkpointer.wait()
                    raise Stopped(self.signals.first or "a signal")
                if state.done or early:
                    break

    def summary(self, val: dict | None) -> str:
        """The last line of a run: what it did, and where its result is."""
        metrics = "".join(f"{'; ' if i == 0 else ', '}{k}={v:.4g}" for i, (k, v) in enumerate(values(val).items()))
        path = self.checkpointer.dir / step_dir_name(self.state.step)
        why = f" ({self.state.monitors.why_stopped()})" if self.state.stopped_early else ""
        return (f"done{why}: {self.state.step} steps in {hms(time.time() - STARTED_AT)}{metrics}; checkpoint {path}"
                f"{self.state.monitors.best_note()}; its weights as one file: launcher export {self.run_dir} "
                "model.safetensors")

    def first_step_done(self, window: Window, compiling: bool) -> None:
        """What start-up cost (imports, set-up, a compile's first trace); a compile stays out of the rates."""
        say(f"first step done {time.time() - STARTED_AT:.1f} s after start"
            + (" (torch.compile included)" if compiling else ""))
        if compiling:
            self.watchdog.suspend(False)
            window.leave_out_of_timing()

    # ------------------------------------------------------------ logging and validation

    def log_train(self, epoch: int, window: Window, elapsed: float) -> bool:
        """Log the window's row: the one host sync of the steps it covers. Returns whether a stop
        signal reached any rank."""
        self.watchdog.beat(self.state.step, 0, "logging")
        self.steps.read_flags()
        row, stopping = self.rows.row(self.state.step, epoch, window, elapsed, self.signals.requested)
        if self.state.skipped_steps:
            row["skipped_steps"] = self.state.skipped_steps
        row.update(self.run.step_values())
        self.loggers.log(row, prog_bar=self.run.prog_bar_names())
        return stopping

    def end_epoch(self, epoch: int) -> None:
        """What a LightningModule logged on_epoch, then its on_train_epoch_end."""
        values = self.run.end_epoch()
        if values:
            self.loggers.log({"step": self.state.step, "epoch": epoch, "split": "train_epoch", **values})
        self.run.hook("on_train_epoch_end")

    def evaluate(self, epoch: int) -> dict | None:
        """Validation's row; if it fails, the trained steps are saved first (every rank fails alike)."""
        self.steps.read_flags()
        try:
            row = self.evaluator.validate(self.strategy.eval_model, self.state.step, epoch)
        except Exception:
            say(f"validation at step {self.state.step} failed; saving the trained steps first")
            self.save()
            self.checkpointer.wait()
            raise
        if row is not None:
            self.loggers.log(row)
        self.state.last_val = row
        return row

    # ------------------------------------------------------------ checkpoints

    def save(self, best: bool = False) -> None:
        """best: this step's validation is the best so far (checkpoint.best)."""
        self.steps.read_flags()  # a step skipped for a non-finite gradient under on_nonfinite=stop saves nothing
        position, files = self.data.checkpoint(self.state.step)
        meta = self.state.meta(self.strategy.name, self.schedule, self.precision.scaler, position)
        extra = {}  # what a LightningModule adds to its checkpoint in on_save_checkpoint
        self.run.hook("on_save_checkpoint", extra)
        if extra and self.env.is_main:
            files = {**files, "module_extra.pt": extra}
        self.watchdog.suspend(True)
        try:
            # Hooks that run before the next optimizer step may change the weights: then an async
            # save finishes copying them here.
            self.checkpointer.save(self.state.step, self.strategy, meta, files,
                                   overlap=not self.run.hooks_between_steps, best=best)
        finally:
            self.watchdog.suspend(False)

    def restore(self, path: Path) -> None:
        meta = self.checkpointer.load(path, self.strategy)
        self.state.restore(meta, self.schedule, self.precision.scaler)
        if self.state.monitors.best:  # not a later checkpoint of an abandoned timeline
            self.checkpointer.name_best(self.state.monitors.best.best_step)
        self.checkpointer.last_saved_step = self.state.step  # that checkpoint is this state
        self.data.restore(self.state.step, meta, path)
        self.run.hook("on_load_checkpoint", self.checkpointer.load_extra(path))
        logged = (lambda: last_logged_step(self.run_dir / "metrics.jsonl")) if self.env.is_main else (lambda: None)
        say(self.state.resumed_note(path, meta, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), logged))


def train(cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None) -> None:
    trainer = Trainer(cfg, env, device, recipe)
    trainer.fit()
    trainer.strategy.close()
