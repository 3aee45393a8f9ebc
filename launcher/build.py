"""Building the recipe's model: whole on each process, or on the meta device and filled in place.

The rule (docs/design.md, Building the model):

- Replicated strategies (single, ddp, ZeRO 0-2) get the whole model on every rank, built from the
  seed as a script would build it.
- Sharding strategies (fsdp, ZeRO-3) get a skeleton: the model built on the meta device (shapes, no
  memory) on every rank. They shard it, give each rank's shards memory, and then fill them from
  one of three sources, so that no process but one ever holds the whole model:
  - the recipe's `init_weights(model)` (torchtitan's contract): every rank initialises its own
    shards in place. A random fill of a sharded parameter draws the whole parameter's numbers,
    as one process would, and keeps the rank's part (`FullDraws`): one parameter at a time, so the
    weights are those of one process at any world size;
  - else one process, global rank 0, builds the model in host memory from the seed, and its
    values are broadcast tensor by tensor into every rank's shards;
  - else, when resuming, nothing: the checkpoint fills parameters, buffers and optimizer state.
    A model with non-persistent buffers (not in any checkpoint) still takes them from the first
    or second source.
- With `init_weights` the replicated strategies build on meta too and initialise on the device, so
  that every strategy starts from the same weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .recipe import Recipe, unwrap_lightning

aten = torch.ops.aten
# In-place random fills: what torch.nn.init and Tensor.normal_() & co. come down to.
RANDOM_FILLS = {aten.normal_, aten.uniform_, aten.bernoulli_, aten.random_, aten.exponential_, aten.cauchy_,
                aten.log_normal_, aten.geometric_}


class ModelSource:
    """The recipe's model for one process: `build` gives what the strategy will own; a sharding
    strategy then calls `fill` (FSDP: into DTensor shards) or `host_copy` (ZeRO-3: the values its
    own conversion takes)."""

    def __init__(self, recipe: Recipe, seed: int, rank: int, device: torch.device, resuming: bool):
        self.recipe, self.seed, self.rank, self.device, self.resuming = recipe, seed, rank, device, resuming
        self.init_weights = getattr(recipe.module, "init_weights", None)

    # ------------------------------------------------------------ what the strategy owns

    def build(self, on_meta: bool) -> nn.Module:
        """The skeleton (on_meta) or the whole model, initialised from the seed."""
        if on_meta:
            return self.skeleton()
        if self.init_weights is None:
            torch.manual_seed(self.seed)
            return self.recipe.build_model()
        model = to_empty(self.skeleton(), self.device)
        self.initialise(model)
        return model

    def skeleton(self) -> nn.Module:
        with torch.device("meta"):
            return self.recipe.build_model()

    def initialise(self, model: nn.Module) -> None:
        """The recipe's init_weights on every parameter and buffer, right after the seed; random fills
        of sharded parameters draw as one process would."""
        torch.manual_seed(self.seed)
        with torch.no_grad(), FullDraws():
            self.recipe._call("init_weights", self.init_weights, unwrap_lightning(model))

    # ------------------------------------------------------------ filling a skeleton

    def needs_values(self, model: nn.Module) -> bool:
        """A fresh start, or buffers that no checkpoint holds."""
        return not self.resuming or has_non_persistent_buffers(model)

    def fill(self, model: nn.Module, params_on: torch.device | None = None) -> None:
        """Give a sharded skeleton memory (parameters on `params_on`, the host for FSDP's CPU offload;
        buffers on the device) and its initial values. Every rank calls it, in the same order."""
        to_empty(model, params_on or self.device)
        if params_on is not None and params_on != self.device:
            for module in model.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(self.device)
        if not self.needs_values(model):
            return
        if self.init_weights is not None:
            self.initialise(model)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        whole = self.host_copy()
        set_model_state_dict(model, whole.state_dict() if whole is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        broadcast_buffers(model, whole, self.device, persistent=False)  # set_model_state_dict has the rest
        del whole

    def host_copy(self) -> nn.Module | None:
        """Global rank 0: the whole model in host memory with its initial values, the one copy the
        others are filled from (None on the other ranks). Afterwards every rank's RNG continues from
        rank 0's, as if each had built the model itself."""
        whole = None
        if self.rank == 0:
            if self.init_weights is None:
                torch.manual_seed(self.seed)
                whole = self.recipe.build_model()
                self.recipe.check_trainable(whole)  # a model() that returns meta tensors has no values to give
            else:
                whole = to_empty(self.skeleton(), torch.device("cpu"))
                self.initialise(whole)
        if dist.is_initialized() and dist.get_world_size() > 1:
            state = torch.get_rng_state()
            torch.set_rng_state(broadcast_from_rank0(state).cpu())
        return whole


def to_empty(model: nn.Module, device: torch.device) -> nn.Module:
    """Memory without values for every parameter and buffer. Each parameter's tensor is swapped in
    place: Module.to_empty would otherwise make a new Parameter per module and untie tied weights."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `t` (in place where the default group has a backend for its device, as
    launcher's groups do: gloo on the CPU, NCCL beside gloo with CUDA; else through this GPU)."""
    types = {d.type for d in dist.distributed_c10d._get_default_group()._device_types}
    on = t if t.device.type in types else t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.broadcast(on, src=0)
    return on


def has_non_persistent_buffers(model: nn.Module) -> bool:
    return any(module._non_persistent_buffers_set for module in model.modules())


def broadcast_buffers(model: nn.Module, source: nn.Module | None, device: torch.device, persistent: bool = True) -> None:
    """Each buffer of `model` (on the device) takes rank 0's value from `source`, one at a time; only
    the non-persistent ones unless `persistent`."""
    values = dict(source.named_buffers()) if source is not None else {}
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is None or (not persistent and name not in module._non_persistent_buffers_set):
                continue
            key = f"{module_name}.{name}" if module_name else name
            if key in values:
                buffer.copy_(values[key])
            if dist.is_initialized() and dist.get_world_size() > 1:
                on = broadcast_from_rank0(buffer)
                if on is not buffer:
                    buffer.copy_(on)


class FullDraws(TorchDispatchMode):
    """While active, a random fill of a sharded parameter (a DTensor) draws the whole parameter's
    numbers on its device, as one process would, and keeps this rank's part; a copy of a whole
    tensor into one keeps this rank's part too. Every rank therefore advances its RNG exactly as one
    process does, and its shards hold what that process's parameters hold. DTensor's own random
    ops cannot give this: on the CPU they draw each shard from the start of the stream, and on
    CUDA they use offsets that one process's draws do not."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if is_dtensor(target) and not target.is_meta:
            if func.overloadpacket in RANDOM_FILLS:
                whole = torch.empty(target.shape, dtype=target.dtype, device=local_part(target).device)
                func(whole, *args[1:], **kwargs)
                local_part(target).copy_(whole[shard_slices(target)])
                return target
            if func.overloadpacket is aten.copy_ and not is_dtensor(args[1]) and args[1].shape == target.shape:
                local_part(target).copy_(args[1][shard_slices(target)])
                return target
        return func(*args, **kwargs)


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def local_part(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor


def shard_slices(t) -> tuple[slice, ...]:
    """The part of the whole tensor this rank's local tensor holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for s, o in zip(shape, offset))
