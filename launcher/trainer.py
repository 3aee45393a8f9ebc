"""The one training loop.

It holds a Strategy and never asks which one (docs/design.md, Strategies). The loss
normalisation that makes every world size and accumulation train the same math:

- a mean loss is divided by A, the accumulation steps; DDP / FSDP / DeepSpeed
  average over the W ranks, so the gradient is the mean over the global batch;
- a (total, count) loss is backpropagated as the plain sum; once all micro-steps
  are done, the count summed over micro-steps and ranks (one all-reduce) gives
  C, and the gradients, averaged over W by the strategy, are multiplied by W / C.
  The gradient is then d(sum of all totals)/C whatever the micro-batches held.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import data as data_mod
from .checkpoint import Checkpointer
from .config import Config, ConfigError, ScheduleConfig, dump_config
from .env import DistEnv, rendezvous
from .errors import NonFiniteError, Stopped
from .loggers import Loggers
from .lightning import LightningAdapter, LightningRun
from .optim import Schedule, build_optimizer, build_scheduler
from .precision import Precision
from .recipe import Recipe
from .strategies import resolve_name, strategy_class
from .watchdog import Watchdog


def no_hook(*args) -> None:
    """A plain recipe has no Lightning hooks."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def batch_plan(cfg: Config, world_size: int, dataset_len: int | None = None) -> data_mod.BatchPlan:
    """Derive G = A * M * W. train.micro_batch_size is the most one device holds: the micro batch
    is the largest M within it that makes the accumulation A whole (docs/design.md, Batch math).
    Raises ConfigError when no micro batch can serve G at this world size."""
    G, W = cfg.train.global_batch_size, world_size
    if G % W:
        glob = sorted({max(W, (G // W + d) * W) for d in (0, 1)})
        raise ConfigError(
            f"train.global_batch_size={G} cannot be split evenly over {W} processes, whatever the micro batch: "
            f"set it to a multiple of the world size, such as {' or '.join(map(str, glob))}"
        )
    most = min(cfg.train.micro_batch_size or G // W, G // W)
    M = max(m for m in range(1, most + 1) if (G // W) % m == 0)
    plan = data_mod.BatchPlan(G, M, W, dataset_len or 0, cfg.data.tail)
    if dataset_len is not None and plan.steps_per_epoch == 0:
        raise ConfigError(
            f"train.global_batch_size={G} is larger than the training set ({dataset_len} samples): "
            f"lower it, or set data.tail=wrap"
        )
    return plan


def total_steps(cfg: Config, plan: data_mod.BatchPlan) -> int:
    return cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch


def describe_batch(cfg: Config, plan: data_mod.BatchPlan) -> str:
    text = (f"global batch {plan.global_batch} = micro {plan.micro_batch} x {plan.world_size} ranks x "
            f"{plan.accumulation} accumulation")
    asked = cfg.train.micro_batch_size
    if asked and asked != plan.micro_batch:
        text += f" (train.micro_batch_size={asked} is the most a device holds; {plan.micro_batch} makes the accumulation whole)"
    return text


@dataclass
class StepOutput:
    loss_num: torch.Tensor  # this rank's loss numerator for the logged loss
    loss_den: torch.Tensor
    grad_norm: torch.Tensor
    applied: bool
    lr: float  # the rate this step used (the schedule moves on after it)
    stop: bool  # a stop signal reached some rank: every rank stops after this step


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None):
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = Path(cfg.run_dir)
        self.fresh_run_dir = not self.run_dir.exists()  # a bad input found at the first step removes it
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed)
        self.recipe = recipe or Recipe.load(cfg.recipe)
        train_set, self.val_set = self.recipe.build_data()
        self.plan = batch_plan(cfg, env.world_size, len(train_set))
        t = cfg.train
        self.total_steps = total_steps(cfg, self.plan)
        self.loader = data_mod.train_loader(
            train_set, self.plan, env.rank, t.seed, cfg.data.shuffle, cfg.data.num_workers,
            self.recipe.collate, pin_memory=device.type == "cuda",
        )

        # Same seed on every rank right before building: identical initial weights.
        torch.manual_seed(t.seed)
        model = self.recipe.build_model()
        self.step = 0
        self.lightning = None
        if isinstance(model, LightningAdapter):
            model.module.to(device)  # a LightningModule's own .to() keeps its self.device right
            self.lightning = LightningRun(model.module, self)
        self.hook = self.lightning.hook if self.lightning else no_hook
        name = resolve_name(cfg.strategy, env.world_size)
        cls = strategy_class(name)
        self.precision = Precision(cfg.precision, device, use_scaler=cls.uses_torch_scaler)
        self.strategy = cls(cfg, env, device, self.precision, self.plan, self.recipe.shard_units)
        self.recipe_schedule = None
        self.strategy.setup(model, self.make_optimizer)
        # A LightningModule without a scheduler trains at a constant rate, as under Lightning.
        self.schedule = (self.recipe_schedule or self.recipe.schedule(self.strategy.optimizer, self.total_steps)
                         or Schedule(build_scheduler(ScheduleConfig() if self.lightning else cfg.schedule,
                                                     self.strategy.optimizer, self.total_steps)))

        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint, env.rank)
        self.skipped_steps = 0
        resume = self.checkpointer.resume_path()
        if resume is not None:
            self.restore(resume)
        else:
            self.checkpointer.set_aside()
        self.loggers = Loggers.for_rank(env.is_main, cfg, self.run_dir, self.total_steps, self.step,
                                        resumed=resume is not None)
        self.tokens_per_sample = self.recipe.per_sample("tokens_per_sample")
        self.flops_per_sample = self.recipe.per_sample("flops_per_sample")
        self.peak_flops = peak_flops(device, cfg.precision)
        self.stop_requested = False
        self.watchdog = Watchdog(cfg.dist.timeout_s, env.rank, env.world_size, rendezvous())

    def make_optimizer(self, model):
        """The recipe's (or the LightningModule's) optimizer, else the config's. A scheduler that
        comes with it is kept for after the strategy's set-up."""
        optimizer, self.recipe_schedule = self.recipe.optimizer(model)
        return optimizer or build_optimizer(self.cfg.optim, model)

    # ------------------------------------------------------------ the loop

    def fit(self) -> None:
        if self.env.is_main:
            dump_config(self.cfg, self.run_dir / "config.yaml")
            print(f"{self.recipe.name}: {self.strategy.name} on {self.env.world_size} process(es) ({self.device}), "
                  f"{describe_batch(self.cfg, self.plan)}; {self.total_steps} steps, {self.plan.steps_per_epoch} "
                  "an epoch", file=sys.stderr, flush=True)
        previous = self.install_signal_handlers()
        bad_input = False
        try:
            self.hook("on_fit_start")
            self.hook("on_train_start")
            self.train_loop()
            self.hook("on_train_end")
            self.save()  # before the final validation: a failure there loses no trained step
            self.checkpointer.wait()
            self.evaluate(max(0, self.step - 1) // self.plan.steps_per_epoch)
            self.checkpointer.mark_finished(self.step)
            self.hook("on_fit_end")
            self.hook("teardown", "fit")
        except NonFiniteError:
            self.checkpointer.wait()  # an async save still in flight is the last good checkpoint
            raise
        except ConfigError:  # the recipe broke its contract at the first step (its loss form)
            bad_input = True
            raise
        finally:
            self.watchdog.close()
            restore_signal_handlers(previous)
            self.loggers.close()
            if bad_input and self.step == 0 and self.fresh_run_dir and self.env.is_main:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # a bad input leaves no run dir behind

    def train_loop(self) -> None:
        cfg, plan = self.cfg.train, self.plan
        window = torch.zeros(2, device=self.device)  # loss numerator, denominator since the last log
        window_start, window_steps, t0 = time.perf_counter(), 0, time.perf_counter()
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, plan.steps_per_epoch)
            self.loader.sampler.set_epoch(epoch, start)
            batches = iter(self.loader)
            self.hook("on_train_epoch_start")
            for _ in range(start, plan.steps_per_epoch):
                out = self.train_step(batches)
                self.step += 1
                window_steps += 1
                window += torch.stack([out.loss_num, out.loss_den])
                self.loggers.advance()
                if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                    self.watchdog.beat(self.step, 0, "logging")
                    now = time.perf_counter()
                    self.log_train(epoch, window, out, window_steps, now - window_start, now - t0)
                    window.zero_()
                    window_start, window_steps = now, 0
                if self.step % plan.steps_per_epoch == 0 or self.step == self.total_steps:
                    self.end_epoch(epoch)
                if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0 and self.step < self.total_steps:
                    self.evaluate(epoch)
                if self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0:
                    self.save()
                if out.stop:
                    self.save()
                    self.checkpointer.wait()
                    raise Stopped()
                if self.step >= self.total_steps:
                    break

    def train_step(self, batches) -> StepOutput:
        """One optimizer step over the next A micro-batches of `batches`, loaded one at a time."""
        strategy, A, beat = self.strategy, self.plan.accumulation, self.watchdog.beat
        num = torch.zeros((), device=self.device)
        den = torch.zeros((), device=self.device)
        pair = None
        first = (self.step % self.plan.steps_per_epoch) * A  # Lightning's batch_idx: micro-batches this epoch
        for j in range(A):
            beat(self.step, j, "data")
            batch = data_mod.to_device(next(batches), self.device)
            self.hook("on_train_batch_start", batch, first + j)
            with contextlib.nullcontext() if j == A - 1 else strategy.no_sync():
                beat(self.step, j, "forward")
                with self.precision.autocast():
                    out = self.loss(strategy.model, batch, first + j)
                if pair is None:
                    pair = self.recipe.loss_is_pair(out, self.step)
                beat(self.step, j, "backward")
                self.hook("on_before_backward", out)
                if pair:
                    total, count = out
                    strategy.backward(total.float())
                    num += total.detach().float()
                    den += count
                else:
                    strategy.backward(out.float() / A)
                    num += out.detach().float() / A
                self.hook("on_after_backward")
            self.hook("on_train_batch_end", out, batch, first + j)
        beat(self.step, A - 1, "optimizer")
        self.hook("on_before_optimizer_step", strategy.optimizer)
        if pair:
            # The one all-reduce a step needs for token losses: the global count.
            totals = all_reduce_sum(torch.stack([num, den]))
            strategy.scale_grads(self.env.world_size / totals[1])
        else:
            den = torch.ones((), device=self.device)
        grad_norm = strategy.clip_grad_norm(self.cfg.train.grad_clip)
        lr = strategy.optimizer.param_groups[0]["lr"]
        nonfinite, stop = self.step_flags(grad_norm)
        # fp16 overflows are the loss scaler's (torch's or DeepSpeed's) to skip; otherwise a
        # non-finite norm is a real problem.
        if nonfinite and self.precision.name != "fp16":
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(
                    f"non-finite gradient (norm {grad_norm.item()}) at step {self.step + 1}; the last good "
                    "checkpoint is kept. Set train.on_nonfinite=skip to skip such steps instead"
                )
            strategy.zero_grad()
            self.skipped_steps += 1
            return StepOutput(num, den, grad_norm, False, lr, stop)
        self.hook("on_before_zero_grad", strategy.optimizer)
        applied = strategy.step()
        self.schedule.after_step(applied, self.step + 1, self.plan.steps_per_epoch)
        if not applied:
            self.skipped_steps += 1  # fp16 overflow: the scaler skipped it; a per-step schedule waits
        return StepOutput(num, den, grad_norm, applied, lr, stop)

    def loss(self, model, batch, batch_idx: int):
        if self.lightning:
            return self.lightning.training_step(model, batch, batch_idx)
        return self.recipe.loss(model, batch)

    def step_flags(self, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """(non-finite gradient, stop requested): the one host sync a step.

        The norm is the same on every rank; a stop signal may have reached one rank
        only, so the flags are summed over the ranks and every rank stops together.
        """
        flags = torch.stack([~torch.isfinite(grad_norm.detach().float()),
                             torch.tensor(self.stop_requested, device=grad_norm.device)]).float()
        nonfinite, stop = all_reduce_sum(flags).tolist()
        return nonfinite > 0, stop > 0

    # ------------------------------------------------------------ logging

    def log_train(self, epoch: int, window: torch.Tensor, last: StepOutput, steps: int,
                  seconds: float, elapsed: float) -> None:
        num, den = all_reduce_sum(window.clone()).tolist()
        world = self.env.world_size
        # A mean loss contributes one local mean per step and rank; a pair, its totals and counts.
        loss = num / den if den else float("nan")
        samples_per_s = steps * self.plan.global_batch / max(seconds, 1e-9)
        row = {
            "step": self.step, "epoch": epoch, "loss": loss,
            "lr": last.lr, "grad_norm": float(last.grad_norm),
            "samples_per_s": samples_per_s, "time": round(elapsed, 3),
        }
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        if self.tokens_per_sample:
            row["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_sample and self.peak_flops:
            row["mfu"] = samples_per_s * self.flops_per_sample / (world * self.peak_flops)
        if self.lightning:
            row.update(self.lightning.step_values())
            if self.loggers.console:
                self.loggers.console.prog_bar = self.lightning.prog_bar_names()
        self.loggers.log(row)

    def end_epoch(self, epoch: int) -> None:
        """A LightningModule's on_epoch training logs, then its on_train_epoch_end."""
        if self.lightning is None:
            return
        values = self.lightning.end_epoch()
        if values:
            self.loggers.log({"step": self.step, "epoch": epoch, "split": "train_epoch", **values})
        self.hook("on_train_epoch_end")

    def evaluate(self, epoch: int) -> None:
        """Validation; if it fails, the trained steps are saved first (every rank fails alike)."""
        try:
            self.validate(epoch)
        except Exception:
            if self.env.is_main:
                print(f"validation at step {self.step} failed; saving the trained steps first", file=sys.stderr)
            self.save()
            self.checkpointer.wait()
            raise

    @torch.no_grad()
    def validate(self, epoch: int) -> None:
        if self.val_set is None:
            return
        model = self.strategy.eval_model
        model.eval()
        self.hook("on_validation_start")
        self.hook("on_validation_epoch_start")
        sums: dict[str, torch.Tensor] = {}
        batch_size = self.cfg.train.eval_batch_size or self.plan.micro_batch
        loader = data_mod.EvalLoader(self.val_set, batch_size, self.env.rank, self.env.world_size,
                                     self.cfg.data.num_workers, self.recipe.collate)
        for i, (batch, n, counts) in enumerate(loader):
            self.watchdog.beat(self.step, i, "validation")
            batch = data_mod.to_device(batch, self.device)
            with self.precision.autocast():
                if self.lightning:  # what validation_step logs (or, for a plain module, returns)
                    values = self.lightning.validation_step(model, batch, i, n, counts)
                else:
                    values = self.recipe.validation_values(model, batch)
            for key, value in values.items():
                # A pair is (total, count); a scalar is a mean over the batch's n samples.
                total, count = value if isinstance(value, (tuple, list)) else (value * n, n)
                acc = sums.setdefault(key, torch.zeros(2, device=self.device, dtype=torch.float64))
                if counts:
                    acc += torch.stack([torch.as_tensor(total, dtype=torch.float64, device=self.device),
                                        torch.as_tensor(count, dtype=torch.float64, device=self.device)])
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist() if keys else []
        row = {"step": self.step, "epoch": epoch, "split": "val"}
        row.update({k: t / c if c else float("nan") for k, (t, c) in zip(keys, reduced)})
        if self.lightning:
            row.update(self.lightning.end_validation())
        self.hook("on_validation_end")
        model.train()
        self.loggers.log(row)

    # ------------------------------------------------------------ checkpoints and signals

    def save(self) -> None:
        meta = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.env.world_size,
            "strategy": self.strategy.name,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "config": self.cfg.to_dict(),  # a resume under a config that changes the math is refused
        }
        extra = {}  # what a LightningModule adds to its checkpoint in on_save_checkpoint
        self.hook("on_save_checkpoint", extra)
        self.watchdog.suspend(True)
        try:
            self.checkpointer.save(self.step, self.strategy, meta, extra)
        finally:
            self.watchdog.suspend(False)

    def restore(self, path: Path) -> None:
        if not (path / "meta.json").is_file():
            raise ConfigError(f"checkpoint.resume={path} is not a complete checkpoint (no meta.json in it)")
        meta = self.checkpointer.load(path, self.strategy)
        self.step, self.skipped_steps = meta["step"], meta["skipped_steps"]
        self.checkpointer.last_saved_step = self.step  # that checkpoint is this state
        self.schedule.load_state_dict(meta["scheduler"])
        self.hook("on_load_checkpoint", self.checkpointer.load_extra(path))
        if self.precision.scaler and meta.get("scaler"):
            self.precision.scaler.load_state_dict(meta["scaler"])
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

    def install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            self.stop_requested = True

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. a test harness): no handlers
                pass
        return previous


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one device, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # More specific names first: "L4" is also in "L40S".
    half = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
            "4090": 165e12}
    fp32 = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "L4": 30e12, "A10": 31e12,
            "4090": 82e12}
    table = fp32 if precision == "fp32" else half
    return next((v for k, v in table.items() if k in name), None)


def train(cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None) -> None:
    trainer = Trainer(cfg, env, device, recipe)
    trainer.fit()
    trainer.strategy.close()

