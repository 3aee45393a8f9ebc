"""DeepSpeed ZeRO (stages 0-3) behind the launcher's Strategy interface.

DeepSpeed is an optional dependency, imported only when this strategy is built
(launcher/cli.py checks it is installed before any worker starts).

How the trainer's calls map onto the engine:

- setup: the launcher's optimizer is built over the plain module and handed to
  `deepspeed.initialize` with a config generated from ours (batch sizes from the
  batch plan, ZeRO stage and offload, bf16/fp16, gradient clipping), with the
  user's `deepspeed.config` JSON merged over it last. The process group the
  launcher joined is reused (`dist_init_required=False`). `self.optimizer` is that
  torch optimizer: ZeRO steps it over its flat fp32 partitions, keeping its
  `param_groups` dicts, so the trainer's LambdaLR on it drives the update.
- no_sync(): `engine.set_gradient_accumulation_boundary(False)` for non-final
  micro-steps, True otherwise; DeepSpeed's own micro-step counter is not used.
  (ZeRO-1 then reduces once per step; ZeRO-2/3 reduce-scatter every micro-step
  into their partitions, as they always do.)
- backward(loss): `engine.backward(loss, scale_wrt_gas=False)`: the trainer has
  already divided a mean loss by the accumulation steps. DeepSpeed averages the
  gradients over the ranks, as DDP does.
- scale_grads(f) (only for (total, count) losses): ZeRO 1-3 keep the reduced
  gradients in their own partition buffers. Their step divides those by the
  optimizer's loss scale `s` (1 without fp16), and computes the norm and the
  clipping coefficient from the gradients divided by `s`. Setting the scale to
  `s / f` for that one step (through the ZeRO optimizer's `external_loss_scale`,
  the hook behind its public `override_loss_scale`) therefore multiplies the
  gradients by exactly `f` before the norm, the clipping and the update, on every
  stage and with optimizer offload, and leaves the fp16 dynamic scaler's own
  state untouched. Stage 0 scales `param.grad` directly.
- clip_grad_norm(max): under ZeRO 1-3 the norm, the clipping (DeepSpeed's
  `gradient_clipping` = train.grad_clip) and the update happen together in
  `engine.step()`; so this call runs `engine.step()` and returns the norm
  DeepSpeed computed (before clipping, over the whole model, the same on every
  rank). step() then only reports whether the update was applied (False when
  DeepSpeed skipped it for a non-finite gradient or an fp16 overflow). A
  non-finite gradient is thus already skipped by DeepSpeed when the trainer sees
  the infinite norm: consistent with train.on_nonfinite=skip, and with =stop the
  run stops as usual. Stage 0 (plain data parallelism) keeps the torch order:
  norm and clip here, update in step().
- checkpoints are DeepSpeed's own layout, written by `engine.save_checkpoint`
  into the launcher's `.tmp` directory (tag = its name; DeepSpeed stores no path
  in the files, so the rename afterwards is safe). Saves are synchronous.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..env import ensure_process_group
from .base import OptimizerFactory, Strategy

# Keys whose values come from the launcher's batch plan; a user JSON may not contradict them.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def import_deepspeed():
    if not torch.cuda.is_available():
        # Without CUDA DeepSpeed would probe for other accelerators and warn; say it is the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would drown the launcher's
    # DeepSpeed calls collectives torch has renamed, once per layer and step: not the user's concern.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`; nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def ds_config(cfg, plan, cuda: bool) -> dict:
    """DeepSpeed's config from ours, then the user's JSON (deepspeed.config) merged over it.

    Raises ConfigError for combinations DeepSpeed or the launcher cannot run; cli.py
    calls this before any worker starts.
    """
    ds = cfg.deepspeed
    if cfg.train.compile:
        # Not wired: ZeRO-3 gathers parameters in hooks on every submodule, inside the units compile
        # would trace, and DeepSpeed's own engine.compile() is another path the launcher does not drive.
        raise ConfigError("train.compile=true is not supported with strategy=deepspeed: set train.compile=false, "
                          "or use strategy=fsdp (sharding like ZeRO-3) or ddp, which compile each shard unit")
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        # Stage 0 clips in clip_grad_norm (torch), ZeRO inside its step.
        "gradient_clipping": float(cfg.train.grad_clip or 0.0) if ds.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        # The launcher's (torch) optimizer, also with optimizer offload (slower than DeepSpeedCPUAdam,
        # but the same math as every other strategy).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # the launcher logs; DeepSpeed's own progress lines are noise
        "wall_clock_breakdown": False,
    }
    if ds.config:
        try:
            user = json.loads(Path(ds.config).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"deepspeed.config={ds.config} is not a readable JSON file: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed.config={ds.config} must hold a JSON object, not {type(user).__name__}")
        config = deep_merge(config, user)
        clash = {k: (config[k], ours) for k, ours in zip(BATCH_KEYS, (plan.global_batch, plan.micro_batch,
                                                                      plan.accumulation)) if config[k] != ours}
        if clash:
            raise ConfigError(
                f"deepspeed.config={ds.config} sets {', '.join(f'{k}={v[0]}' for k, v in clash.items())}, but the "
                f"launcher's batch plan needs {', '.join(f'{k}={v[1]}' for k, v in clash.items())}: remove these "
                "keys from the JSON and set train.global_batch_size / train.micro_batch_size instead"
            )
    stage = int(config["zero_optimization"].get("stage", 0))
    if stage == 0 and cfg.precision != "fp32":
        raise ConfigError(
            f"deepspeed.zero_stage=0 with precision={cfg.precision} is not supported: DeepSpeed's "
            "stage-0 bf16/fp16 optimizers keep gradients where the launcher cannot scale them exactly. "
            "Use strategy=ddp (the same math without sharding) or deepspeed.zero_stage>=1"
        )
    if ds.offload_params and stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3 (only stage 3 partitions "
                          "the parameters): set zero_stage=3 or offload_params=false")
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    skips_on_device = False  # the engine steps (and reads its overflow flag) itself
    uses_torch_scaler = False  # DeepSpeed scales fp16 losses itself

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = None
        self.zero_stage = None
        self._grad_factor: torch.Tensor | None = None
        self._applied: bool | None = None

    # ------------------------------------------------------------ set-up

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        deepspeed = import_deepspeed()
        config = ds_config(self.cfg, self.plan, cuda=self.device.type == "cuda")
        self.zero_stage = int(config["zero_optimization"].get("stage", 0))
        ensure_process_group(self.device)
        for key, value in (("LOCAL_RANK", self.env.local_rank), ("RANK", self.env.rank),
                           ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(key, str(value))  # DeepSpeed reads these; a plain one-process run lacks them
        model = self.prepare(model.to(self.device))  # activation checkpointing (compile is refused in ds_config)
        optimizer = make_optimizer(model)  # over the plain module's parameters, before DeepSpeed wraps them
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        engine.set_gradient_accumulation_boundary(True)  # we say where the boundaries are (no_sync)
        self.engine = self.model = engine
        # ZeRO keeps the torch optimizer and its param_groups (the params replaced by fp32
        # partitions): its "lr" is what the update uses. Stage 0 steps it as it is.
        self.optimizer = optimizer

    @property
    def eval_model(self) -> nn.Module:
        # The engine: under ZeRO-3 its hooks gather each layer's parameters for the forward
        # (every rank runs the same number of validation batches).
        return self.engine

    # ------------------------------------------------------------ one step

    @contextlib.contextmanager
    def no_sync(self):
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.engine.module.parameters() if p.grad is not None]

    def scale_grads(self, factor: torch.Tensor) -> None:
        if self.zero_stage == 0:
            super().scale_grads(factor)  # full, reduced gradients in param.grad
        else:
            self._grad_factor = factor  # applied inside the ZeRO step: see the module docstring

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        if self.zero_stage == 0:
            return super().clip_grad_norm(max_norm)
        self._applied = self._zero_step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # zero_optimization.compute_grad_norm=false in the user's JSON
            return torch.full((), float("nan"), device=self.device)
        return torch.as_tensor(norm, dtype=torch.float32).to(self.device).reshape(())

    def _zero_step(self) -> bool:
        """engine.step() with this step's gradient factor folded into the ZeRO optimizer's loss scale."""
        factor, self._grad_factor = self._grad_factor, None
        with self._gradient_factor(factor):
            self.engine.step()
        return bool(self.engine.was_step_applied())

    @contextlib.contextmanager
    def _gradient_factor(self, factor: torch.Tensor | None):
        opt = self.engine.optimizer
        if factor is None:
            yield
            return
        if not hasattr(opt, "external_loss_scale") or not hasattr(opt, "loss_scaler"):
            raise NotImplementedError(
                f"DeepSpeed chose the optimizer wrapper {type(opt).__name__}, whose gradients the launcher cannot "
                "scale for a (total, count) loss; remove data_types.grad_accum_dtype from deepspeed.config"
            )
        saved = (opt.custom_loss_scaler, opt.external_loss_scale)
        backward_scale = float(opt.external_loss_scale if opt.custom_loss_scaler else opt.loss_scaler.cur_scale)
        # One host read a step; DeepSpeed's step synchronises for its overflow check anyway.
        opt.custom_loss_scaler, opt.external_loss_scale = True, backward_scale / float(factor)
        try:
            yield
        finally:
            opt.custom_loss_scaler, opt.external_loss_scale = saved

    def step(self) -> bool:
        if self.zero_stage == 0:
            self.engine.step()
            return bool(self.engine.was_step_applied())
        applied, self._applied = self._applied, None
        if applied is None:
            raise RuntimeError("DeepSpeedStrategy.step() without clip_grad_norm(): under ZeRO the engine steps "
                               "in clip_grad_norm, where it computes the norm")
        return applied

    def zero_grad(self) -> None:
        # ZeRO clears (or, on overflow, discards) its gradient partitions in its own step.
        self.engine.zero_grad()

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed checkpoints are written by save_checkpoint (DeepSpeed's own layout)")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed checkpoints are read by load_checkpoint (DeepSpeed's own layout)")

    def save_checkpoint(self, path, async_save: bool = False):
        """Every rank writes its partition under `path` (sync: DeepSpeed has no async save here)."""
        path = Path(path)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        return None

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        saved_ranks = len(list(path.glob("*zero_pp_rank_*_optim_states.pt")))
        world = self.engine.dp_world_size
        if saved_ranks and saved_ranks != world:
            raise ConfigError(
                f"{path} is a DeepSpeed ZeRO checkpoint of {saved_ranks} ranks, and DeepSpeed cannot re-partition "
                f"its optimizer state for {world}: resume with {saved_ranks} processes (--nproc {saved_ranks}), "
                "or start afresh with checkpoint.resume=never"
            )
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        self.engine.set_gradient_accumulation_boundary(True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights under the module's own names (tied ones under each name), fp32 where
        the parameter is floating point, on CPU, on every rank. A collective: all ranks call it.

        ZeRO keeps fp32 master weights in its partitions; each trainable parameter is gathered
        from there. Parameters outside the optimizer (frozen ones) come from the module itself,
        gathered under ZeRO-3 (with bf16/fp16 they are the low-precision copy, widened).
        """
        deepspeed = import_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        entries = module.state_dict(keep_vars=True)
        low_precision = self.precision.name != "fp32"
        full: dict[int, torch.Tensor] = {}
        for tensor in entries.values():
            if id(tensor) in full or not isinstance(tensor, nn.Parameter):
                continue
            value = None
            if self.zero_stage == 3 or low_precision:
                value = safe_get_full_fp32_param(tensor)  # collective; the same order on every rank
            if value is None:
                if hasattr(tensor, "ds_id"):  # a ZeRO-3 parameter outside the optimizer
                    with deepspeed.zero.GatheredParameters([tensor]):
                        value = tensor.detach().clone()
                else:  # ZeRO 0-2: every rank holds the full (fp32 with fp32 training) parameter
                    value = tensor.detach()
            full[id(tensor)] = value
        out = {}
        for name, tensor in entries.items():
            value = full.get(id(tensor), tensor.detach() if torch.is_tensor(tensor) else tensor)
            if torch.is_tensor(value):
                value = value.float() if value.is_floating_point() else value
                value = value.cpu().clone()
            out[name] = value
        return out

    def close(self) -> None:
        self.engine.destroy()  # its hooks and buffers, before the process group is destroyed

    def local_numel(self) -> dict[str, int]:
        """Elements this rank holds: the module's parameters (its partition under ZeRO-3) and the
        optimizer state (partitioned under ZeRO 1-3, padded to equal partitions)."""
        params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                     for p in self.engine.module.parameters())
        optim = sum(v.numel() for s in self.optimizer.state.values()
                    for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        return {"params": params, "optim": optim}
