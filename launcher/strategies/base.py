"""The interface the trainer holds. It never asks which strategy it has.

A strategy owns the wrapped model, the optimizer and the gradient scaler. The
trainer calls, per optimizer step:

    for each micro-batch:  with no_sync() (all but the last):  backward(loss)
    scale_grads(f)   # only for (total, count) losses
    norm = clip_grad_norm(max_norm)
    step()  -> False when the fp16 scaler skipped the step for overflow
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ConfigError
from ..precision import Precision

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy:
    name = "base"
    uses_torch_scaler = True  # fp16 through torch.amp.GradScaler (DeepSpeed brings its own)

    def __init__(self, cfg, env, device: torch.device, precision: Precision, plan=None,
                 shard_units: Callable[[nn.Module], list[nn.Module]] | None = None):
        self.cfg, self.env, self.device, self.precision = cfg, env, device, precision
        self.plan, self.shard_units = plan, shard_units or default_shard_units
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._checkpoint_group = None
        self._stager = None  # async saves' staging, kept between saves
        self._params: list[torch.Tensor] | None = None
        self._one: torch.Tensor | None = None

    # ------------------------------------------------------------ set-up

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Checkpoint and compile the units, wrap the model, then build the optimizer over the wrapped
        parameters."""
        self.model = self.wrap(self.prepare(model.to(self.device)))
        self.optimizer = make_optimizer(self.model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """train.activation_checkpointing, then train.compile, on each outermost shard unit, in place
        and before wrap: FSDP2's fully_shard then goes around both (its hooks stay out of the compiled
        code). Only the unit's own forward changes: parameter names and state dicts stay as they are."""
        t = self.cfg.train
        if not (t.activation_checkpointing or t.compile):
            return model
        units = outermost([u for u in self.shard_units(model) if u is not model])
        if t.activation_checkpointing:
            check_checkpoint_units(units)
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
        """Unscale (fp16), clip if max_norm is set, and return the total norm."""
        if self.precision.scaler:
            self.precision.scaler.unscale_(self.optimizer)
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return torch.nn.utils.get_total_norm(self.grads(), foreach=True)  # for the log and the finite check

    @property
    def skips_on_device(self) -> bool:
        """Can step(found_inf) skip the update without the host reading the flag? The fused
        torch optimizers can: their kernels leave weights and state alone where it is set."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def step(self, found_inf: torch.Tensor | None = None) -> bool:
        """Apply the update; with found_inf (only where skips_on_device), skip it on the device
        when the flag is set. Returns False when the fp16 scaler skipped the step."""
        scaler = self.precision.scaler
        applied = True
        if scaler:
            before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            applied = scaler.get_scale() >= before  # the scale drops exactly when a step was skipped
        else:
            if found_inf is not None:
                self.optimizer.found_inf = found_inf  # read by the fused kernels' step (a float flag)
            self.optimizer.step()
        self.zero_grad()
        return applied

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
                dcp.save(state, checkpoint_id=str(path))
            return None
        # A group of its own: the background save's collectives must not interleave
        # with the training loop's on the default group.
        if self._checkpoint_group is None and torch.distributed.is_initialized():
            self._checkpoint_group = torch.distributed.new_group(backend="gloo")
        if self.device.type == "cuda":
            # DCP copies on a side stream that does not wait for this one: the last update must have
            # landed (usually free: the trainer has just read the step flags).
            torch.cuda.current_stream(self.device).synchronize()
        response = dcp.async_save(state, checkpoint_id=str(path), process_group=self._checkpoint_group,
                                  async_stager=self.stager())
        staging = getattr(response, "staging_completion", None)  # None: staged before async_save returned
        if staging is not None and not only_parameters(state["model"], self.model):
            # Buffers may change in the next forward (BatchNorm's statistics, DDP's broadcast), before
            # the optimizer step the trainer waits at: finish the copy now.
            staging.result()
        return response

    def stager(self):
        """One stager for the run: it allocates host copies of the state at the first async save and
        refills them in place at the next ones."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager

            self._stager = DefaultStager(staging_options(self.device))
        return self._stager

    def load_checkpoint(self, path) -> None:
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()  # the target layout: DCP reshards into it
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        self.load_state_dict(state)

    def close(self) -> None:
        """Release what the strategy holds before the process group goes (DeepSpeed's engine)."""
        if self._stager is not None:  # its thread and host buffers
            self._stager.close()
            self._stager = None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights on CPU (a collective; meaningful on rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def local_numel(self) -> dict[str, int]:
        """Elements this rank holds: parameters and optimizer state (for memory tests and plan)."""
        params = sum(local_tensor(p).numel() for p in self.model.parameters())
        optim = sum(local_tensor(v).numel() for s in self.optimizer.state.values()
                    for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        return {"params": params, "optim": optim}


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
