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
from torch import nn

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

    # ------------------------------------------------------------ set-up

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Wrap the model, then build the optimizer over the wrapped parameters."""
        self.model = self.wrap(model.to(self.device))
        self.optimizer = make_optimizer(self.model)

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
        return [p.grad for p in self.model.parameters() if p.grad is not None]

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
                self.optimizer.found_inf = found_inf.float()  # read by the fused kernels' step
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
        """Each rank writes its part under `path`. Returns a future for an async save, else None."""
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
        return dcp.async_save(state, checkpoint_id=str(path), process_group=self._checkpoint_group)

    def load_checkpoint(self, path) -> None:
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()  # the target layout: DCP reshards into it
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        self.load_state_dict(state)

    def close(self) -> None:
        """Release what the strategy holds before the process group goes (DeepSpeed's engine)."""

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
