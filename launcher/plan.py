"""`launcher plan`: the batch math and, for every strategy, what each rank holds, without training.

`estimate(cfg, recipe, world_size)` returns the numbers as data; `describe` only formats
them. The model is built on the meta device (shapes, no memory). What each strategy
holds follows docs/design.md, Strategies, and the sources of FSDP2 and DeepSpeed:

- single, ddp: everything whole on every rank; DDP's reducer keeps gradient buckets the
  size of the gradients, which `param.grad` views (ddp.gradient_as_bucket_view) or copies.
- fsdp (FSDP2): each parameter split on dim 0, ceil(rows/S) rows a rank and the last
  ranks fewer (S ranks in a shard group); the fp32 shards are the master weights, and
  gradients and optimizer state are sharded alike. With accumulation under `no_sync`
  (not `fsdp.reduce_every_microstep`) the unsharded fp32 gradients live across the
  micro-steps.
- ZeRO-1/2 (DeepSpeed's stage_1_and_2.py): each optimizer param group's trainable
  parameters are flattened into one buffer in the model dtype, padded at its end to a
  multiple of 2*W (`nccl_start_alignment_factor` 2 times the world size; with
  `parameter_alignment` also between parameters), and split into W equal partitions.
  Every rank keeps the whole buffer (the module's parameters are views into it) and,
  for its partition, an fp32 master copy (a clone, even when training in fp32) and the
  optimizer state. ZeRO-1 keeps full gradients in `param.grad`, ZeRO-2 only its
  partition's; both build an fp32 gradient partition for the step.
- ZeRO-3 (partition_parameters.py, stage3.py): each parameter padded to a multiple of
  W and split in W equal parts, frozen ones too; parameters of at most
  `stage3_param_persistence_threshold` (1e5) elements are also kept whole on every
  rank once used. A flat gradient partition in the model dtype lives from the start;
  the fp32 master partition is a separate copy only with bf16/fp16 or optimizer offload.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

# torch is imported inside functions: cli.py imports this module on every start.

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


@dataclass(frozen=True)
class Held:
    """Some tensors a rank holds: their elements, and their bytes on the device and on the host."""

    elements: int = 0
    device: int = 0
    host: int = 0  # CPU offload

    def __add__(self, other: "Held") -> "Held":
        return Held(self.elements + other.elements, self.device + other.device, self.host + other.host)

    @property
    def bytes(self) -> int:
        return self.device + self.host


def held(elements: int, itemsize: int, host: bool = False) -> Held:
    size = elements * itemsize
    return Held(elements, 0 if host else size, size if host else 0)


@dataclass(frozen=True)
class PerRank:
    """What one rank holds between steps, and at the step for gradients.

    `params.elements` and `optim.elements` are what `Strategy.local_numel()` counts; bytes
    include the alignment padding of flat buffers, which is no parameter's element.
    `optim` is None when the optimizer's state is unknown.
    """

    params: Held  # the module's parameters (this rank's partition where they are sharded)
    grads: Held
    optim: Held | None  # the optimizer's state tensors
    master: Held = Held()  # fp32 master weights kept apart from the parameters
    persistent: Held = Held()  # ZeRO-3: small parameters kept whole besides their partition

    @property
    def parameters(self) -> Held:
        return self.params + self.persistent

    @property
    def optimizer(self) -> Held | None:
        return None if self.optim is None else self.master + self.optim

    @property
    def total(self) -> Held:
        return self.parameters + self.grads + (self.optimizer or self.master)


@dataclass
class Row:
    """One strategy: what each rank holds (a list indexed by rank) and a line saying what that is."""

    label: str
    ranks: list[PerRank]
    legend: str

    @property
    def largest(self) -> tuple[int, PerRank]:
        rank = max(range(len(self.ranks)), key=lambda r: (self.ranks[r].total.bytes, -r))
        return rank, self.ranks[rank]


@dataclass
class Param:
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Model:
    """What the plan needs of the model and its optimizer, from a meta-device build."""

    params: list[Param]  # each tensor once (tied weights counted once), in model.parameters() order
    groups: list[tuple[list[int], int | None]]  # optimizer param groups: (param indices, states per element)
    optimizer: str  # which optimizer, for the header
    names: int = 0  # parameter names, tied ones each
    whole: list[Param] | None = None  # with tp.size > 1 `params` are one TP rank's parts; these are whole

    def optimized(self) -> list[tuple[list[Param], int | None]]:
        """The groups' parameters the optimizer keeps state for: trainable, not empty."""
        return [([self.params[i] for i in idx if self.params[i].trainable and self.params[i].numel], k)
                for idx, k in self.groups]

    def optimized_params(self) -> list[tuple[Param, int | None]]:
        return [(p, k) for ps, k in self.optimized() for p in ps]

    @property
    def state_known(self) -> bool:
        return all(k is not None for _, k in self.groups)


