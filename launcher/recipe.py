"""Load a recipe module, check its contract, and adapt Lightning-shaped models.

A recipe is a plain module with `model(cfg)`, `data(cfg)` and `loss(model, batch)`,
an optional `Config` dataclass, and optional `eval_step` (validation loss and metrics from
one forward) or `metrics`, `optimizer`, `collate`,
`shard_units`, `flops_per_sample`, `tokens_per_sample`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import IterableDataset

from .config import ConfigError, validate_recipe_fields
from .lightning import LightningAdapter, check_module, is_lightning_shaped

REQUIRED = ("model", "data", "loss")


def import_recipe(name: str):
    """Import by dotted name (recipes.digits) or by file path (path/to/recipe.py)."""
    # `launcher` as a console script does not put the working directory on sys.path
    # the way `python -m` does; recipes next to the user's config should import alike.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if name.endswith(".py") or os.sep in name:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"recipe file {name} does not exist")
            # As a script would: the modules beside the recipe import by their plain names.
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module  # so that pickling (dataloader workers) finds it
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(name)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"recipe `{name}` was not found: give a dotted module name importable from the "
                "working directory (recipes.digits) or a path to a .py file (run `launcher ls`)"
            ) from None
        raise ConfigError(f"recipe `{name}` failed to import: {user_traceback(e)}") from None
    except Exception as e:
        # The recipe's own bug: show where in its code, it is the user's code.
        raise ConfigError(f"recipe `{name}` failed to import: {user_traceback(e)}") from None


@dataclasses.dataclass
class Recipe:
    name: str
    module: Any
    cfg: Any  # the recipe's Config instance, or None
    _data: tuple | None = dataclasses.field(default=None, repr=False)
    _meta_model: nn.Module | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def load(cls, section: dict, origin: str = "the config") -> "Recipe":
        name = section["name"]
        module = import_recipe(name)
        config_cls = getattr(module, "Config", None)
        if config_cls is not None and not dataclasses.is_dataclass(config_cls):
            raise ConfigError(f"recipe `{name}`: `Config` must be a @dataclass")
        fields = {k: v for k, v in section.items() if k != "name"}
        recipe = cls(name, module, validate_recipe_fields(config_cls, fields, origin))
        recipe.check()
        return recipe

    def check(self) -> None:
        missing = [f for f in REQUIRED if not callable(getattr(self.module, f, None))]
        if missing == ["loss"] and self.is_lightning():
            missing = []  # training_step is the loss
        if missing:
            raise ConfigError(
                f"recipe `{self.name}` lacks the function(s) {', '.join(missing)}: a recipe defines "
                "model(cfg) -> nn.Module, data(cfg) -> (train, val) and loss(model, batch) -> Tensor "
                "or (total, count)"
            )

    def check_optimization(self) -> None:
        """configure_optimizers() called on the meta-device model, to refuse what launcher does not
        run (several optimizers, a monitored scheduler) before any worker starts."""
        model = self.check_model()
        if isinstance(model, LightningAdapter):
            from .lightning import optimization

            try:
                optimization(model.module)
            except ConfigError:
                raise
            except Exception:  # it may need real tensors: the workers check it again
                pass

    def is_lightning(self) -> bool:
        """Does model() return a LightningModule-shaped module (training_step, configure_optimizers)?"""
        return isinstance(self.check_model(), LightningAdapter)

    def check_model(self) -> nn.Module:
        """model() built on the meta device (no memory, no init cost), to check what it returns; built
        once per Recipe, as the checks before any worker each look at it."""
        if self._meta_model is None:
            with torch.device("meta"):
                self._meta_model = self.build_model()
        return self._meta_model

    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise RecipeError(f"recipe `{self.name}`: {what}() raised {user_traceback(e)}") from None

    # ------------------------------------------------------------ the contract

    def build_model(self) -> nn.Module:
        model = self._call("model", self.module.model, self.cfg)
        if not isinstance(model, nn.Module):
            raise RecipeError(f"recipe `{self.name}`: model() must return an nn.Module, not {type(model).__name__}")
        if not is_lightning_shaped(model):
            return model
        check_module(model)
        for hook, args in (("setup", ("fit",)), ("configure_model", ())):  # deferred building, as Lightning does
            if callable(getattr(model, hook, None)):
                self._call(f"model().{hook}", getattr(model, hook), *args)
        return LightningAdapter(model)

    def check_trainable(self, model: nn.Module, built_on_meta: bool = False) -> None:
        """A model the launcher can train: trainable parameters, and (unless built on the meta device
        for a check) real tensors. Bad input either way, found before any worker where it can be."""
        params = list(model.parameters())
        if not params:
            raise RecipeError(f"recipe `{self.name}`: model() returned a model with no parameters, so there is "
                              "nothing to train: return the module whose weights the loss trains")
        if not any(p.requires_grad for p in params):
            raise RecipeError(f"recipe `{self.name}`: every parameter of model()'s model has requires_grad=False, so "
                              "there is nothing to train: leave the ones to train with requires_grad=True")
        if not built_on_meta and any(p.is_meta for p in params):
            raise RecipeError(f"recipe `{self.name}`: model() returned a model on the meta device (no real weights): "
                              "build it on the CPU, or materialize it in model() (model.to_empty(device='cpu'), then "
                              "initialise the weights); the launcher moves it to the device")

    def check_loss_output(self, out, step: int) -> bool:
        """loss_is_pair(out), and a loss that can train: one computed from the model's output with grad
        enabled (not under torch.no_grad(), not detached)."""
        pair = self.loss_is_pair(out, step)
        value = out[0] if pair else out
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            raise RecipeError(
                f"recipe `{self.name}`: loss() returned a value that does not require grad, so no gradient can flow to "
                "the weights: it was computed under torch.no_grad() or torch.inference_mode(), or from detached "
                "values (.detach(), .item(), numpy). Compute it from the model's output, with grad enabled")
        return pair

    def build_data(self):
        """(train, val), built once per Recipe: the launcher's checks and the trainer share it."""
        if self._data is None:
            out = self._call("data", self.module.data, self.cfg)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise RecipeError(f"recipe `{self.name}`: data() must return a pair (train, val); val may be None, "
                                  f"not {describe_value(out)}")
            if not (hasattr(out[0], "__len__") or isinstance(out[0], IterableDataset)):
                raise RecipeError(f"recipe `{self.name}`: data()'s train set must be a map-style Dataset with "
                                  "__len__ and __getitem__, or a torch.utils.data.IterableDataset (a stream), not "
                                  f"{type(out[0]).__name__}")
            self._data = out
        return self._data

    def loss(self, model: nn.Module, batch):
        return self.module.loss(model, batch)

    def loss_is_pair(self, out, step: int) -> bool:
        """Which loss form `out` is: False for a scalar mean, True for a (total, count) pair.
        Anything else is refused, saying what it got (checked on the first micro-batch of a step)."""
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            return False
        if isinstance(out, (tuple, list)) and len(out) == 2 and is_scalar(out[0]) and is_scalar(out[1]):
            return True
        hint = ""
        if isinstance(out, (tuple, list)) and len(out) == 2 and is_scalar(out[1]) and not is_scalar(out[0]):
            hint = (" It looks like a model's (logits, loss) output: return the loss alone "
                    "(e.g. `return model(x, y)[1]`).")
        raise RecipeError(
            f"recipe `{self.name}`: loss() returned {describe_value(out)} at step {step + 1}, but a loss must "
            "return a scalar tensor (the mean over the micro-batch) or a pair (total, count): a scalar sum "
            f"and the number of items it sums (e.g. tokens).{hint}")

    def validation_values(self, model: nn.Module, batch) -> dict:
        """One validation batch's values, each a mean over the batch or a (total, count) pair.
        eval_step(model, batch) gives the loss (logged as val_loss) and the metrics from one
        forward pass; without it, loss() and metrics() each run the model."""
        fn = getattr(self.module, "eval_step", None)
        if fn is not None:
            values = dict(fn(model, batch))
            if "loss" in values:
                values["val_loss"] = values.pop("loss")
            return values
        fn = getattr(self.module, "metrics", None)
        return {"val_loss": self.loss(model, batch), **(fn(model, batch) if fn is not None else {})}

    def optimizer(self, model: nn.Module):
        """(optimizer, Schedule or None) from the recipe's optimizer() and scheduler() hooks or a
        LightningModule's configure_optimizers(); (None, None): the config's optim: and schedule:.

        optimizer(model, cfg) gets the model (as the user wrote it, unwrapped); the older
        optimizer(params, cfg), whose first parameter is not named `model`, gets its parameters.
        """
        inner = unwrap_lightning(model)
        if is_lightning_shaped(inner):
            from .lightning import optimization

            return optimization(inner)
        fn = getattr(self.module, "optimizer", None)
        if fn is None:
            return None, None
        first = next(iter(inspect.signature(fn).parameters), "")
        return fn(inner if first == "model" else inner.parameters(), self.cfg), None

    def schedule(self, optimizer, total_steps: int):
        """The recipe's scheduler(optimizer, cfg, total_steps), stepped every optimizer step; or None."""
        fn = getattr(self.module, "scheduler", None)
        if fn is None:
            return None
        from .optim import Schedule

        return Schedule(fn(optimizer, self.cfg, total_steps), source="the recipe's scheduler()")

    def replaces(self) -> dict[str, str]:
        """The config sections a hook replaces: {section: what is in effect instead}."""
        out = {}
        if self.is_lightning():
            out = {"optim": "configure_optimizers()", "schedule": "configure_optimizers()"}
        else:
            if getattr(self.module, "optimizer", None) is not None:
                out["optim"] = "the recipe's optimizer()"
            if getattr(self.module, "scheduler", None) is not None:
                out["schedule"] = "the recipe's scheduler()"
        return out

    @property
    def collate(self):
        return getattr(self.module, "collate", None)

    @property
    def shard_units(self) -> Callable[[nn.Module], list[nn.Module]] | None:
        """The recipe's shard_units(model), or None for the strategy's default."""
        fn = getattr(self.module, "shard_units", None)
        return (lambda model: list(fn(unwrap_lightning(model)))) if fn else None

    def run_for(self, model: nn.Module, state):
        """What the loop calls to run this model: a LightningModule's hooks and logs, or the recipe's functions."""
        if isinstance(model, LightningAdapter):
            from .lightning import LightningRun

            return LightningRun(model.module, state)
        return PlainRun(self)

    def per_sample(self, what: str) -> float | None:
        fn = getattr(self.module, what, None)
        return float(fn(self.cfg)) if fn else None


