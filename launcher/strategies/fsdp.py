"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer
state sharded on dim 0 across the ranks, as DTensors.

Each shard unit (the recipe's `shard_units(model)`, by default the children of
every nn.ModuleList) becomes one FSDP group: its parameters are all-gathered in
one collective before its forward and its gradients reduce-scattered in one
collective after its backward. The root is sharded last and takes what is left
(embeddings, final norm, a tied head). The optimizer is built afterwards, over
the sharded parameters, so its state is sharded too.

The loss normalisation of the trainer holds unchanged: FSDP's reduce-scatter
averages the gradients over the W ranks, as DDP's all-reduce does.

HSDP (fsdp.replicate = R > 1): a 2-D mesh of R replica groups x W/R ranks. Each
group shards the model over its own ranks (rank r holds shard r mod W/R); the
gradients are reduce-scattered inside the group, then all-reduced across the
groups, the average over all W ranks again. With R = the number of nodes
(fsdp.replicate=nodes) every all-gather and reduce-scatter stays inside a node;
only the all-reduce of the sharded gradients, once a step, crosses nodes.

Precision: bf16 / fp16 become FSDP's MixedPrecisionPolicy (low-precision compute
and all-gather, fp32 reduce-scatter, fp32 sharded master weights and optimizer
state). fp16 keeps the trainer's torch.amp.GradScaler: its unscale_ works on
DTensor gradients and reduces the found-inf flag over the ranks, so every rank
skips the same steps.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..env import ensure_process_group
from .base import Strategy, local_tensor


def replica_groups(replicate: int | str, world_size: int, local_world_size: int) -> int:
    """fsdp.replicate as R, the number of replica groups; `nodes` is one group per node. Bad
    input: an R that does not divide the world size (the message lists those that do)."""
    if replicate == "nodes":
        # torchrun and srun number the ranks node by node: a shard group of W / nodes ranks is a node.
        if world_size % local_world_size:
            raise ConfigError(f"fsdp.replicate=nodes needs the same number of processes on every node, and this "
                              f"node runs {local_world_size} of {world_size}: set fsdp.replicate to one of "
                              f"{divisors(world_size)}")
        return world_size // local_world_size
    if replicate < 1 or world_size % replicate:
        raise ConfigError(f"fsdp.replicate={replicate} must divide the world size {world_size} (replica groups of "
                          f"equal size): use one of {divisors(world_size)}, or nodes (one group per node)")
    return replicate


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