@dataclass
class Setup:
    """Everything a row needs: the config, the world, the model and DeepSpeed's settings."""

    cfg: object
    world: int
    accumulation: int
    model: Model
    ds: dict = field(default_factory=dict)

    @property
    def zero(self) -> dict:
        return self.ds.get("zero_optimization", {})


# ---------------------------------------------------------------- the strategies

def replicated(s: Setup, ddp: bool) -> Row:
    """single, ddp, DeepSpeed's stage 0: every rank holds the whole of everything."""
    m = s.model
    params = sum((held(p.numel, p.itemsize) for p in m.params), Held())
    grads = sum((held(p.numel, p.itemsize) for p in m.params if p.trainable), Held())
    optim = None
    if m.state_known:
        optim = sum((held(k * p.numel, p.itemsize) for p, k in m.optimized_params() if k), Held())
    legend = "everything whole on every rank"
    if ddp:
        # The reducer's buckets persist; param.grad is a view into them, or (torch's default) a second copy.
        view = getattr(getattr(s.cfg, "ddp", None), "gradient_as_bucket_view", False)
        grads = grads if view else grads + grads
        legend += ("; the gradients are views into DDP's buckets" if view
                   else "; DDP's buckets hold a second copy of the gradients")
    return Row("", [PerRank(params, grads, optim)] * s.world, legend)


def fsdp(s: Setup, shard: int) -> Row:
    """FSDP2 over shard groups of `shard` ranks (shard = world: plain FSDP; HSDP: fewer)."""
    m, host = s.model, s.cfg.fsdp.cpu_offload
    params = dim0_shards(((p, 1, p.itemsize) for p in m.params), shard, host)
    grads = dim0_shards(((p, 1, p.itemsize) for p in m.params if p.trainable), shard, host)
    optim = dim0_shards(((p, k, p.itemsize) for p, k in m.optimized_params() if k), shard, host)
    unsharded = Held()
    if s.accumulation > 1 and not s.cfg.fsdp.reduce_every_microstep:
        low = s.cfg.precision != "fp32"  # the gradients accumulate in reduce_dtype, fp32
        unsharded = sum((held(p.numel, 4 if low else p.itemsize) for p in m.params if p.trainable), Held())
    ranks = [PerRank(params[r % shard], grads[r % shard] + unsharded, optim[r % shard] if m.state_known else None)
             for r in range(s.world)]
    legend = (f"dim 0 of each parameter split over {shard} rank{'s' if shard > 1 else ''} (ceil(rows/{shard}) rows "
              "a rank, the last ranks fewer); the fp32 shards are the master weights")
    if s.cfg.precision != "fp32":
        legend += f"; {s.cfg.precision} copies only of the unit being computed"
    if unsharded.elements:
        legend += "; whole fp32 gradients across the micro-steps (no_sync)"
    return Row("", ranks, legend + host_note(host, "everything (cpu_offload)"))


