"""Tensor parallelism (tp.size): the layers a plan names split over the ranks of a TP group
(docs/design.md, Tensor parallelism).

The plan maps module names (fnmatch globs: `blocks.*.attn.q`) to a style:

- "colwise": a Linear's output features (an Embedding's dimension) split over the ranks; its input
  whole, its output this rank's columns;
- "rowwise": a Linear's input features (an Embedding's rows, the vocabulary) split; its input
  this rank's columns, its output summed over the ranks (an all-reduce);
- "colwise_gather_output" (or transformers' older "colwise_rep"): colwise with the whole output
  gathered, for a head whose logits the loss reads whole;
- "sequence_parallel": with tp.sequence_parallel, a module (a norm) that computes on this rank's
  part of the sequence (torch's SequenceParallel); without it, replicated like any other;
- "sequence_start": with tp.sequence_parallel, the module whose input, whole on every rank, is split
  by sequence from there on (the first block, after embeddings); without it, nothing;
- a torch ParallelStyle, as it is.

With tp.sequence_parallel the activations between the split layers are split by sequence (dim 1):
colwise layers all-gather their input from the sequence parts, rowwise layers reduce-scatter their
output into them (Megatron's sequence parallelism: the norms' activations and work divided by N,
the same communication volume).

It comes from the recipe's `tp_plan(model)`, else from a transformers model's own plan
(`config.base_model_tp_plan` under the base model's prefix, and the model class's `_tp_plan`).
Every parameter the plan leaves out (norms, position embeddings, biases of other modules) is
replicated over the TP group as a DTensor, so that the optimizer, the gradient norm and FSDP see
DTensors only; such a module takes and returns plain tensors as before.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from .errors import ConfigError

STYLE_NAMES = ("colwise", "rowwise", "colwise_gather_output", "sequence_parallel", "sequence_start", "colwise_rep")
SPLITTING = ("colwise", "rowwise", "colwise_gather_output", "colwise_rep")  # a Linear's or an Embedding's weights
HEAD_COUNTS = ("n_head", "num_heads", "num_attention_heads", "num_key_value_heads", "n_kv_heads", "n_kv_head")


def plan_of(recipe, model: nn.Module) -> dict:
    """The model's TP plan: the recipe's tp_plan(model), else a transformers model's own. Bad input
    where it has neither."""
    own = getattr(recipe.module, "tp_plan", None)
    if own is not None:
        plan = recipe._call("tp_plan", own, model)
        if not isinstance(plan, dict) or not plan:
            raise ConfigError(f"recipe `{recipe.name}`: tp_plan(model) must return a non-empty dict of module name "
                              f"(or glob) to style, not {type(plan).__name__}")
        return plan
    plan = transformers_plan(model)
    if plan:
        return plan
    raise ConfigError(
        f"tp.size > 1 needs a tensor-parallel plan and {type(model).__name__} has none: add `tp_plan(model)` to "
        f"recipe `{recipe.name}`, returning e.g. {{'blocks.*.attn.q': 'colwise', 'blocks.*.attn.proj': "
        "'rowwise'} (README: Tensor parallelism), use a transformers model that ships one "
        "(config.base_model_tp_plan), or set tp.size=1")


def transformers_plan(model: nn.Module) -> dict:
    """A transformers model's shipped plan: the base model's (config.base_model_tp_plan), named from the
    model it lives in, and the head's (the class's _tp_plan)."""
    config = getattr(model, "config", None)
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not base:
        return {}
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        base = {f"{prefix}.{name}": style for name, style in base.items()}
    head = {name: style for name, style in (getattr(type(model), "_tp_plan", None) or {}).items()
            if not name.startswith(f"{prefix}.")}
    return {**base, **head}


def resolve(plan: dict, model: nn.Module, tp: int, sequence_parallel: bool = False) -> dict[str, object]:
    """{module name: style} for every module a plan entry names, checked: an entry that names no module,
    a style that is not known, a module that is not a Linear or an Embedding for a named style, a width
    that does not split into tp parts, and head counts that do not, are bad input."""
    named = dict(model.named_modules())
    out: dict[str, object] = {}
    for pattern, style in plan.items():
        hits = [name for name in named if name and fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ConfigError(f"the TP plan's entry `{pattern}` names no module of {type(model).__name__} (modules "
                              f"are named like {', '.join(list(n for n in named if n)[:4])}, ...): fix the name")
        for name in hits:
            if isinstance(style, str):
                check_split(name, named[name], style, tp)
            out[name] = style
    check_heads(model, tp)
    if sequence_parallel and "sequence_parallel" not in out.values():
        raise ConfigError("tp.sequence_parallel=true needs the TP plan to name the modules that compute on a part of "
                          "the sequence ('sequence_parallel': the norms) and where the split starts "
                          "('sequence_start'), and this plan names none: add them to tp_plan(model), or set "
                          "tp.sequence_parallel=false")
    return out


def check_split(name: str, module: nn.Module, style: str, tp: int) -> None:
    if style not in STYLE_NAMES:
        raise ConfigError(f"the TP plan gives `{name}` the style `{style}`: use one of {', '.join(STYLE_NAMES[:5])} "
                          "or a torch.distributed.tensor.parallel ParallelStyle")
    if style not in SPLITTING:
        return
    if isinstance(module, nn.Linear):
        width, what = (module.out_features, "output features") if style != "rowwise" else \
            (module.in_features, "input features")
    elif isinstance(module, nn.Embedding):
        width, what = (module.num_embeddings, "rows") if style == "rowwise" else \
            (module.embedding_dim, "dimensions")
    else:
        raise ConfigError(f"the TP plan gives `{name}` ({type(module).__name__}) the style `{style}`, which splits "
                          "an nn.Linear or an nn.Embedding: name those, or give a ParallelStyle")
    if width % tp:
        raise ConfigError(f"`{name}` has {width} {what}, which do not split over tp.size={tp} ranks: use a tp.size "
                          f"that divides {width}, or leave `{name}` out of the TP plan")


def check_heads(model: nn.Module, tp: int) -> None:
    """Attention heads (and KV heads) split whole over the ranks."""
    holders = [getattr(model, "config", None), *model.modules()]
    for holder in holders:
        for attr in HEAD_COUNTS:
            count = getattr(holder, attr, None)
            if isinstance(count, int) and not isinstance(count, bool) and count % tp:
                raise ConfigError(f"{attr}={count} ({type(holder).__name__}) does not divide by tp.size={tp}: each "
                                  "rank computes whole attention heads; use a tp.size that divides it")


def styles(resolved: dict[str, object], model: nn.Module, sequence_parallel: bool = False) -> dict[str, object]:
    """torch ParallelStyles for the resolved plan; with sequence_parallel the activations between split
    layers are split on dim 1 (Shard(1)) instead of whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    between = Shard(1) if sequence_parallel else Replicate()  # the layout of activations between split layers
    out = {}
    named = dict(model.named_modules())
    for name, style in resolved.items():
        if not isinstance(style, str):
            out[name] = style
        elif style in ("sequence_parallel", "sequence_start"):
            if sequence_parallel:
                out[name] = (SequenceParallel() if style == "sequence_parallel" else
                             PrepareModuleInput(input_layouts=Replicate(), desired_input_layouts=Shard(1),
                                                use_local_output=True))
        elif style == "colwise":
            out[name] = ColwiseParallel(input_layouts=between)
        elif style in ("colwise_gather_output", "colwise_rep"):
            out[name] = ColwiseParallel(input_layouts=between, output_layouts=Replicate())
        elif isinstance(named[name], nn.Embedding):  # rowwise: the token ids arrive whole
            out[name] = RowwiseParallel(input_layouts=Replicate())
        else:
            out[name] = RowwiseParallel(output_layouts=between)
    return out


