"""DeepSpeed ZeRO (stages 0-3) behind the launcher's Strategy interface.

DeepSpeed is an optional dependency, imported only when this strategy is built
(`DeepSpeedStrategy.check` finds it installed before any worker starts).

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
- clip_grad_norm(max) and step(): under ZeRO 1-3 the norm and the clipping
  (DeepSpeed's `gradient_clipping` = train.grad_clip) happen inside
  `engine.step()`, over the gradient partitions only the engine can reach. So
  clip_grad_norm only asks for the norm: it returns a tensor that step() fills
  with the norm DeepSpeed computed (before clipping, over the whole model, the
  same on every rank); nothing is updated before step(), so every hook between
  the two sees the weights before the update. step() runs `engine.step()`; where
  DeepSpeed skipped the update for a non-finite gradient (not an fp16 overflow)
  it sets found_inf, as the other strategies do. Stage 0 (plain data
  parallelism) keeps the torch order: norm and clip in clip_grad_norm.
- checkpoints are DeepSpeed's own layout, written by `engine.save_checkpoint`
  into the launcher's `.tmp` directory (tag = its name; DeepSpeed stores no path
  in the files, so the rename afterwards is safe). Saves are synchronous.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..build import broadcast_buffers
from ..env import ensure_process_group
from ..fs import say
from .base import OptimizerFactory, Strategy, nonfinite

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


def shm_op_built() -> bool:
    """Has DeepSpeed's CPU op been compiled into torch's extension cache already?"""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob("*/deepspeed_shm_comm/*.so")) or any(root.glob("deepspeed_shm_comm/*.so"))


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`; nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ZeRO-3's buffers, in elements. DeepSpeed's defaults (a reduce bucket of 5e8, a reuse distance and a
# sub-group of 1e9) are sized for models of many billions of parameters: under them a model of a few
# hundred million keeps every gathered parameter until its backward and a whole flat copy of its
# gradient partition at the step, on every rank. launcher sizes them from the model instead: its
# largest parameter, at least ZERO3_BUCKET_FLOOR, and twice that live (a user's JSON still decides).
ZERO3_BUCKET_FLOOR = 5_000_000
ZERO3_BUCKETS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_reuse_distance", "sub_group_size")


def zero3_buffers(largest: int) -> dict:
    size = max(largest, ZERO3_BUCKET_FLOOR)
    return {**{key: size for key in ZERO3_BUCKETS}, "stage3_max_live_parameters": 2 * size}


def ds_config(cfg, plan, cuda: bool, largest: int | None = None) -> dict:
    """DeepSpeed's config from ours, then the user's JSON (deepspeed.config) merged over it. `largest`:
    the model's largest parameter (elements), which sizes ZeRO-3's buffers where it is known.

    Raises ConfigError for combinations DeepSpeed or the launcher cannot run;
    DeepSpeedStrategy.check calls this before any worker starts.
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
    if ds.zero_stage == 3 and largest is not None:
        zero.update(zero3_buffers(largest))
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


def zero_stage(config: dict) -> int:
    return int(config["zero_optimization"].get("stage", 0))


def model_dtype(config: dict) -> torch.dtype:
    """The dtype ZeRO keeps the module's parameters in (its fp32 master copy aside)."""
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if config.get("fp16", {}).get("enabled") else torch.float32