class PlainRun:
    """A plain recipe as the loop holds it: the calls lightning.LightningRun answers for a
    LightningModule, here without hooks or logged values."""

    hooks_between_steps = False

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def hook(self, name: str, *args) -> None:
        """A plain recipe has no hooks."""

    def loss(self, model: nn.Module, batch, batch_idx: int):
        return self.recipe.loss(model, batch)

    def validation_values(self, model: nn.Module, batch, batch_idx: int, n: int, counts: bool) -> dict:
        return self.recipe.validation_values(model, batch)

    def step_values(self) -> dict:
        return {}

    def prog_bar_names(self) -> set[str]:
        return set()

    def end_epoch(self) -> dict:
        return {}

    def end_validation(self) -> dict:
        return {}

    def schedule_config(self, configured):
        return configured


class RecipeError(ConfigError):
    """The recipe broke its contract or raised while building model or data."""


def user_traceback(error: BaseException) -> str:
    """The error and the frames of the user's code that led to it: no launcher or importlib frames."""
    here = str(Path(__file__).resolve().parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(("<frozen", here)) and "importlib" not in f.filename]
    lines = "".join(traceback.format_list(frames[-6:]))
    return f"{type(error).__name__}: {error}\n{lines}".rstrip()


def is_scalar(value) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def describe_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(describe_value(v) for v in value)})"
    return f"a {type(value).__name__}"