def split_layers(model: nn.Module, plan: dict, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Apply the plan over tp_mesh, in place (the model may be on the meta device), then replicate every
    parameter the plan left out; tied parameters stay tied."""
    import warnings

    from torch.distributed.tensor.parallel import parallelize_module

    # A split layer returns DTensor.to_local(), a view; FSDP warns of in-place ops on a view its root
    # returns. The loop makes none (losses read the output), so the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    ties = tied_names(model)
    resolved = resolve(plan, model, tp_mesh.size(), sequence_parallel)
    parallelize_module(model, tp_mesh, styles(resolved, model, sequence_parallel))
    for module in model.modules():
        if any(p is not None and not is_dtensor(p) for p in module._parameters.values()):
            replicate(module, tp_mesh)
    retie(model, ties)
    return model


def tied_names(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that are one Parameter, in groups."""
    groups: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                key = f"{module_name}.{name}" if module_name else name
                groups.setdefault(id(p), [])
                if key not in groups[id(p)]:
                    groups[id(p)].append(key)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, ties: list[list[str]]) -> None:
    """parallelize_module makes a new Parameter per module: make tied ones one again. The plan must split
    them alike (an embedding rowwise and its tied head colwise both split the vocabulary)."""
    for names in ties:
        first = model.get_parameter(names[0])
        for other in names[1:]:
            module_name, _, attr = other.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            p = owner._parameters[attr]
            if p is first:
                continue
            if getattr(p, "placements", None) != getattr(first, "placements", None):
                raise ConfigError(f"`{names[0]}` and `{other}` are one tied parameter and the TP plan splits them "
                                  f"differently ({first.placements} and {p.placements}): split both alike (an "
                                  "embedding rowwise with its head colwise), or untie them")
            owner._parameters[attr] = first


