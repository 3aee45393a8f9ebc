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

from . import STARTED_AT
from . import data as data_mod
from . import stream as stream_mod
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
from .strategies.base import nonfinite
from .watchdog import Watchdog


def no_hook(*args) -> None:
    """A plain recipe has no Lightning hooks."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fp32(t: torch.Tensor) -> torch.Tensor:
    """The loss in fp32 (autocast may give bf16); an fp32 one as it is, without a dispatch."""
    return t if t.dtype is torch.float32 else t.float()


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
    loss_num: torch.Tensor  # this rank's loss numerator for the logged loss (on the device)
    loss_den: torch.Tensor
    grad_norm: torch.Tensor | None  # on the device: read only when a row is logged (None when not computed)
    lr: float  # the rate this step used (the schedule moves on after it)


class Window:
    """What the steps since the last logged row add up to, kept on the device until it is logged."""

    def __init__(self):
        self.nums: list[torch.Tensor] = []  # each step's loss numerator and denominator, on the device
        self.dens: list[torch.Tensor] = []
        self.start = self.started = time.perf_counter()
        self.data_wait = 0.0  # seconds the loop waited for the data loader
        self.untimed = 0  # a compiling first step: in the loss, not in the rates (when others follow)

    def add(self, out: StepOutput) -> None:
        self.nums.append(out.loss_num)
        self.dens.append(out.loss_den)

    def sums(self) -> torch.Tensor:
        return torch.stack([torch.stack(self.nums).sum(), torch.stack(self.dens).sum()])

    @property
    def steps(self) -> int:
        return len(self.nums)

    def timing(self, now: float) -> tuple[int, float]:
        """(steps, seconds) to measure rates over."""
        if self.untimed and self.steps > self.untimed:
            return self.steps - self.untimed, now - self.start
        return self.steps, now - self.started

    def leave_out_of_timing(self) -> None:
        self.untimed, self.started, self.start, self.data_wait = self.steps, self.start, time.perf_counter(), 0.0


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None):
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = Path(cfg.run_dir)
        self.fresh_run_dir = not self.run_dir.exists()  # a bad input found at the first step removes it
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed)
        self.recipe = recipe or Recipe.load(cfg.recipe)
        train_set, self.val_set = self.recipe.build_data()
        self.plan = batch_plan(cfg, env.world_size, stream_mod.train_length(cfg, train_set))
        t = cfg.train
        self.total_steps = total_steps(cfg, self.plan)
        self.loader = stream_mod.StreamLoader(
            train_set, self.plan, env.rank, cfg.data.num_workers, self.recipe.collate, device.type == "cuda",
            cfg.data.prefetch_factor,
        ) if stream_mod.is_stream(train_set) else data_mod.train_loader(
            train_set, self.plan, env.rank, t.seed, cfg.data.shuffle, cfg.data.num_workers,
            self.recipe.collate, pin_memory=cfg.data.pin_memory, prefetch_factor=cfg.data.prefetch_factor,
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
        rates = ScheduleConfig() if self.lightning else cfg.schedule
        self.schedule = (self.recipe_schedule or self.recipe.schedule(self.strategy.optimizer, self.total_steps)
                         or Schedule(build_scheduler(rates, self.strategy.optimizer, self.total_steps),
                                     constant=rates.decay == "constant" and not rates.warmup_steps))

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
        self.stop_requested = False  # set by a signal handler on this rank
        # A non-finite gradient norm is the same on every rank. The fused optimizers skip such a
        # step on the device (given found_inf, as under the gradient scaler): the flags are then
        # read only at the next row, evaluation or checkpoint. Other optimizers, DeepSpeed and the
        # fp16 scaler need the flag on the host before their step: one host sync a step.
        self.skip_on_device = self.strategy.skips_on_device and self.precision.scaler is None
        # One flag a step since they were last read (at most log_every_steps steps): 1.0 where the
        # step was skipped on the device for a non-finite gradient.
        self.flags = torch.zeros(cfg.train.log_every_steps, device=device)
        self.flag_views = list(self.flags)  # one scalar view a step, made once
        self.flag_steps: list[int] = []  # the steps those flags belong to
        self.one = torch.ones((), device=device)  # a mean loss's denominator, every step
        self.on_cpu = device.type == "cpu"
        self.accumulation, self.steps_per_epoch = self.plan.accumulation, self.plan.steps_per_epoch
        self.whole_step_local = self.strategy.name == "single" and self.accumulation == 1
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
                  f"{describe_batch(self.cfg, self.plan)}; {self.total_steps} steps, {self.epoch_text()}",
                  file=sys.stderr, flush=True)
        previous = self.install_signal_handlers()
        bad_input = False
        self.watchdog.start()
        try:
            self.hook("on_fit_start")
            self.hook("on_train_start")
            self.train_loop()
            self.hook("on_train_end")
            self.save()  # before the final validation: a failure there loses no trained step
            self.checkpointer.wait()
            self.evaluate(self.last_epoch())
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
        window, t0, first_step = Window(), time.perf_counter(), True
        while self.step < self.total_steps:
            if isinstance(self.loader, stream_mod.StreamLoader):  # a stream finds where each epoch ends as it reads
                epoch, batches, steps = self.loader.epoch_from(self.step)
            else:
                epoch, start = divmod(self.step, plan.steps_per_epoch)
                self.loader.sampler.set_epoch(epoch, start)
                batches, steps = iter(self.loader), range(start, plan.steps_per_epoch)
            self.hook("on_train_epoch_start")
            for _ in steps:
                compiling = first_step and cfg.compile
                if compiling:
                    self.watchdog.suspend(True)  # a large model may compile for longer than dist.timeout_s
                out = self.train_step(batches, window)
                self.step += 1
                window.add(out)
                if first_step:
                    first_step = False
                    if self.env.is_main:  # what start-up costs: imports, set-up, a compile's first trace
                        print(f"first step done {time.time() - STARTED_AT:.1f} s after start"
                              + (" (torch.compile included)" if compiling else ""), file=sys.stderr, flush=True)
                    if compiling:  # keep the compile out of the first row's rates
                        self.watchdog.suspend(False)
                        window.leave_out_of_timing()
                self.loggers.advance()
                # A stop signal is read at every row (summed over the ranks: every rank stops
                # together); one process reads its own flag every step, at no cost.
                stop = self.stop_requested if self.env.world_size == 1 else False
                if self.logs_after(self.step):
                    self.watchdog.beat(self.step, 0, "logging")
                    stop = self.log_train(epoch, window, out, time.perf_counter() - t0)
                    window = Window()
                if (self.step % plan.steps_per_epoch == 0 or self.step == self.total_steps
                        or stream_mod.epoch_over(batches)):
                    self.end_epoch(epoch)
                if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0 and self.step < self.total_steps:
                    self.evaluate(epoch)
                if self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0:
                    self.save()
                if stop:
                    self.save()
                    self.checkpointer.wait()
                    raise Stopped()
                if self.step >= self.total_steps:
                    break

    def train_step(self, batches, window: Window) -> StepOutput:
        """One optimizer step over the next A micro-batches of `batches`, loaded one at a time.
        Nothing here waits for the device unless the optimizer cannot skip a step on it."""
        strategy, A, beat = self.strategy, self.accumulation, self.watchdog.beat
        nums, dens = [], []
        pair = None
        first = (self.step % self.steps_per_epoch) * A  # Lightning's batch_idx: micro-batches this epoch
        for j in range(A):
            beat(self.step, j, "data")
            waited = time.perf_counter()
            batch = next(batches)
            if not self.on_cpu:  # on the CPU the loader's tensors are already where they go
                batch = data_mod.to_device(batch, self.device)
            window.data_wait += time.perf_counter() - waited
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
                    total = fp32(total)
                    # One micro-batch on one process: its count is the step's, so divide before the
                    # backward rather than pass over every gradient after it (the same math).
                    strategy.backward(total / count if self.whole_step_local else total)
                    nums.append(total.detach())
                    dens.append(count)
                else:
                    out = fp32(out)
                    strategy.backward(out / A if A > 1 else out)
                    nums.append(out.detach())
                self.hook("on_after_backward")
            self.hook("on_train_batch_end", out, batch, first + j)
        beat(self.step, A - 1, "optimizer")
        self.checkpointer.wait_staged()  # an async save's background copy must not see this step's update
        self.hook("on_before_optimizer_step", strategy.optimizer)
        num = nums[0] if A == 1 else torch.stack(nums).sum()
        if pair:
            den = torch.as_tensor(dens[0] if A == 1 else torch.stack([torch.as_tensor(d) for d in dens]).sum(),
                                  device=self.device, dtype=torch.float32)
            # The one all-reduce a step needs for token losses: the global count.
            if not self.whole_step_local:
                totals = all_reduce_sum(torch.stack([num, den]))
                strategy.scale_grads(self.env.world_size / totals[1])
        else:
            num = num / A if A > 1 else num
            den = self.one
        lr = strategy.optimizer.param_groups[0]["lr"]
        if self.skip_on_device:
            # The norm only where it is used (clipping, a row): a finite check is cheaper.
            grad_norm = None
            if len(self.flag_steps) == len(self.flag_views):
                self.read_flags()  # a full buffer (reads come at least every log_every_steps anyway)
            found_inf = self.flag_views[len(self.flag_steps)]
            self.flag_steps.append(self.step + 1)
            if self.cfg.train.grad_clip or self.logs_after(self.step + 1):
                grad_norm = strategy.clip_grad_norm(self.cfg.train.grad_clip)
                found_inf.copy_(nonfinite(grad_norm))
            else:
                strategy.flag_nonfinite(found_inf)
            self.hook("on_before_zero_grad", strategy.optimizer)
            strategy.step(found_inf=found_inf)
            self.schedule.after_step(True, self.step + 1, self.steps_per_epoch)
            return StepOutput(num, den, grad_norm, lr)
        grad_norm = strategy.clip_grad_norm(self.cfg.train.grad_clip)
        # fp16 overflows are the loss scaler's (torch's or DeepSpeed's) to skip; otherwise a
        # non-finite norm is a real problem.
        if self.precision.name != "fp16" and not torch.isfinite(grad_norm).item():
            self.skipped_steps += 1
            if self.cfg.train.on_nonfinite == "stop":
                raise self.nonfinite_error([self.step + 1], grad_norm)
            strategy.zero_grad()
            return StepOutput(num, den, grad_norm, lr)
        self.hook("on_before_zero_grad", strategy.optimizer)
        applied = strategy.step()
        self.schedule.after_step(applied, self.step + 1, self.plan.steps_per_epoch)
        if not applied:
            self.skipped_steps += 1  # fp16 overflow: the scaler skipped it; a per-step schedule waits
        return StepOutput(num, den, grad_norm, lr)

    def logs_after(self, step: int) -> bool:
        return step % self.cfg.train.log_every_steps == 0 or step == self.total_steps

    def read_flags(self) -> None:
        """Count the steps the optimizer skipped on the device since the last read; with
        train.on_nonfinite=stop, stop naming them. Called before every row, evaluation and save."""
        if not self.flag_steps:
            return
        steps, read = self.flag_steps, self.flags[: len(self.flag_steps)]
        flags = read.tolist()
        read.zero_()
        self.flag_steps = []
        bad = [step for step, flag in zip(steps, flags) if flag]
        self.skipped_steps += len(bad)
        if bad and self.cfg.train.on_nonfinite == "stop":
            raise self.nonfinite_error(bad)

    def nonfinite_error(self, steps: list[int], norm: torch.Tensor | None = None) -> NonFiniteError:
        where = f"at step {steps[0]}" + (f" (and {len(steps) - 1} step(s) after it, all skipped)" if len(steps) > 1 else "")
        return NonFiniteError(
            f"non-finite gradient{f' (norm {norm.item()})' if norm is not None else ''} {where}; it never reached "
            "the weights and the last good checkpoint is kept. Set train.on_nonfinite=skip to skip such steps instead"
        )

    def epoch_text(self) -> str:
        if isinstance(self.loader, stream_mod.StreamLoader) and not self.loader.known:
            return "an epoch a pass of the stream"
        return f"{self.plan.steps_per_epoch} an epoch"

    def last_epoch(self) -> int:
        """The epoch of the last step: a stream knows it as it reads (its passes need not be whole steps)."""
        if isinstance(self.loader, stream_mod.StreamLoader):
            return self.loader.epoch
        return max(0, self.step - 1) // self.plan.steps_per_epoch

    def loss(self, model, batch, batch_idx: int):
        if self.lightning:
            return self.lightning.training_step(model, batch, batch_idx)
        return self.recipe.loss(model, batch)

    # ------------------------------------------------------------ logging

    def log_train(self, epoch: int, window: Window, last: StepOutput, elapsed: float) -> bool:
        """Log the window's row: the one host sync of the steps it covers. Returns whether a stop
        signal reached any rank (summed with the loss: one all-reduce)."""
        self.read_flags()
        sums = window.sums()
        stop = torch.tensor([float(self.stop_requested)], device=self.device)
        num, den, stopping = all_reduce_sum(torch.cat([sums, stop])).tolist()
        world, (steps, seconds) = self.env.world_size, window.timing(time.perf_counter())
        # A mean loss contributes one local mean per step and rank; a pair, its totals and counts.
        loss = num / den if den else float("nan")
        samples_per_s = steps * self.plan.global_batch / max(seconds, 1e-9)
        row = {
            "step": self.step, "epoch": epoch, "loss": loss,
            "lr": last.lr, "grad_norm": last.grad_norm.item() if last.grad_norm is not None else float("nan"),
            "step_time": seconds / steps, "data_wait": min(1.0, window.data_wait / max(seconds, 1e-9)),
            "samples_per_s": samples_per_s, "time": round(elapsed, 3),
        }
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        if self.tokens_per_sample:
            row["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_sample and self.peak_flops:
            row["mfu"] = samples_per_s * self.flops_per_sample / (world * self.peak_flops)
        row.update(memory_figures(self.device))
        if self.lightning:
            row.update(self.lightning.step_values())
            if self.loggers.console:
                self.loggers.console.prog_bar = self.lightning.prog_bar_names()
        self.loggers.log(row)
        return stopping > 0

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
        self.read_flags()
        if self.val_set is None:
            return
        model = self.strategy.eval_model
        model.eval()
        self.hook("on_validation_start")
        self.hook("on_validation_epoch_start")
        sums: dict[str, torch.Tensor] = {}
        batch_size = self.cfg.train.eval_batch_size or self.plan.micro_batch
        loader = (stream_mod.EvalStream if stream_mod.is_stream(self.val_set) else data_mod.EvalLoader)(
            self.val_set, batch_size, self.env.rank, self.env.world_size, self.cfg.data.num_workers, self.recipe.collate)
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
        self.read_flags()  # a step skipped for a non-finite gradient under on_nonfinite=stop saves nothing
        meta = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.env.world_size,
            "strategy": self.strategy.name,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "config": self.cfg.to_dict(),  # a resume under a config that changes the math is refused
        }
        strategy = self.strategy
        if isinstance(self.loader, stream_mod.StreamLoader):  # where the stream is, and its state if it has one
            meta["stream"], strategy = self.loader.checkpoint(self.step, self.strategy)
        extra = {}  # what a LightningModule adds to its checkpoint in on_save_checkpoint
        self.hook("on_save_checkpoint", extra)
        self.watchdog.suspend(True)
        try:
            # A LightningModule's hooks run before the next optimizer step and may change the
            # weights: its async save finishes copying them here.
            self.checkpointer.save(self.step, strategy, meta, extra, overlap=self.lightning is None)
        finally:
            self.watchdog.suspend(False)

    def restore(self, path: Path) -> None:
        if not (path / "meta.json").is_file():
            raise ConfigError(f"checkpoint.resume={path} is not a complete checkpoint (no meta.json in it)")
        meta = self.checkpointer.load(path, self.strategy)
        self.step, self.skipped_steps = meta["step"], meta["skipped_steps"]
        self.checkpointer.last_saved_step = self.step  # that checkpoint is this state
        self.schedule.load_state_dict(meta["scheduler"])
        if isinstance(self.loader, stream_mod.StreamLoader):
            self.loader.restore(self.step, meta, path)
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


def memory_figures(device: torch.device) -> dict:
    """Peak memory so far, read without waiting for the device: the CUDA caching allocator's
    high-water marks and its retries (a retry means it freed its cache to satisfy a request:
    memory is tight), or on the CPU the process's peak resident set size."""
    gib = 1024**3
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem_max_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / gib,
                "mem_max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
                "alloc_retries": stats.get("num_alloc_retries", 0)}
    import resource

    return {"mem_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}  # KiB on Linux


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