def hsdp(s: Setup) -> Row:
    """FSDP2 inside each of R replica groups of W/R ranks: rank r holds shard r mod W/R."""
    r = replicas(s.cfg, s.world)
    row = fsdp(s, shard=s.world // r)
    row.legend += f"; {r} replica groups hold the same shards (gradients all-reduced across them)"
    return row


def replicas(cfg, world: int) -> int:
    """fsdp.replicate as R; `nodes` counts as one node here (cmd_plan resolves it from --nnodes first)."""
    from .strategies.fsdp import replica_groups

    return replica_groups(cfg.fsdp.replicate, world, world)


def dim0_shards(items, shard: int, host: bool) -> list[Held]:
    """Per shard rank: (param, copies, itemsize) split on dim 0 as FSDP2 does it (torch.chunk).

    Rank r holds rows [r*c, min((r+1)*c, rows)) with c = ceil(rows/shard). Built with
    difference arrays: linear in parameters plus ranks."""
    elems, size = [0] * (shard + 1), [0] * (shard + 1)
    for p, copies, itemsize in items:
        rows = p.shape[0] if p.shape else 1
        if rows == 0:
            continue
        rest = p.numel // rows if p.shape else 1
        c = -(-rows // shard)
        full, tail = divmod(rows, c)
        for arr, unit in ((elems, copies), (size, copies * itemsize)):
            arr[0] += c * rest * unit
            arr[full] -= c * rest * unit
            if tail:
                arr[full] += tail * rest * unit
                arr[full + 1] -= tail * rest * unit
    out, e, b = [], 0, 0
    for r in range(shard):
        e, b = e + elems[r], b + size[r]
        out.append(Held(e, 0 if host else b, b if host else 0))
    return out


def zero12(s: Setup, stage: int) -> Row:
    m, W = s.model, s.world
    dt = model_itemsize(s)
    offload = offloaded(s.zero, "offload_optimizer")
    align = 16 // math.gcd(16, dt or 4) if s.zero.get("parameter_alignment") else 1
    flat, part, grad_part, optim = Held(), 0, Held(), Held()
    in_flat = set()
    for params, k in m.optimized():
        if not params:
            continue
        numel = 0
        for i, p in enumerate(params):
            numel += p.numel
            numel += 0 if i == len(params) - 1 else -numel % align  # parameter_alignment: between parameters
            in_flat.add(id(p))
        padded = -(-numel // (2 * W)) * 2 * W  # the group's end, to nccl_start_alignment_factor (2) * W
        size = dt or params[0].itemsize
        flat, part = flat + held(padded, size), part + padded // W
        grad_part = grad_part + held(padded // W, size)
        optim = optim + held((k or 0) * (padded // W), 4, offload)
    loose = sum((held(p.numel, dt or p.itemsize) for p in m.params if id(p) not in in_flat), Held())
    params = Held(sum(p.numel for p in m.params), flat.device + loose.device)  # the module's views
    if stage == 1:  # param.grad, whole, accumulated over the micro-steps
        grads = sum((held(p.numel, dt or p.itemsize) for p in m.params if p.trainable), Held())
    else:  # its partition's (with offload they go straight into the host's fp32 partition)
        grads = Held() if offload else grad_part
    grads = grads + held(part, 4, offload)  # the fp32 gradient partition the step reads
    one = PerRank(params, grads, optim if m.state_known else None, held(part, 4, offload))
    legend = (f"{precision_name(s)} parameters whole (one flat buffer padded to a multiple of 2W = {2 * W}); "
              + ("whole gradients" if stage == 1 else "gradients of its 1/W")
              + "; fp32 master weights and optimizer state of its 1/W")
    return Row("", [one] * W, legend + host_note(offload, "master weights and optimizer state") + unmodelled(s))


def zero3(s: Setup) -> Row:
    m, W = s.model, s.world
    dt = model_itemsize(s)
    offload_opt = offloaded(s.zero, "offload_optimizer")
    offload_par = offloaded(s.zero, "offload_param")
    threshold = int(s.zero.get("stage3_param_persistence_threshold",
                               s.zero.get("param_persistence_threshold", PERSISTENCE_THRESHOLD)))
    budget = int(s.zero.get("stage3_model_persistence_threshold",
                            s.zero.get("model_persistence_threshold", sys.maxsize)))
    persistent, kept = Held(), set()
    for p in m.params:  # DeepSpeed's mark_persistent_parameters, in named_parameters() order
        if p.numel + persistent.elements > budget:
            continue
        if p.numel <= threshold:
            persistent, kept = persistent + held(p.numel, dt or p.itemsize), kept | {id(p)}

    def part(p: Param) -> int:  # padded to a multiple of W, then split in W
        return -(-p.numel // W)

    # Persistent parameters' partitions stay on the device even with offload_param.
    params = sum((held(part(p), dt or p.itemsize, offload_par and id(p) not in kept) for p in m.params), Held())
    optimized = m.optimized_params()
    trained = sum(part(p) for p, _ in optimized)
    grads = sum((held(part(p), dt or p.itemsize, offload_opt) for p, _ in optimized), Held())  # flat, from the start
    # fp32 without offload: the partitions are the master weights and their gradients; else fp32 copies.
    separate = offload_opt or grads.bytes != 4 * trained
    if grads.bytes != 4 * trained:
        grads = grads + held(trained, 4, offload_opt)
    master = held(trained, 4, offload_opt) if separate else Held()
    optim = sum((held(k * part(p), 4, offload_opt) for p, k in optimized if k), Held())
    one = PerRank(params, grads, optim if m.state_known else None, master, persistent)
    legend = (f"each parameter padded to a multiple of W = {W} and split; {precision_name(s)} partitions, "
              + ("fp32 master weights apart" if separate else "which are the fp32 master weights"))
    if persistent.elements:
        legend += f"; parameters of at most {threshold:,} elements also kept whole once used"
    legend += host_note(offload_par, "parameter partitions")
    return Row("", [one] * W, legend + host_note(offload_opt, "master weights and optimizer state") + unmodelled(s))


def setup_peak(s: Setup, key: str, init_weights: bool, resuming: bool = False) -> tuple[list[Held], str]:
    """What each rank holds at the peak of building the model (docs/design.md, Building the model), and
    a line saying what that is. Sharded (fsdp, HSDP, ZeRO-3): its own shards plus one whole parameter
    at a time, and on global rank 0 the one whole model in host memory it fills the others from (none
    with init_weights under FSDP, none resuming); ZeRO-3 then copies its partitions into one flat
    buffer beside a flat gradient partition (three partitions at once). Replicated: the whole model."""
    m, row = s.model, ROWS[key][1](s)
    whole = sum((held(p.numel, p.itemsize, host=True) for p in m.whole or m.params), Held())
    one = max((held(p.numel, p.itemsize) for p in m.whole or m.params), key=lambda h: h.bytes, default=Held())
    if key not in ("fsdp", "hsdp", "zero3"):
        return [whole] * s.world, "every rank builds the whole model from the seed"
    copy = not resuming and not (init_weights and key != "zero3")
    out = []
    for r, rank in enumerate(row.ranks):
        filling = rank.parameters + one + (whole if copy and r == 0 else Held())
        if key == "zero3":  # partitions, their flat copy and the flat gradient partition
            filling = filling if filling.bytes > 3 * rank.params.bytes else rank.params + rank.params + rank.params
        out.append(filling)
    source = ("each rank's shards initialised in place by the recipe's init_weights" if init_weights and key != "zero3"
              else "the checkpoint fills each rank's shards" if resuming
              else "rank 0 builds the whole model in host memory and fills every rank's shards from it")
    return out, f"{source}, one whole parameter at a time" + ("; then ZeRO-3 copies its partitions into one "
                                                               "flat buffer beside its gradient partition"
                                                               if key == "zero3" else "")


def model_itemsize(s: Setup) -> int | None:
    """DeepSpeed casts the whole module to bf16/fp16; None: the parameters keep their dtype."""
    if s.ds.get("bf16", {}).get("enabled") or s.ds.get("fp16", {}).get("enabled"):
        return 2
    return None


def precision_name(s: Setup) -> str:
    if s.ds.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if s.ds.get("fp16", {}).get("enabled") else "fp32"


def offloaded(zero: dict, key: str) -> bool:
    return (zero.get(key) or {}).get("device", "none") not in ("none", None)


def host_note(on: bool, what: str) -> str:
    return f"; on the host: {what}" if on else ""


def unmodelled(s: Setup) -> str:
    # A grad_accum_dtype other than the model's makes DeepSpeed pick other optimizer wrappers.
    return "; (data_types.grad_accum_dtype is set: not modelled)" if s.ds.get("data_types", {}).get(
        "grad_accum_dtype") else ""


# Every row: key -> (label, how).
ROWS = {
    "single": ("single", lambda s: replicated(s, ddp=False)),
    "ddp": ("ddp", lambda s: replicated(s, ddp=True)),
    "fsdp": ("fsdp", lambda s: fsdp(s, shard=s.world)),
    "hsdp": ("HSDP", hsdp),
    "zero0": ("ZeRO-0", lambda s: replicated(s, ddp=False)),
    "zero1": ("ZeRO-1", lambda s: zero12(s, 1)),
    "zero2": ("ZeRO-2", lambda s: zero12(s, 2)),
    "zero3": ("ZeRO-3", zero3),
}
OPTIONAL = {"single": lambda world, mine: world == 1 or mine == "single", "zero0": lambda world, mine: mine == "zero0",
            "hsdp": lambda world, mine: mine == "hsdp"}  # with fsdp.replicate=1 it is the fsdp row


def chosen(cfg, world_size: int) -> str:
    """The row of the config's strategy (DeepSpeed's stage as the user's JSON leaves it)."""
    from .strategies import resolve_name

    name = resolve_name(cfg.strategy, world_size, cfg.tp.size)
    if name == "deepspeed":
        return f"zero{int(deepspeed_settings(cfg, world_size).get('zero_optimization', {}).get('stage', 0))}"
    if name == "fsdp" and replicas(cfg, world_size // cfg.tp.size) > 1:
        return "hsdp"
    return name


def estimate(cfg, recipe, world_size: int) -> dict[str, Row]:
    """What each rank holds under the config's strategy and every other: {row key: Row}.

    Keys (ROWS): ddp, fsdp, zero1, zero2, zero3; single at world size 1, zero0 when the
    config chose DeepSpeed's stage 0, hsdp when it chose fsdp with fsdp.replicate > 1."""
    return rows_for(setup(cfg, recipe, world_size))


def setup(cfg, recipe, world_size: int) -> Setup:
    """With tp.size > 1 the Setup's world is the data-parallel ranks and its model one TP rank's parts:
    FSDP shards those over the data-parallel ranks, and every rank of a TP group holds the same."""
    from .batch import batch_sizes

    data = world_size // cfg.tp.size
    sizes = batch_sizes(cfg, data)
    return Setup(cfg, data, sizes.accumulation, summarize(cfg, recipe), deepspeed_settings(cfg, data))


def rows_for(s: Setup) -> dict[str, Row]:
    mine = chosen(s.cfg, s.world * s.cfg.tp.size)
    out = {}
    for key, (label, how) in ROWS.items():
        if key in OPTIONAL and not OPTIONAL[key](s.world, mine):
            continue
        if s.cfg.tp.size > 1 and key not in ("fsdp", mine):  # TP runs under fsdp (HSDP) only
            continue
        out[key] = how(s)
        out[key].label = label
    return out


def deepspeed_settings(cfg, world_size: int) -> dict:
    """DeepSpeed's config as the launcher would hand it over (the user's JSON merged)."""
    from .batch import BatchSizes
    from .config import ConfigError
    from .strategies.deepspeed import ds_config

    G = cfg.train.global_batch_size
    try:
        return ds_config(cfg, BatchSizes(G, max(1, G // world_size), world_size, 0), cuda=False)
    except ConfigError:  # a setting that only matters when DeepSpeed is the chosen strategy
        return {"zero_optimization": {"stage": cfg.deepspeed.zero_stage},
                "bf16": {"enabled": cfg.precision == "bf16"}, "fp16": {"enabled": cfg.precision == "fp16"}}


def summarize(cfg, recipe) -> Model:
    """The model's parameters (built on the meta device) and its optimizer's groups and state."""
    import torch

    with torch.device("meta"):
        model = recipe.build_model()
    tensors = list(model.parameters())  # each tensor once: tied weights are counted once
    params = [Param(tuple(p.shape), p.element_size(), p.requires_grad) for p in tensors]
    if cfg.tp.size > 1:  # one TP rank's parts of the parameters the plan splits
        from .recipe import unwrap_lightning
        from .tensor_parallel import local_shapes, plan_of, resolve

        inner = unwrap_lightning(model)
        shapes = local_shapes(inner, resolve(plan_of(recipe, inner), inner, cfg.tp.size), cfg.tp.size)
        whole, params = params, [Param(shapes.get(id(p), tuple(p.shape)), p.element_size(), p.requires_grad)
                                 for p in tensors]
    else:
        whole = None
    index = {id(p): i for i, p in enumerate(tensors)}
    total_names = len(list(model.named_parameters(remove_duplicate=False)))
    if "optim" not in recipe.replaces():
        k = (1 if cfg.optim.momentum else 0) if cfg.optim.name == "sgd" else 2
        groups = [([i for i, p in enumerate(params) if p.trainable], k)]
        what = f"the config (optim.name={cfg.optim.name}, lr={cfg.optim.lr})"
        return Model(params, groups, f"{what}: {describe_states(k)}", total_names, whole)
    source = recipe.replaces()["optim"]
    try:
        optimizer, _ = recipe.optimizer(model)
    except Exception as e:  # noqa: BLE001 - it may need real tensors; the plan says it could not tell
        optimizer, why = None, f"{type(e).__name__} on the meta device"
    else:
        why = "it returned no torch optimizer"
    if not isinstance(optimizer, torch.optim.Optimizer):
        groups = [([i for i, p in enumerate(params) if p.trainable], None)]
        return Model(params, groups, f"{source}: its state is unknown ({why}), not counted", total_names, whole)
    groups = [([index[id(p)] for p in g["params"] if id(p) in index], states_per_element(optimizer, g))
              for g in optimizer.param_groups]
    ks = {k for _, k in groups}
    name = type(optimizer).__name__
    if None in ks:
        return Model(params, groups, f"{source}: {name}, whose state is unknown, not counted", total_names, whole)
    per = describe_states(ks.pop()) if len(ks) == 1 else "per group " + ", ".join(str(k) for _, k in groups)
    return Model(params, groups, f"{source}: {name}, {len(groups)} group(s), {per}", total_names, whole)


def states_per_element(optimizer, group: dict) -> int | None:
    """State tensors torch's optimizer keeps per parameter element; None for one it does not know."""
    import torch

    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return 1 if group.get("momentum") else 0
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return 3 if group.get("amsgrad") else 2
    if kind is torch.optim.RMSprop:
        return 1 + bool(group.get("momentum")) + bool(group.get("centered"))
    if kind is torch.optim.Adagrad:
        return 1
    return None


def describe_states(k: int) -> str:
    return f"{k} state tensor{'s' if k != 1 else ''} per trainable element"


# ---------------------------------------------------------------- printing

def human(n: int) -> str:
    value, unit = float(n), 0
    while value >= 1024 and unit < len(UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.3g} {UNITS[unit]}" if value < 100 else f"{value:.0f} {UNITS[unit]}"


def cell(h: Held | None) -> tuple[str, str]:
    """(bytes, elements) of one table cell; host memory says so."""
    if h is None:
        return "?", "?"
    if h.host and h.device:
        size = f"{human(h.device)} + {human(h.host)} host"
    elif h.host:
        size = f"{human(h.host)} host"
    else:
        size = human(h.device)
    return size, f"{h.elements:,}"


def describe(cfg, recipe, world_size: int, nodes: int = 1) -> str:
    from .batch import batch_sizes, describe_batch
    from .recipe import batch_statistics_note
    from .strategies import resolve_name

    tp = cfg.tp.size
    sizes = batch_sizes(cfg, world_size // tp)
    s = setup(cfg, recipe, world_size)
    rows, mine, model = rows_for(s), chosen(cfg, world_size), s.model
    n_all = sum(p.numel for p in model.whole or model.params)
    n_train = sum(p.numel for p in model.whole or model.params if p.trainable)
    tied = model.names - len(model.params)
    name = resolve_name(cfg.strategy, world_size, tp)
    schedule = f"the config (schedule.decay={cfg.schedule.decay}, warmup_steps={cfg.schedule.warmup_steps})"
    lines = [
        f"strategy: {name}{f' ({ROWS[mine][0]})' if mine != name else ''}   world size: {world_size}"
        f"{f' ({nodes} nodes x {world_size // nodes} processes)' if nodes > 1 else ''}   precision: {cfg.precision}",
        *([f"mesh: {mesh_text(cfg, world_size)}"] if tp > 1 else []),
        f"batch: {describe_batch(cfg, sizes)}",
        f"optimizer: {model.optimizer}",
        f"schedule: {recipe.replaces().get('schedule', schedule)}",
        f"parameters: {n_all:,} ({n_train:,} trainable, {n_all - n_train:,} frozen"
        + (f"; {tied} tied name{'s' if tied > 1 else ''} counted once" if tied else "") + ")",
    ]
    note = batch_statistics_note(recipe.check_model(), sizes, cfg.train.sync_batchnorm)
    lines += ([note] if note else []) + ["", "memory per rank (the rank holding the most), bytes and elements:"]
    table = [["", "strategy", "parameters", "", "gradients", "", "optimizer", "", "total"]]
    for key, row in rows.items():
        _, r = row.largest
        table.append(["*" if key == mine else "", row.label, *cell(r.parameters), *cell(r.grads),
                      *cell(r.optimizer), human(r.total.bytes) + (" + ?" if r.optim is None else "")])
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        lines.append("  " + "  ".join(v.rjust(w) if i in (3, 5, 7) else v.ljust(w)
                                      for i, (v, w) in enumerate(zip(t, widths))).rstrip())
    if tp > 1:
        lines.append(f"  (one TP rank's parts: the plan's layers split over tp.size={tp}, the rest whole on each)")
    lines += ["", "* the config's strategy. gradients: the most a step holds; optimizer: its state, and fp32 "
                  "master weights where kept apart from the parameters.",
              f"Under {cfg.precision}:"]
    for key, row in rows.items():
        lines.append(f"  {row.label}: {row.legend}")
        totals = sorted({r.total.bytes for r in row.ranks})
        if len(totals) > 1:
            lines.append(f"  {' ' * len(row.label)}  (ranks hold {human(totals[0])} to {human(totals[-1])}, "
                         f"rank {row.largest[0]} the most)")
    lines.append("Not estimated: activations, FSDP's unsharded units and DeepSpeed's communication buckets "
                 "(transient), buffers.")
    if name == "fsdp" and world_size > 1 and (tp > 1 or has_tp_plan(recipe)):
        lines += ["", "tensor parallelism (tp.size; strategy fsdp, the rank holding the most):"]
        lines += ["  " + line for line in tp_table(cfg, recipe, world_size, world_size // nodes)]
    peaks, how = setup_peak(s, mine, init_weights=callable(getattr(recipe.module, "init_weights", None)))
    lines += ["", f"set-up peak per rank (building the model): {how}:"]
    if len({p for p in peaks}) == 1:
        lines.append(f"  every rank {cell(peaks[0])[0]}")
    else:
        lines.append(f"  rank 0 {cell(peaks[0])[0]}; ranks 1-{len(peaks) - 1} at most "
                     f"{cell(max(peaks[1:], key=lambda h: h.bytes))[0]}")
    return "\n".join(lines)


def mesh_text(cfg, world_size: int) -> str:
    tp = cfg.tp.size
    data = world_size // tp
    r = replicas(cfg, data)
    return f"replicate {r} x shard {data // r} x tp {tp} (FSDP2 over {data} data-parallel ranks, TP inside each group of {tp})"


def has_tp_plan(recipe) -> bool:
    from .recipe import unwrap_lightning
    from .tensor_parallel import plan_of

    try:
        plan_of(recipe, unwrap_lightning(recipe.check_model()))
    except Exception:  # noqa: BLE001 - no plan: no table
        return False
    return True


def tp_table(cfg, recipe, world_size: int, per_node: int) -> list[str]:
    """For each tp.size that divides the processes of a node: the mesh, the accumulation and what a
    rank holds under fsdp, or why that size cannot run."""
    from .config import ConfigError
    from .batch import batch_sizes

    table = [["tp.size", "mesh (replicate x shard x tp)", "accumulation", "parameters", "total"]]
    for tp in [t for t in range(1, per_node + 1) if per_node % t == 0]:
        c = cfg.model_copy(deep=True)
        c.tp.size, c.strategy = tp, "fsdp"
        try:
            s = setup(c, recipe, world_size)
            data = world_size // tp
            r = replicas(c, data)
            row = (ROWS["hsdp"] if r > 1 else ROWS["fsdp"])[1](s)
            _, most = row.largest
            table.append([f"{'*' if tp == cfg.tp.size else ' '} {tp}", f"{r} x {data // r} x {tp}",
                          str(batch_sizes(c, data).accumulation), cell(most.parameters)[0], human(most.total.bytes)])
        except ConfigError as e:
            table.append([f"  {tp}", f"cannot run: {str(e).split(':')[0]}", "", "", ""])
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]


def node_range_table(cfg, recipe, nproc: int, low: int, high: int) -> list[str]:
    """--nnodes MIN:MAX: at each node count an elastic job may run on, the batch math and what a rank
    of the config's strategy holds (the rank holding the most), or why that size cannot run."""
    from .batch import batch_sizes
    from .config import ConfigError
    from .strategies import resolve_name, strategy_class

    table = [["nodes", "world", "micro", "accumulation", "strategy", "parameters", "gradients", "optimizer",
              "total"]]
    for n in range(low, high + 1):
        c, world = at_nodes(cfg, n), n * nproc
        data = world // c.tp.size
        try:  # the checks check_node_range makes at this size
            sizes = batch_sizes(c, data)
            strategy_class(resolve_name(c.strategy, world, c.tp.size)).check(c, sizes, data, nproc // c.tp.size)
            key = chosen(c, world)
            _, most = ROWS[key][1](setup(c, recipe, world)).largest
        except ConfigError as e:
            table.append([str(n), str(world), f"cannot run: {str(e).split(':')[0]}"])
            continue
        table.append([str(n), str(world), str(sizes.micro_batch), str(sizes.accumulation), ROWS[key][0],
                      cell(most.parameters)[0], cell(most.grads)[0], cell(most.optimizer)[0],
                      human(most.total.bytes) + (" + ?" if most.optim is None else "")])
    whole = [t for t in table if len(t) == len(table[0])]
    widths = [max(len(t[i]) for t in whole) for i in range(len(table[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]


def at_nodes(cfg, nodes: int):
    """The config on `nodes` nodes: fsdp.replicate=nodes is one replica group per node."""
    if cfg.fsdp.replicate != "nodes":
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.fsdp.replicate = nodes
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes per node to plan for")
    p.add_argument("--nnodes", default="1", metavar="N|MIN:MAX",
                   help="nodes to plan for (world size = nproc x nnodes); MIN:MAX: an elastic job's range, with "
                   "the batch math and memory per rank at each node count")


def cmd_plan(args) -> int:
    import yaml

    from .batch import batch_sizes
    from .config import ConfigError, load_config
    from .preflight import check_inputs, check_node_range, parse_nodes

    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: it must be at least 1")
    low, high = parse_nodes(args.nnodes, "--nnodes", ":")  # as `launcher run --nnodes` takes it
    loaded = load_config(args.config, args.overrides)

    def splits(nodes: int) -> bool:
        try:
            batch_sizes(loaded, nodes * args.nproc // loaded.tp.size)
        except ConfigError:
            return False
        return True

    # The whole plan at one size: the fewest nodes whose batch splits, where a sharded rank holds the most.
    nodes = next((n for n in range(low, high + 1) if splits(n)), low)
    world_size = args.nproc * nodes
    cfg = at_nodes(loaded, nodes)
    checked = check_inputs(cfg, world_size, args.config, report_only=True)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(describe(cfg, checked.recipe, world_size, nodes=nodes))
    if low < high:
        print(f"\nelastic, {low} to {high} nodes x {args.nproc} process(es) (the plan above: {nodes} node(s)); the "
              "config's strategy at each size, memory per rank (the rank holding the most):")
        print("\n".join("  " + line for line in node_range_table(loaded, checked.recipe, args.nproc, low, high)))
        check_node_range(loaded, args.nproc, low, high)  # a size that cannot run: exit 2, as `launcher run` would
    return 0