def partition_from_one_copy(deepspeed, model: nn.Module, source, config: dict, device: torch.device) -> None:
    """ZeRO-3's own conversion of a built module (what deepspeed.initialize does with zero.Init(module=...)),
    for a skeleton on the meta device: one parameter at a time gets memory on the device, takes rank 0's
    value (broadcast) and is split, so no device holds more than its partitions and one parameter.
    Rank 0's values come from source.host_copy(): the one whole copy, in its host memory. Buffers are
    not partitioned: each gets memory on the device and rank 0's value. Resuming, the checkpoint fills
    what rank 0 has no copy of."""
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    dtype = model_dtype(config)
    fill = source.needs_values(model)
    whole = source.host_copy() if fill else None
    values = dict(whole.named_parameters()) if whole is not None else {}
    names = {id(p): name for name, p in model.named_parameters()}

    class OneAtATime(deepspeed.zero.Init):
        def _convert_to_zero_parameters(self, param_list):
            for param in param_list:
                if is_zero_param(param):
                    continue
                value = values.pop(names[id(param)], None)
                data = (value.detach().to(self.local_device, dtype) if value is not None
                        else torch.empty(param.shape, dtype=dtype, device=self.local_device))
                # In place (a meta tensor cannot take .data of another device): tied modules keep one Parameter.
                torch.utils.swap_tensors(param, nn.Parameter(data, requires_grad=param.requires_grad))
                self._zero_init_param(param)  # broadcast from rank 0, then keep this rank's partition

    if not hasattr(deepspeed.zero.Init, "_convert_to_zero_parameters"):
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no zero.Init._convert_to_zero_parameters, "
                           "which launcher's ZeRO-3 set-up relies on: install a DeepSpeed from 0.15 to 0.19")
    # As deepspeed.initialize does first: DeepSpeed's comm layer over the process group launcher joined.
    deepspeed.comm.init_distributed(dist_backend=deepspeed.accelerator.get_accelerator().communication_backend_name(),
                                    dist_init_required=False)
    OneAtATime(module=model, config_dict_or_path=config, dtype=dtype)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    if fill:
        broadcast_buffers(model, whole, device)


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    skips_on_device = False  # the engine steps (and reads its overflow flag) itself
    uses_torch_scaler = False  # DeepSpeed scales fp16 losses itself

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = None
        self.zero_stage = None
        self._grad_factor: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None  # where step() writes ZeRO's norm

    @classmethod
    def check(cls, cfg, sizes, world_size: int, local_world_size: int | None) -> None:
        super().check(cfg, sizes, world_size, local_world_size)
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed is not installed, but the config asks for it: "
                              "pip install 'launcher[deepspeed]' (or pip install deepspeed)")
        if cfg.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision=fp16 with strategy=deepspeed needs a GPU: DeepSpeed has no fp16 on the CPU. "
                              "Use precision=bf16 (or fp32), or another strategy")
        if cfg.checkpoint.async_save:
            raise ConfigError("checkpoint.async=true is not available with strategy=deepspeed: DeepSpeed writes its "
                              "checkpoints synchronously. Set checkpoint.async=false")
        if cfg.deepspeed.config and not Path(cfg.deepspeed.config).is_file():
            raise ConfigError(f"deepspeed.config={cfg.deepspeed.config}: no such file")
        ds_config(cfg, sizes, cuda=False)  # raises for what DeepSpeed cannot run

    # ------------------------------------------------------------ set-up

    @classmethod
    def shards_parameters(cls, cfg, sizes) -> bool:
        return zero_stage(ds_config(cfg, sizes, cuda=False)) == 3

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, source=None):
        deepspeed = import_deepspeed()
        config = ds_config(self.cfg, self.sizes, cuda=self.device.type == "cuda")
        self.zero_stage = zero_stage(config)
        ensure_process_group(self.device)
        # DeepSpeed sets its device from LOCAL_RANK: the index of the device this process uses.
        local = self.device.index if self.device.type == "cuda" else self.env.local_rank
        for key, value in (("LOCAL_RANK", local), ("RANK", self.env.rank),
                           ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(key, str(value))  # DeepSpeed reads these; a plain one-process run lacks them
        if self.zero_stage == 3:  # a skeleton: partitioned one parameter at a time (docs/design.md, Building the model)
            config = ds_config(self.cfg, self.sizes, cuda=self.device.type == "cuda",
                               largest=max(p.numel() for p in model.parameters()))
            model = self.prepare(model)  # activation checkpointing (compile is refused in ds_config)
            partition_from_one_copy(deepspeed, model, source, config, self.device)
        else:
            model = self.prepare(model.to(self.device))
        optimizer, schedule = make_optimizer(model)  # over the plain module's parameters, before DeepSpeed wraps them
        if self.device.type == "cpu" and not shm_op_built() and self.env.is_main:
            say("DeepSpeed builds its CPU communication op (deepspeed_shm_comm) on its first run on this machine: "
                "about a minute or two, once (it is cached in ~/.cache/torch_extensions)")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        engine.set_gradient_accumulation_boundary(True)  # we say where the boundaries are (no_sync)
        self.engine = self.model = engine
        # ZeRO keeps the torch optimizer and its param_groups (the params replaced by fp32
        # partitions): its "lr" is what the update uses. Stage 0 steps it as it is.
        self.optimizer = optimizer
        return schedule

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
        """Stage 0: torch's clipping. ZeRO 1-3 clip inside their step (gradient_clipping): the tensor
        returned holds the norm once step() has run (see the module docstring)."""
        if self.zero_stage == 0:
            return super().clip_grad_norm(max_norm)
        self._norm = torch.full((), float("nan"), device=self.device)
        return self._norm

    @property
    def skips_on_device(self) -> bool:
        return False  # the engine steps, and reads its overflow flag, itself

    def step(self, found_inf: torch.Tensor | None = None, norm: torch.Tensor | None = None) -> bool:
        """engine.step(), with this step's gradient factor folded into the ZeRO optimizer's loss scale.
        A step DeepSpeed skipped is an fp16 overflow (False) or, without fp16, a non-finite gradient
        (found_inf set)."""
        if found_inf is None:
            found_inf = torch.zeros((), device=self.device)
        if self.zero_stage == 0:
            if norm is None:
                norm = super().clip_grad_norm(None)
            found_inf.copy_(nonfinite(norm))
            if not found_inf.item():  # DeepSpeed's stage-0 step has no skip of its own without fp16
                self.engine.step()
            self.zero_grad()
            return True
        factor, self._grad_factor = self._grad_factor, None
        with self._gradient_factor(factor):
            self.engine.step()
        applied = bool(self.engine.was_step_applied())
        if self._norm is not None:
            ds_norm = self.engine.get_global_grad_norm()  # None: compute_grad_norm=false in the user's JSON
            if ds_norm is not None:  # a Python number, or a tensor on the device
                self._norm.copy_(ds_norm) if torch.is_tensor(ds_norm) else self._norm.fill_(float(ds_norm))
            self._norm = None
        if self.precision.name == "fp16":
            return applied
        found_inf.fill_(float(not applied))
        return True

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
        path = Path(path)  # of this world size: checkpoint.resume_from refuses another
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        self.engine.set_gradient_accumulation_boundary(True)

    def close(self) -> None:
        self.engine.destroy()  # its hooks and buffers, before the process group is destroyed
