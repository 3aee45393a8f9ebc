"""One optimizer step: A micro-steps, the loss normalisation and the non-finite guard.

The rule that makes every world size W and accumulation A train the update of one big batch
(docs/design.md, Loss normalisation):

- a mean loss is divided by A; the strategies average the gradients over the W ranks, so the
  gradient is the mean over the global batch;
- a (total, count) loss is backpropagated as the plain sum; after the last micro-step one
  all-reduce sums the counts over micro-steps and ranks into C, and the gradients (averaged over W
  by the strategy) are multiplied by W / C: d(sum of all totals)/C, whatever each micro-batch held.

The guard: every step's non-finite flag is set on the device (from the gradient norm, or a fused
check where no norm is needed) and handed to the strategy's step, which skips the update where it
is set. The flags are read on the host at the next row, evaluation or save, or at once where the
strategy had to read its flag anyway; with train.on_nonfinite=stop a flagged step ends the run.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .data import to_device
from .env import all_reduce_sum
from .errors import NonFiniteError
from .rows import StepOutput, Window
from .strategies.base import nonfinite


def fp32(t: torch.Tensor) -> torch.Tensor:
    """The loss in fp32 (autocast may give bf16); an fp32 one as it is, without a dispatch."""
    return t if t.dtype is torch.float32 else t.float()


class NonFiniteGuard:
    """One device flag a step since they were last read (at most log_every_steps steps)."""

    def __init__(self, size: int, device: torch.device, on_nonfinite: str):
        self.flags = torch.zeros(size, device=device)
        self.views = list(self.flags)  # one scalar view a step, made once
        self.steps: list[int] = []  # the steps those flags belong to
        self.on_nonfinite = on_nonfinite

    def flag_for(self, step: int) -> tuple[torch.Tensor, int]:
        """A zeroed flag for `step`, and the bad steps a full buffer had to be read for first."""
        bad = self.read() if len(self.steps) == len(self.views) else 0
        self.steps.append(step)
        return self.views[len(self.steps) - 1], bad

    def read(self) -> int:
        """The flagged steps since the last read (a host read). With on_nonfinite=stop, a flagged step
        raises NonFiniteError naming it."""
        if not self.steps:
            return 0
        steps, read = self.steps, self.flags[: len(self.steps)]
        flags = read.tolist()
        read.zero_()
        self.steps = []
        bad = [step for step, flag in zip(steps, flags) if flag]
        if bad and self.on_nonfinite == "stop":
            raise nonfinite_error(bad)
        return len(bad)


def nonfinite_error(steps: list[int]) -> NonFiniteError:
    """What the disk holds is for the trainer to add (an async save may still be finishing)."""
    later = f" (and {len(steps) - 1} step(s) after it, all skipped)" if len(steps) > 1 else ""
    if steps[0] == 1:
        return NonFiniteError(
            f"non-finite gradient (NaN or inf) at step 1{later}, before any update: the loss is not finite from the "
            "start. That is usually the recipe's loss (a log or a division by zero), NaN or inf in the data, or a "
            "model whose output overflows (with precision=fp16, try bf16). train.on_nonfinite=skip would skip every "
            "such step, so fix the cause first. Nothing reached the weights")
    return NonFiniteError(
        f"non-finite gradient (NaN or inf) at step {steps[0]}{later}; it never reached the weights. Set "
        "train.on_nonfinite=skip to skip such steps instead, or lower optim.lr (or set train.grad_clip) if the loss "
        "was rising before it")


class StepRunner:
    """Runs optimizer steps for the trainer. `run` is the recipe's or the LightningModule's calls
    (hooks, loss); `state` the run_state.RunState whose step counter the trainer advances."""

    def __init__(self, cfg, env, sizes, device, strategy, precision, run, recipe, checkpointer, watchdog, state):
        self.cfg, self.env, self.sizes, self.device = cfg, env, sizes, device
        self.strategy, self.precision, self.run, self.recipe = strategy, precision, run, recipe
        self.checkpointer, self.watchdog, self.state = checkpointer, watchdog, state
        self.schedule = None  # set by the trainer once the strategy has built the optimizer
        self.guard = NonFiniteGuard(cfg.train.log_every_steps, device, cfg.train.on_nonfinite)
        self.one = torch.ones((), device=device)  # a mean loss's denominator, every step
        # One micro-batch on one process: a pair's count is the step's, known without a collective.
        self.whole_step_local = strategy.name == "single" and sizes.accumulation == 1
        self.checked = False  # the loss checked once for a gradient to flow through it

    def train_step(self, batches, window: Window) -> StepOutput:
        """One optimizer step over the next A micro-batches of `batches`, loaded one at a time.
        Nothing here waits for the device unless the strategy cannot skip a step on it."""
        step, A = self.state.step, self.sizes.accumulation
        spe = self.sizes.steps_per_epoch
        first = (step % spe if spe else step) * A  # Lightning's batch_idx: micro-batches this epoch
        nums, dens, pair = [], [], None
        for j in range(A):
            batch = self.next_batch(batches, window, step, j)
            self.run.hook("on_train_batch_start", batch, first + j)
            with contextlib.nullcontext() if j == A - 1 else self.strategy.no_sync():
                out, pair = self.micro_step(batch, first + j, step, j, pair)
            if pair:
                nums.append(out[0].detach())
                dens.append(out[1])
            else:
                nums.append(out.detach())
            self.run.hook("on_train_batch_end", out, batch, first + j)
        self.watchdog.beat(step, A - 1, "optimizer")
        self.checkpointer.wait_staged()  # an async save's background copy must not see this step's update
        self.run.hook("on_before_optimizer_step", self.strategy.optimizer)
        num, den = self.normalise(nums, dens, pair)
        lr = self.strategy.optimizer.param_groups[0]["lr"]
        return StepOutput(num, den, self.optimizer_step(step + 1), lr)

    def next_batch(self, batches, window: Window, step: int, j: int):
        self.watchdog.beat(step, j, "data")
        waited = time.perf_counter()
        batch = next(batches)
        if self.device.type != "cpu":  # on the CPU the loader's tensors are already where they go
            batch = to_device(batch, self.device)
        window.data_wait += time.perf_counter() - waited
        return batch

    def micro_step(self, batch, batch_idx: int, step: int, j: int, pair: bool | None):
        """Forward and backward of one micro-batch; returns (the loss as the recipe gave it, its form)."""
        self.watchdog.beat(step, j, "forward")
        with self.precision.autocast():
            out = self.run.loss(self.strategy.model, batch, batch_idx)
        if pair is None:  # the first micro-batch of a step: the loss's form (and, once, that it can train)
            pair = self.recipe.loss_is_pair(out, step) if self.checked else self.recipe.check_loss_output(out, step)
            self.checked = True
        self.watchdog.beat(step, j, "backward")
        self.run.hook("on_before_backward", out)
        if pair:
            total, count = fp32(out[0]), out[1]
            out = (total, count)
            # One micro-batch on one process: its count is the step's, so divide before the
            # backward rather than pass over every gradient after it (the same math).
            self.strategy.backward(total / count if self.whole_step_local else total)
        else:
            out = fp32(out)
            A = self.sizes.accumulation
            self.strategy.backward(out / A if A > 1 else out)
        self.run.hook("on_after_backward")
        return out, pair

    def normalise(self, nums: list, dens: list, pair: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss numerator and denominator for the row; for a pair, the gradients scaled
        by W / C (the one all-reduce a step that token losses need)."""
        A = len(nums)
        num = nums[0] if A == 1 else torch.stack(nums).sum()
        if not pair:
            return (num / A if A > 1 else num), self.one
        # The count without a copy from the host (a blocking one on a GPU): the counts given as Python
        # numbers are summed here and filled in (a kernel argument), tensors are added to that on the
        # device (a CPU scalar tensor is a kernel argument too).
        den = torch.full((), float(sum(d for d in dens if not torch.is_tensor(d))), device=self.device,
                         dtype=torch.float32)
        for d in dens:
            if torch.is_tensor(d):
                den += d.detach()
        if not self.whole_step_local:
            totals = all_reduce_sum(torch.stack([num, den]))
            self.strategy.scale_grads(self.env.world_size / totals[1])
        return num, den

    def optimizer_step(self, step: int) -> torch.Tensor | None:
        """Clip, flag, step; returns the gradient norm where it was computed (clipping, a logged row)."""
        strategy, clip = self.strategy, self.cfg.train.grad_clip
        flag, bad = self.guard.flag_for(step)
        norm = strategy.clip_grad_norm(clip) if clip or self.state.should_log(step) else None
        self.run.hook("on_before_zero_grad", strategy.optimizer)
        applied = strategy.step(found_inf=flag, norm=norm)
        if not applied:
            bad += 1  # an fp16 overflow: the loss scaler skipped it, and a per-step schedule waits
        elif not strategy.skips_on_device:
            bad += self.guard.read()  # the strategy read the flag already: stop now, not at the next row
        self.state.skipped_steps += bad
        self.schedule.after_step(applied, step, self.sizes.steps_per_epoch)
        return norm

    def read_flags(self) -> None:
        """Count the steps skipped on the device since the last read (before every row, evaluation
        and save); with on_nonfinite=stop a skipped step stops the run, naming it."""
        self.state.skipped_steps += self.guard.read()
