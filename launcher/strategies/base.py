"""The interface the trainer holds. It never asks which strategy it has.

A strategy owns the wrapped model, the optimizer and the gradient scaler, and checks its own
config before any worker starts (`check`). The trainer calls, per optimizer step:

    for each micro-batch:  with no_sync() (all but the last):  backward(loss)
    scale_grads(f)                         # only for (total, count) losses
    norm = clip_grad_norm(max_norm)        # clips, nothing else (where a norm is wanted)
    step(found_inf, norm)                  # the update, unless a gradient is not finite
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import ConfigError
from ..precision import Precision
from ..storage import dcp_reader, dcp_writer

STAGER_REUSABLE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy:
    name = "base"
    uses_torch_scaler = True  # fp16 through torch.amp.GradScaler (DeepSpeed brings its own)

    def __init__(self, cfg, env, device: torch.device, precision: Precision, sizes=None,
                 shard_units: Callable[[nn.Module], list[nn.Module]] | None = None):
        self.cfg, self.env, self.device, self.precision = cfg, env, device, precision
        self.sizes, self.shard_units = sizes, shard_units or default_shard_units
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._checkpoint_group = None
        self._stager = None  # async saves' staging, kept between saves
        self._params: list[torch.Tensor] | None = None
        self._one: torch.Tensor | None = None

    # ------------------------------------------------------------ checks, before any worker

    @classmethod
    def check(cls, cfg, sizes, world_size: int, local_world_size: int | None) -> None:
        """Raise ConfigError for what this strategy cannot run with this config, batch sizes and
        world size. Called once, before any worker starts; the workers do not check again.
        local_world_size: the processes on this node, or None where it is not known yet (the
        process that starts a node's workers)."""
        if cfg.fsdp.replicate != 1:
            raise ConfigError(f"fsdp.replicate={cfg.fsdp.replicate} (HSDP) needs strategy=fsdp, and this run's "
                              f"strategy is {cls.name}: set strategy=fsdp, or leave fsdp.replicate out")
        if cfg.tp.size > 1:
            raise ConfigError(f"tp.size={cfg.tp.size} (tensor parallelism) needs strategy=fsdp (or auto), which "
                              f"shards over the data-parallel ranks, and this run's strategy is {cls.name}: set "
                              "strategy=fsdp, or tp.size=1")

    # ------------------------------------------------------------ set-up

    @classmethod
    def shards_parameters(cls, cfg, sizes) -> bool:
        """Does this strategy split the parameters over the ranks? Then the trainer hands setup() the
        model as a skeleton on the meta device, which setup fills (docs/design.md, Building the model)."""
        return False

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, source=None):
        """Checkpoint and compile the units, wrap the model, then build the optimizer over the wrapped
        parameters. make_optimizer returns (optimizer, schedule or None); setup returns the schedule.
        `model` is whole, with its initial weights; `source` (build.ModelSource) is what a strategy
        that shards the parameters fills its skeleton from."""
        self.model = self.wrap(self.prepare(model.to(self.device)))
        self.optimizer, schedule = make_optimizer(self.model)
        return schedule

    def prepare(self, model: nn.Module) -> nn.Module:
        """train.activation_checkpointing, then train.compile, on each outermost shard unit, in place
        and before wrap: FSDP2's fully_shard then goes around both (its hooks stay out of the compiled
        code). Only the unit's own forward changes: parameter names and state dicts stay as they are."""
        t = self.cfg.train
        if t.sync_batchnorm and self.env.world_size > 1:  # CUDA only: checked before any worker
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if not (t.activation_checkpointing or t.compile):
            return model
        units = outermost([u for u in self.shard_units(model) if u is not model])
        if t.activation_checkpointing:  # units there are: checked before any worker (check_checkpoint_units)
            for unit in units:
                checkpoint_forward(unit)
        if t.compile:
            # Without units, the whole model; for a LightningModule its own forward, not training_step.
            for unit in units or [getattr(model, "module", model) if type(model).__name__ == "LightningAdapter"
                                  else model]:
                unit.forward = torch.compile(unit.forward)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def eval_model(self) -> nn.Module:
        """The module to run validation with (no gradient synchronisation there)."""
        return self.model

    # ------------------------------------------------------------ one step

    def no_sync(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler else loss).backward()

    def grads(self) -> list[torch.Tensor]:
        if self._params is None:  # fixed once wrapped; walking the module tree every step costs more
            self._params = list(self.model.parameters())
        return [p.grad for p in self._params if p.grad is not None]

    def flag_nonfinite(self, found: torch.Tensor) -> None:
        """Set the float scalar `found` (zero) to 1 where some gradient holds a NaN or an inf, the
        same on every rank: for steps that need no norm (no clipping, no row). One fused pass over
        whole gradients (single, DDP: every rank holds the reduced gradient); sharded ones need the
        reduced norm instead."""
        grads = self.grads()
        if not grads or hasattr(grads[0], "full_tensor") or len({g.dtype for g in grads}) > 1:
            found.copy_(nonfinite(self.clip_grad_norm(None)))
            return
        if self._one is None:
            self._one = torch.ones((), device=found.device)
        # The gradient scaler's own check: it also multiplies by 1.0, which changes no value.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)

    def scale_grads(self, factor: torch.Tensor) -> None:
        grads = self.grads()
        if grads:
            torch._foreach_mul_(grads, factor)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Unscale (fp16), clip if max_norm is set, and return the total norm, the same on every rank."""
        if self.precision.scaler:
            self.precision.scaler.unscale_(self.optimizer)
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return torch.nn.utils.get_total_norm(self.grads(), foreach=True)  # for the log and the finite check

    @property
    def skips_on_device(self) -> bool:
        """Can step() skip a non-finite update without the host reading the flag? The fused torch
        optimizers can (their kernels leave weights and state alone where found_inf is set); not
        under the fp16 scaler, which reads its own flag."""
        return self.precision.scaler is None and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def step(self, found_inf: torch.Tensor | None = None, norm: torch.Tensor | None = None) -> bool:
        """Apply the update and clear the gradients, unless some gradient is not finite: then set
        `found_inf` (a zeroed float flag on the device) to 1, on every rank alike, and leave the
        weights and the optimizer state as they are. `norm`: clip_grad_norm's result, if it was
        called this step (the flag then comes from it). Returns False only when the fp16 loss scaler
        skipped the step (an overflow it handles itself, not an error; found_inf stays 0)."""
        scaler = self.precision.scaler
        if found_inf is None:  # a caller that does not keep the flag
            found_inf = torch.zeros((), device=self.device)
        if scaler:
            before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            self.zero_grad()
            return scaler.get_scale() >= before  # the scale drops exactly when a step was skipped
        if norm is not None:
            found_inf.copy_(nonfinite(norm))
        else:
            self.flag_nonfinite(found_inf)
        if self.skips_on_device:
            self.optimizer.found_inf = flag_where(found_inf, self.params_device)  # read by the fused kernels' step
            self.optimizer.step()
        elif not found_inf.item():  # the one host read a step of an optimizer that cannot skip on the device
            self.optimizer.step()
        self.zero_grad()
        return True

    @property
    def params_device(self) -> torch.device:
        """Where the optimizer's kernels run: the parameters' device (the host under FSDP's cpu_offload)."""
        if self._params is None:
            self._params = list(self.model.parameters())
        return local_tensor(self._params[0]).device if self._params else self.device

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Model and optimizer state for torch.distributed.checkpoint (sharded where the model is)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def save_checkpoint(self, path, async_save: bool = False):
        """Each rank writes its part under `path`. Returns None for a sync save. For an async one, what
        dcp.async_save returns: where the copy of the state runs in the background (CUDA), a response
        with `staging_completion` (copied: the state may change again; until then the weights and
        the optimizer state must not change) and `upload_completion` (written); else the upload's
        future. One async save at a time: the next one refills the same host buffers."""
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()
        if not async_save:
            with single_process_quiet():
                dcp.save(state, storage_writer=dcp_writer(path))
            return None
        # A group of its own: the background save's collectives must not interleave
        # with the training loop's on the default group.
        if self._checkpoint_group is None and torch.distributed.is_initialized():
            self._checkpoint_group = torch.distributed.new_group(backend="gloo")
        if self.device.type == "cuda":
            # DCP copies on a side stream that does not wait for this one: the last update must have
            # landed (usually free: the trainer has just read the step flags).
            torch.cuda.current_stream(self.device).synchronize()
        response = dcp.async_save(state, storage_writer=dcp_writer(path), process_group=self._checkpoint_group,
                                  async_stager=self.stager())
        staging = getattr(response, "staging_completion", None)  # None: staged before async_save returned
        if staging is not None and not only_parameters(state["model"], self.model):
            # Buffers may change in the next forward (BatchNorm's statistics, DDP's broadcast), before
            # the optimizer step the trainer waits at: finish the copy now.
            staging.result()
        return response

    def stager(self):
        """One stager for the run: it allocates host copies of the state at the first async save and
        refills them in place at the next ones. Before torch 2.13 a DefaultStager fails when used a
        second time (a KeyError in its cache), so there each save gets a new one; the previous save
        has finished by then (one save in flight at a time)."""
        if self._stager is not None and not STAGER_REUSABLE:
            self._stager.close()
            self._stager = None
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager

            self._stager = DefaultStager(staging_options(self.device))
        return self._stager

    def load_checkpoint(self, path) -> None:
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()  # the target layout: DCP reshards into it
        with single_process_quiet():
            dcp.load(state, storage_reader=dcp_reader(path))
        self.load_state_dict(state)

    def close(self) -> None:
        """Release what the strategy holds before the process group goes (DeepSpeed's engine)."""
        if self._stager is not None:  # its thread and host buffers
            self._stager.close()
            self._stager = None


def staging_options(device: torch.device):
    """With CUDA: page-locked host buffers, filled by non-blocking copies on a side stream in a
    background thread while the next forward and backward run. On the CPU, staging blocks: DCP's
    storage copy holds the GIL, so a background copy would stall the loop as long (measured), and
    there is nothing to page-lock for."""
    from torch.distributed.checkpoint.staging import StagingOptions

    cuda = device.type == "cuda"
    return StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=cuda,
                          use_non_blocking_copy=cuda)