def replicate(module: nn.Module, tp_mesh) -> None:
    """The module's own parameters as DTensors replicated over the TP group; it still takes and returns
    plain tensors. The gradient of a replicated parameter is the same on every rank of the group: its
    inputs are, and the split layers after it reduce the gradient that flows back into them."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    for name, p in list(module._parameters.items()):
        if p is not None and not is_dtensor(p):  # a skeleton's: no values to send (src_data_rank=None)
            module._parameters[name] = nn.Parameter(distribute_tensor(p.data, tp_mesh, [Replicate()],
                                                                      src_data_rank=None),
                                                    requires_grad=p.requires_grad)

    def to_dtensor(_module, args, kwargs):
        wrap = lambda x: (DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)  # noqa: E731
                          if torch.is_tensor(x) and not is_dtensor(x) else x)
        return tuple(wrap(a) for a in args), {k: wrap(v) for k, v in kwargs.items()}

    def to_local(_module, _args, output):
        return torch.utils._pytree.tree_map(lambda x: x.to_local() if is_dtensor(x) else x, output)

    module.register_forward_pre_hook(to_dtensor, with_kwargs=True)
    module.register_forward_hook(to_local)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_shapes(model: nn.Module, resolved: dict[str, object], tp: int) -> dict[int, tuple[int, ...]]:
    """{id(parameter): its shape on one rank of the TP group} for the parameters a named style splits
    (a ParallelStyle object is not known here: its parameters count whole)."""
    out = {}
    for name, style in resolved.items():
        module = model.get_submodule(name)
        if style not in SPLITTING:  # a ParallelStyle object, or a sequence-parallel entry: nothing split
            continue
        weight, bias = module.weight, getattr(module, "bias", None)
        rowwise = style == "rowwise"
        if isinstance(module, nn.Embedding):
            rows, dim = weight.shape
            out[id(weight)] = (rows // tp, dim) if rowwise else (rows, dim // tp)
            continue
        outs, ins = weight.shape
        out[id(weight)] = (outs, ins // tp) if rowwise else (outs // tp, ins)
        if bias is not None and not rowwise:  # a row-split layer adds its bias once, after the reduction
            out[id(bias)] = (outs // tp,)
    return out
