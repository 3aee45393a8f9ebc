"""The config schema, YAML loading, dotted overrides and the messages for bad input.

Each section is a pydantic model that forbids unknown keys, so a typo is an error
that names the key, where it came from and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import ConfigError
from .fs import write_atomic


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ProfileConfig(Section):
    start_step: int = Field(ge=1, description="the first optimizer step recorded (1: the run's first)")
    steps: int = Field(ge=1, description="how many steps are recorded")


class EarlyStopConfig(Section):
    monitor: str = Field("val_loss", description="a value of the validation row: val_loss, or a metric the recipe's "
                         "eval_step or metrics returns")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better; max: higher is better")
    patience: int = Field(3, gt=0, description="validations in a row without improvement before the run stops")
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")


class TrainConfig(Section):
    global_batch_size: int = Field(64, gt=0, description="samples per optimizer step, whatever the world size "
                                   "(accumulation = global / (micro x processes))")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="the most samples one device holds in a "
                                            "forward; null: global / processes")
    epochs: int = Field(1, gt=0, description="passes over the training set (ignored when max_steps is set)")
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps to train; when set it decides the "
                                     "length")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the global gradient norm to this; null: no "
                                       "clipping")
    seed: int = Field(0, description="seeds the weights, the data order and every RNG")
    log_every_steps: int = Field(10, gt=0, description="a metrics row every N steps: the only steps that wait for "
                                 "the device")
    eval_every_steps: Optional[int] = Field(None, gt=0, description="validate every N steps; null: only at the end "
                                            "(always at the end)")
    eval_batch_size: Optional[int] = Field(None, gt=0, description="validation batch per device; null: the micro "
                                           "batch")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/inf gradient stops the run (exit 1, "
                                                  "last good checkpoint kept) or its step is skipped")
    compile: bool = Field(False, description="torch.compile each shard unit (the whole model if it has none); not "
                          "with deepspeed")
    activation_checkpointing: bool = Field(False, description="recompute each shard unit's activations in backward: "
                                           "less memory, more compute")
    sync_batchnorm: bool = Field(False, description="BatchNorm layers become SyncBatchNorm: statistics over every "
                                 "process's micro-batch (CUDA only)")
    profile: Optional[ProfileConfig] = Field(None, description="{start_step: N, steps: K}: a torch.profiler trace "
                                             "of steps N..N+K-1 in RUN_DIR/profile (Chrome trace JSON, one per "
                                             "rank, for Perfetto or TensorBoard); null: off")
    early_stop: Optional[EarlyStopConfig] = Field(None, description="{monitor, mode, patience, min_delta}: stop "
                                                  "after `patience` validations without improvement (saved, exit "
                                                  "0); null: train to the end")


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = Field("adamw", description="the optimizer (a recipe's optimizer() "
                                                  "replaces this section)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled for adamw, L2 for sgd and adam")
    momentum: float = Field(0.9, ge=0, description="sgd only")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam / adamw")
    eps: float = Field(1e-8, gt=0, description="adam / adamw")
    impl: Literal["auto", "foreach", "fused", "for_loop"] = Field(
        "auto", description="auto: fused where torch's kernel can step the parameters (a non-finite step is then "
        "skipped on the device; SGD under FSDP gets foreach: torch has no DTensor rule for it), else foreach")


class ScheduleConfig(Section):
    warmup_steps: int = Field(0, ge=0, description="linear warmup from lr / warmup_steps to lr")
    decay: Literal["constant", "linear", "cosine"] = Field("constant", description="the shape after warmup, down "
                                                           "to min_lr_ratio x lr at the last step")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of linear / cosine decay, as a fraction of lr")


class DataConfig(Section):
    num_workers: int = Field(0, ge=0, description="loader processes (kept alive across epochs); the batches are "
                             "the same for any number")
    pin_memory: Literal["auto"] | bool = Field("auto", description="page-locked batches for asynchronous copies "
                                               "to the GPU; auto: with CUDA")
    prefetch_factor: Optional[int] = Field(None, gt=0, description="batches each worker loads ahead; null: "
                                           "torch's 2")
    shuffle: bool = Field(True, description="a new permutation each epoch, from (seed, epoch); streams keep their "
                          "own order")
    tail: Literal["drop", "wrap"] = Field("drop", description="the last len(train) % global_batch_size samples: "
                                          "drop leaves them out, wrap fills the last step from the start")


class BestConfig(Section):
    monitor: str = Field("val_loss", description="a value of the validation row: val_loss, or a metric the recipe's "
                         "eval_step or metrics returns")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better; max: higher is better")


class CheckpointConfig(Section):
    dir: Optional[str] = Field(None, description="where checkpoints go: a directory or an fsspec URL "
                               "(s3://bucket/prefix; pip install 'launcher[s3]'); null: RUN_DIR/checkpoints")
    every_steps: Optional[int] = Field(None, gt=0, description="save every N steps; null: only at the end (and "
                                       "on a stop signal)")
    keep_last: int = Field(3, gt=0, description="the newest checkpoints kept in checkpoint.dir")
    resume: str = Field("auto", description="auto: the latest in run_dir, if any; never; or a checkpoint directory")
    resume_changed: Literal["refuse", "allow"] = Field("refuse", description="resuming under a config that "
                                                       "changes the training math: an error, or a warning")
    best: Optional[BestConfig] = Field(None, description="{monitor, mode}: also keep the checkpoint of the best "
                                       "validation so far (keep_last never prunes it); null: off")
    async_save: bool = Field(False, alias="async", description="write checkpoints in the background while training "
                             "goes on (not with deepspeed)")


class WandbConfig(Section):
    project: Optional[str] = Field(None, description="the W&B project; null: W&B off")
    mode: Literal["online", "offline", "disabled"] = Field("offline", description="offline writes RUN_DIR/wandb "
                                                           "(wandb sync uploads it); disabled: no W&B, no files")
    name: Optional[str] = Field(None, description="the run's display name")
    entity: Optional[str] = Field(None, description="the W&B team or user")
    fatal: bool = Field(False, description="a W&B that cannot start ends the run (exit 1) instead of a warning")


class LogConfig(Section):
    wandb: WandbConfig = WandbConfig()
    tensorboard: bool = Field(False, description="event files in RUN_DIR/tb")
    progress: Literal["auto", "bar", "lines"] = Field("auto", description="auto: a progress bar on a terminal, "
                                                      "lines otherwise")


class FSDPConfig(Section):
    replicate: int | Literal["nodes"] = Field(1, description="HSDP: replica groups; each shards over world / "
                                              "replicate ranks. nodes: one group per node")
    reshard_after_forward: bool = Field(True, description="free the gathered parameters after forward (ZeRO-3-"
                                        "like); false keeps them until backward (ZeRO-2-like)")
    cpu_offload: bool = Field(False, description="sharded parameters, gradients and optimizer state in host memory")
    reduce_every_microstep: bool = Field(False, description="reduce-scatter every micro-step (less memory); "
                                         "false: once a step, keeping whole gradients between")
    forward_prefetch: int = Field(0, ge=0, description="all-gather the next N shard units early in forward; 0: "
                                  "FSDP2's own order")
    backward_prefetch: int = Field(1, ge=1, description="all-gather the previous N units early in backward; 1: "
                                   "FSDP2's default")


class DDPConfig(Section):
    bucket_cap_mb: float = Field(25, gt=0, description="gradients all-reduced per bucket (torch's default)")
    static_graph: bool = Field(False, description="the same parameters used every step: DDP skips per-step "
                               "bookkeeping (not with accumulation)")
    gradient_as_bucket_view: bool = Field(True, description="gradients live in the all-reduce buckets: one copy "
                                          "less")


class DeepSpeedConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO: 1 shards optimizer state, 2 also gradients, 3 also "
                            "parameters")
    offload_optimizer: bool = Field(False, description="optimizer state and step on the host")
    offload_params: bool = Field(False, description="parameters on the host (stage 3 only)")
    config: Optional[str] = Field(None, description="a DeepSpeed JSON merged over the generated config")


class TPConfig(Section):
    size: int = Field(1, ge=1, description="tensor parallelism: the layers of the model's TP plan split over this "
                      "many ranks (inside a node); the data-parallel ranks are world / size")
    sequence_parallel: bool = Field(False, description="the activations between split layers split by sequence "
                                    "too (the plan's norms compute on a part each)")


class Float8Config(Section):
    recipe: Literal["tensorwise", "rowwise"] = Field("tensorwise", description="float8 scales: one per tensor "
                                                     "(fastest), or one per row (more accurate)")
    skip: list[str] = Field([], description="linear layers (module names, globs) that stay bf16; those whose "
                            "widths are not multiples of 16 always do")


class DistConfig(Section):
    timeout_s: float = Field(600, gt=0, description="a rank with no progress for this long ends the job, naming "
                             "where it was")


class Config(Section):
    recipe: dict[str, Any] = Field(description="name: a dotted module or a .py path; the other keys fill the "
                                   "recipe's Config")
    run_dir: str = Field("runs/default", description="everything the run writes: config, metrics, checkpoints")
    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto: single for one process, else ddp (fsdp with tp.size > 1)")
    precision: Literal["fp32", "bf16", "fp16", "float8"] = Field(
        "fp32", description="bf16: autocast; fp16: autocast and a gradient scaler; float8: bf16 autocast and the "
        "linear layers' matmuls in float8 (torchao)")
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    ddp: DDPConfig = DDPConfig()
    fsdp: FSDPConfig = FSDPConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    tp: TPConfig = TPConfig()
    float8: Float8Config = Float8Config()
    dist: DistConfig = DistConfig()

    @property
    def recipe_name(self) -> str:
        return self.recipe["name"]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `key=value` overrides, validate. Raises ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (run `launcher ls` to see the configs that ship)")
    try:
        with open(path, encoding="utf-8") as stream:  # a named stream: YAML errors name the file
            raw = yaml.load(stream, Loader=UniqueKeyLoader) or {}
    except DuplicateKey as e:
        raise ConfigError(f"{path}: the key `{e.key}` appears twice in one mapping, at line {e.first} and at line "
                          f"{e.second}; YAML would keep only the second and drop the first silently. Merge the two "
                          "into one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or e}): give the path "
                          "of a readable YAML text file (UTF-8), such as configs/digits.yaml") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (recipe:, train:, ...), not {type(raw).__name__}")
    sources: dict[tuple, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        sources[tuple(key.split("."))] = f"override `{item}`"
    cfg = validate(raw, str(path), sources)
    cfg.recipe["name"] = resolve_recipe_file(cfg.recipe["name"], path.parent)
    return cfg


class DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)):  # hashable scalars: the keys a config has
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep)


def resolve_recipe_file(name: str, config_dir: Path) -> str:
    """A recipe given as a relative file path is looked for beside the config, then in the
    working directory; the resolved config holds the absolute path. Dotted names stay as they are."""
    if not (name.endswith(".py") or "/" in name or "\\" in name):
        return name
    given = Path(name)
    if given.is_absolute():
        return name
    candidates = list(dict.fromkeys([(config_dir / given).resolve(), (Path.cwd() / given).resolve()]))
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"recipe file {name} not found: looked beside the config ({candidates[0]})"
                          + (f" and in the working directory ({candidates[1]})" if len(candidates) > 1 else ""))
    return str(found)


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override `{item}` is not of the form key=value (for example optim.lr=3e-4)")
    return key, parse_scalar(text)


FLOAT_WITHOUT_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


def parse_scalar(text: str) -> Any:
    """A YAML scalar, except that 3e-4 is a float (YAML 1.1 would read it as a string)."""
    if FLOAT_WITHOUT_DOT.fullmatch(text):
        return float(text)
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def validate(raw: dict, origin: str, sources: dict[tuple, str] | None = None) -> Config:
    sources = sources or {}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, Config, origin, sources)) from None
    if "name" not in cfg.recipe or not isinstance(cfg.recipe["name"], str):
        raise ConfigError(f"{origin}: `recipe.name` is missing: name the recipe module, e.g. recipe: {{name: recipes.digits}}")
    return cfg


def describe_errors(err: ValidationError, root: type, origin: str, sources: dict[tuple, str], prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = prefix + ".".join(loc)
        where = sources.get(tuple((prefix + ".".join(loc)).split(".")), origin)
        if e["type"] == "extra_forbidden":
            valid = valid_keys(root, loc[:-1])
            hint = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            suggestion = f"; did you mean `{(prefix + '.'.join(loc[:-1] + (hint[0],)))}`?" if hint else ""
            lines.append(f"unknown key `{key}` in {where}{suggestion} (valid keys here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"`{key}` is required but missing in {where}")
        else:
            expected = expected_type(root, loc) or e["msg"]
            lines.append(f"`{key}` in {where} has the value {e.get('input')!r}, but it must be {expected} ({e['msg']})")
    return "bad config: " + "\n  ".join(lines)


def valid_keys(root: type, loc: tuple) -> list[str]:
    model = root
    for part in loc:
        field = model_fields(model).get(part)
        model = getattr(field, "annotation", None) if field is not None else None
        if model is None:
            return []
    return sorted(model_fields(model))


def model_fields(model) -> dict:
    inner = [a for a in typing.get_args(model) if a is not type(None)]
    if len(inner) == 1:  # an optional section (Optional[Section]): its fields
        model = inner[0]
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {f.alias or name: f for name, f in model.model_fields.items()}
    if dataclasses.is_dataclass(model):
        return {f.name: f for f in dataclasses.fields(model)}
    return {}


def expected_type(root: type, loc: tuple) -> str | None:
    fields = model_fields(root)
    for i, part in enumerate(loc):
        field = fields.get(part)
        if field is None:
            return None
        ann = getattr(field, "annotation", None) or getattr(field, "type", None)
        if i == len(loc) - 1:
            return f"of type {type_name(ann)}"
        fields = model_fields(ann)
    return None


def type_name(ann) -> str:
    text = getattr(ann, "__name__", None) if getattr(ann, "__args__", None) is None else None
    return text or str(ann).replace("typing.", "")


def validate_recipe_fields(config_cls, values: dict, origin: str):
    """Build the recipe's own Config dataclass from the `recipe:` section (less `name`)."""
    if config_cls is None:
        if values:
            raise ConfigError(f"{origin}: the recipe has no Config dataclass, so `recipe.{next(iter(values))}` cannot be set")
        return None
    known = [f.name for f in dataclasses.fields(config_cls)]
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            raise ConfigError(
                f"unknown key `recipe.{key}` in {origin}"
                + (f"; did you mean `recipe.{hint[0]}`?" if hint else "")
                + f" (the recipe's Config fields: {', '.join(known)})"
            )
    try:
        return TypeAdapter(config_cls).validate_python(values)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, config_cls, origin, {}, prefix="recipe.")) from None


def dump_config(cfg: Config, path: Path) -> None:
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- resuming with another config

# What changes the training math: resuming a checkpoint under a config that differs here would
# mix two runs. Everything else (length, logging, checkpoints, strategy, world size, workers)
# may change on resume, with a note.
MATH_KEYS = ("recipe.", "precision", "float8.recipe", "float8.skip", "train.global_batch_size", "train.seed", "train.grad_clip",
             "train.on_nonfinite", "optim.", "schedule.", "data.shuffle", "data.tail")
ROUNDING_ONLY = ("optim.impl",)  # the same update, computed by another kernel
NOT_COMPARED = ("run_dir", "checkpoint.resume", "checkpoint.resume_changed")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changes to the training math, other changes) between a checkpoint's config and cfg."""
    old, new = flatten(saved), flatten(cfg.to_dict())
    math, other = [], []
    for key in sorted(set(old) | set(new)):
        if key in NOT_COMPARED or old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        (math if key.startswith(MATH_KEYS) and not key.startswith(ROUNDING_ONLY) else other).append(line)
    return math, other