class FSDPStrategy(Strategy):
    name = "fsdp"

    @classmethod
    def check(cls, cfg, sizes, world_size: int, local_world_size: int | None) -> None:
        # fsdp.replicate=nodes needs the processes of a node: a worker knows them; the process that
        # starts a node's workers does not, and the workers find an uneven split when they wrap.
        if cfg.fsdp.replicate != "nodes" or local_world_size is not None:
            replica_groups(cfg.fsdp.replicate, world_size, local_world_size or world_size)

    @classmethod
    def shards_parameters(cls, cfg, sizes) -> bool:
        return True

    def setup(self, model: nn.Module, make_optimizer, source=None):
        """Split the skeleton's layers over the TP group (tp.size > 1), shard it over the data-parallel
        ranks, then give each rank's shards memory and their initial values (no process but rank 0
        ever holds the whole model, and that only in host memory; with the recipe's init_weights,
        none does). With cpu_offload the shards live on the host."""
        mesh = self.device_mesh()
        if self.cfg.tp.size > 1:
            from ..tensor_parallel import plan_of, split_layers

            split_layers(model, plan_of(source.recipe, model), mesh["tp"], self.cfg.tp.sequence_parallel)
        self.model = self.wrap(self.prepare(model), mesh)
        source.fill(self.model, params_on=torch.device("cpu") if self.cfg.fsdp.cpu_offload else None)
        self.optimizer, schedule = make_optimizer(self.model)
        return schedule

    def device_mesh(self):
        """The ranks as (replicate, shard, tp), tp innermost so that a TP group is consecutive ranks (one
        node): without tp.size a 1-D mesh (FSDP) or (replicate, shard) (HSDP)."""
        from torch.distributed.device_mesh import init_device_mesh

        ensure_process_group(self.device)
        tp = self.cfg.tp.size
        data = dist.get_world_size() // tp
        replicas = replica_groups(self.cfg.fsdp.replicate, data, max(1, self.env.local_world_size // tp))
        if tp > 1:
            mesh = init_device_mesh(self.device.type, (replicas, data // replicas, tp),
                                    mesh_dim_names=("replicate", "shard", "tp"))
            # The gradient norm sums over every dimension at once: one all-reduce over the flattened mesh
            # rather than one per dimension.
            mesh["replicate", "shard", "tp"]._flatten("all")
            return mesh
        if replicas > 1:  # HSDP: shard inside each row of the mesh, all-reduce down its columns
            return init_device_mesh(self.device.type, (replicas, data // replicas),
                                    mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(self.device.type, (data,))

    def wrap(self, model: nn.Module, mesh) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if self.cfg.tp.size > 1:  # FSDP over the data-parallel dimensions; the TP DTensors become 2-D (3-D)
            mesh = mesh["replicate", "shard"] if mesh["replicate"].size() > 1 else mesh["shard"]
        options = dict(
            mesh=mesh,
            reshard_after_forward=self.cfg.fsdp.reshard_after_forward,
            mp_policy=self.mixed_precision_policy(MixedPrecisionPolicy),
            # Pinned host memory needs a GPU; on the CPU the "offload" is a no-op move anyway.
            offload_policy=(CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.cfg.fsdp.cpu_offload
                            else OffloadPolicy()),
        )
        # Innermost first: fully_shard needs a nested unit sharded before the unit around it.
        units = [u for u in self.shard_units(model) if u is not model]
        for unit in reversed(units):
            fully_shard(unit, **options)
        fully_shard(model, **options)
        self.set_prefetch(units)
        return model

    def set_prefetch(self, units: list[nn.Module]) -> None:
        """fsdp.forward_prefetch / backward_prefetch: when unit i's forward starts it also issues the
        all-gathers of units i+1..i+N, and its backward those of i-1..i-N. Only how early they are
        issued changes (more units unsharded at once), never the math."""
        ahead, behind = self.cfg.fsdp.forward_prefetch, self.cfg.fsdp.backward_prefetch
        for i, unit in enumerate(units):
            if ahead:
                unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + ahead])
            if behind > 1:  # 1 is FSDP2's own default, which follows the order the forward really ran
                unit.set_modules_to_backward_prefetch(units[max(0, i - behind) : i][::-1])

    def mixed_precision_policy(self, policy_cls):
        """bf16 / fp16: compute (and all-gather) in the low precision, reduce-scatter in fp32; the
        sharded master parameters, their gradients and the optimizer state stay fp32. The
        trainer's autocast then finds the parameters already low precision (harmless)."""
        if self.precision.name == "fp32":
            return policy_cls()
        return policy_cls(param_dtype=self.precision.dtype, reduce_dtype=torch.float32)

    # ------------------------------------------------------------ one step

    def no_sync(self):
        """Non-final micro-steps: by default keep the unsharded gradients and reduce-scatter
        once, on the last micro-step; fsdp.reduce_every_microstep=true reduce-scatters
        every micro-step (less memory: only sharded gradients are kept, more communication)."""
        if self.cfg.fsdp.reduce_every_microstep:
            return contextlib.nullcontext()
        return self._no_gradient_sync()

    @contextlib.contextmanager
    def _no_gradient_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def scale_grads(self, factor: torch.Tensor) -> None:
        # The gradients are DTensors: scale each rank's shard in place.
        grads = [local_tensor(g) for g in self.grads()]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device))  # with cpu_offload the grads are on the CPU

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """The norm of the whole (unsharded) gradient, a plain tensor equal on every rank."""
        if self.precision.scaler:
            self.precision.scaler.unscale_(self.optimizer)  # a DTensor-aware found_inf: the same on every rank
        grads = self.grads()
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if hasattr(norm, "full_tensor"):  # a DTensor holding partial sums of squares: reduce it
            norm = norm.full_tensor()
        if max_norm:  # torch.nn.utils.clip_grad_norm_'s rule, applied to each rank's shards
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_([local_tensor(g) for g in grads], coef.to(grads[0].dtype))
        return norm.to(self.device)  # with cpu_offload the gradients, and so the norm, live on the CPU