def batch_statistics_layers(model: nn.Module) -> list[str]:
    """The layers that normalise with the statistics of the batch they see (BatchNorm, SyncBatchNorm,
    InstanceNorm with running statistics): their math depends on the micro-batch, not the global batch."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    return [type(m).__name__ for m in model.modules()
            if isinstance(m, _BatchNorm) or (isinstance(m, _InstanceNorm) and m.track_running_stats)]


def batch_statistics_note(model: nn.Module, sizes, sync: bool) -> str | None:
    """Why a model with batch statistics does not train the math of one process, where it does not."""
    layers = batch_statistics_layers(model)
    split = sizes.world_size > 1 and not sync
    if not layers or not (split or sizes.accumulation > 1):
        return None
    kinds = ", ".join(sorted(set(layers)))
    over = (f"one micro-batch of {sizes.micro_batch} on one process" if split else
            f"one micro-batch of {sizes.micro_batch} x {sizes.world_size} processes (synced)")
    return (f"note: the model has {len(layers)} batch-statistics layer(s) ({kinds}); each normalises over {over}, not "
            f"the global batch of {sizes.global_batch}, so its steps differ from one process with the whole batch"
            + ("; train.sync_batchnorm=true (CUDA) syncs them over the processes" if split else ""))


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP or DeepSpeed wrapper (FSDP2 shards in place, no wrapper)."""
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
        model = model.module
    return model


def unwrap_lightning(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    return model.module if isinstance(model, LightningAdapter) else model