def only_parameters(model_state: dict, model: nn.Module) -> bool:
    """Does the model's state dict hold parameters alone (by storage)? Those change only at the
    optimizer step."""
    held = {local_tensor(p).untyped_storage().data_ptr() for p in model.parameters()}
    return all(torch.is_tensor(v) and local_tensor(v).untyped_storage().data_ptr() in held
               for v in model_state.values())


def flag_where(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The non-finite flag on the device the optimizer steps on. Where that is another device (the host,
    under FSDP's cpu_offload), a blocking copy: torch's fused step would copy it with non_blocking=True
    and read it at once, before a copy from the GPU has landed, and so might apply a NaN update or skip
    a good one."""
    return flag if flag.device == device else flag.to(device)


def nonfinite(norm: torch.Tensor) -> torch.Tensor:
    """1.0 where the norm is NaN or inf, as a float flag for the fused optimizers' found_inf."""
    return torch.isfinite(norm).logical_not_().float()


def check_checkpoint_units(units: list[nn.Module]) -> None:
    if not units:
        raise ConfigError(
            "train.activation_checkpointing=true needs shard units to checkpoint, and this model has none "
            "(no nn.ModuleList, no shard_units(model) in the recipe): add shard_units to the recipe, or "
            "set train.activation_checkpointing=false")


def outermost(units: list[nn.Module]) -> list[nn.Module]:
    """The units not inside another unit: a nested one is checkpointed or compiled with its parent."""
    inner = {id(m) for u in units for m in u.modules() if m is not u}
    return list({id(u): u for u in units if id(u) not in inner}.values())


def checkpoint_forward(module: nn.Module) -> None:
    """Keep only the unit's inputs from its forward; its backward recomputes the rest (non-reentrant
    torch.utils.checkpoint: works under no_sync, DDP, FSDP2 and torch.compile)."""
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # validation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's units when the recipe names none: the children of every nn.ModuleList."""
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns that it 'assumes a single process' when there is no group: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
