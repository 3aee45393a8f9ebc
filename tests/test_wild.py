"""Code nobody here wrote trains unchanged: modules that ship in installed packages.

- Hugging Face `transformers`: `GPT2LMHeadModel` (tied lm_head / wte), built from
  a tiny config (no download), with the model's own `.loss` (toy_recipes/wild_hf.py;
  `recipe.arch=llama` builds a `LlamaForCausalLM` the same way, measured below but not
  in this module, to keep the suite's time);
- Lightning's demos: `BoringModel` (its `configure_optimizers` returns
  `([SGD], [StepLR])`) and `LightningTransformer` (an `nn.Transformer` with
  `nn.MultiheadAttention`), as LightningModules: `training_step` is the loss,
  `configure_optimizers` the optimizer (toy_recipes/wild_boring.py,
  toy_recipes/wild_lightning_transformer.py).

Each trains with `launcher run` under single (1 process) and under ddp, fsdp and
DeepSpeed ZeRO-3 on 2 CPU processes (gloo): global batch 8, accumulation 2 at both
world sizes (micro 4 on 1 process, 2 on 2), 10 steps (3 for LightningTransformer,
see RECIPES), gradient clipping at 1, a metrics row every step.
Every step's loss (and the final validation's values, where the module has any)
equals the one-process run's; `launcher export` writes weights that load with
`load_state_dict(strict=True)` into a fresh instance of the package's class
(the LightningModule itself, not launcher's wrapper) and equal the one-process
weights.

LightningTransformer hard-codes dropout 0.2. Its deterministic variant (dropout
set to 0 after construction, `recipe.dropout=0.0`) is the one compared step by
step; the module exactly as shipped (dropout on) is only checked to train and to
export (one process and DDP), since each rank draws its own dropout masks.

BoringModel's scheduler: Lightning steps a scheduler returned without a config
dict once an epoch; test_boring_model_steps_its_scheduler_every_epoch holds
launcher to that.

The reference (one-process) run of each recipe and every launch are run once per
module (cached fixtures). Skips without lightning / transformers (and the ZeRO-3
cases without deepspeed).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import check, max_rel, metrics, outcome, reraise, run, write_config

pytestmark = [pytest.mark.slow]  # multi-process: the full suite, not the fast tier

# Float32 summed in another order (one process's micro-batches of 4 against two ranks'
# micro-batches of 2 averaged by gloo's all-reduce, FSDP's reduce-scatter, ZeRO's
# partitioned buckets) differs in the last bit or two: ~1e-7 relative per gradient,
# carried into the weights at about that size by the optimizer over a few steps. That
# is all that differs here (same samples per step, same initial weights, no dropout),
# so 1e-5 relative leaves a wide margin while a real mistake (a loss scaled by the
# accumulation or the world size, a rank's batch dropped, a stale shard) shows at 1e-3
# or more. Measured on 2 CPU cores (torch 2.13 CPU, transformers 5.24, lightning 2.6.6,
# DeepSpeed 0.19.8), max over the steps: GPT-2 2.2e-7 (ddp, fsdp, ZeRO-3 alike), Llama
# 1.9e-7, BoringModel 1.2e-7 (ddp) / 1.9e-7 (fsdp, ZeRO-3), LightningTransformer 0 (ddp)
# / 1.8e-7 (3 steps: see RECIPES). Printed by the test (-s).
LOSS_RTOL = 1e-5
# Exported weights against the one-process run's, elementwise |a - b| <= atol + rtol |b|.
# atol is 1e-4, not test_sharded's 1e-5, because of GPT-2's attention key bias: its gradient
# is zero in exact arithmetic (a constant added to every key score of a query cancels in the
# softmax), so it holds float noise of ~1e-10 that AdamW normalises into updates of either
# sign; the values stay tiny but differ between runs (measured after 10 steps: 2.5e-6 against
# -1.3e-6 ... 2.7e-6, half of an atol of 1e-5; every other weight used at most 0.23 of that).
# A missed or doubled update moves a weight by about the learning rate (AdamW 3e-3; SGD 0.1 on
# clipped gradients), far above 1e-4.
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-4

# name -> (processes, config sections)
STRATEGIES = {
    "single": (1, {"strategy": "single"}),
    "ddp": (2, {"strategy": "ddp"}),
    "fsdp": (2, {"strategy": "fsdp"}),
    "zero3": (2, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}),
}

# name -> (the package it needs, recipe section, steps, config sections)
HF_OPTIM = {"optim": {"name": "adamw", "lr": 3e-3}}  # no optimizer in the recipe: the config's
RECIPES = {
    "hf_gpt2": ("transformers", {"name": "toy_recipes.wild_hf", "arch": "gpt2"}, 10, HF_OPTIM),
    # 10 steps: 64 samples / 8 = 8 steps an epoch, so the run crosses an epoch boundary (its StepLR).
    "boring": ("lightning", {"name": "toy_recipes.wild_boring"}, 10, {}),
    # 3 steps: this demo amplifies last-bit differences about 10x a step (its own SGD at lr 0.1 on
    # embeddings scaled by sqrt(200), loss and grad norm swinging from step to step). Measured in ONE
    # process, micro batch 4 against 2 (nothing but the summation order changed): loss equal to 2e-7
    # for steps 1-3, then 5e-6 at step 4, 2e-4 at step 7; grad norm 1e-2 by step 6. The same growth
    # under ddp, fsdp and ZeRO-3. Three steps keep the comparison at 1e-5, meaningful.
    "lightning_transformer": ("lightning", {"name": "toy_recipes.wild_lightning_transformer", "dropout": 0.0}, 3,
                              {}),
    # Dropout 0.2, as shipped: only trains, under one process and under DDP.
    "lightning_transformer_shipped": ("lightning", {"name": "toy_recipes.wild_lightning_transformer"}, 10, {}),
}
COMPARED = [r for r in RECIPES if r != "lightning_transformer_shipped"]  # deterministic: equal losses


def requires(recipe: str, strategy: str = "single") -> None:
    pytest.importorskip(RECIPES[recipe][0])
    if strategy == "zero3":
        pytest.importorskip("deepspeed")


def config_for(recipe: str, strategy: str, run_dir: Path) -> dict:
    _, section, steps, extra = RECIPES[recipe]
    nproc, sections = STRATEGIES[strategy]
    return {
        "recipe": dict(section),
        "run_dir": str(run_dir),
        "precision": "fp32",
        "train": {"global_batch_size": 8, "micro_batch_size": 4 // nproc, "max_steps": steps, "log_every_steps": 1,
                  "grad_clip": 1.0, "seed": 0},
        "checkpoint": {"resume": "never"},
        **extra,
        **sections,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(recipe, strategy) -> its run dir, trained with `launcher run` once per module.
    Each launch's output is kept beside it (NAME.log) for a look at what the modules print."""
    root = tmp_path_factory.mktemp("wild")
    cache: dict[tuple[str, str], Path] = {}

    def launch(recipe: str, strategy: str) -> Path:
        name = f"{recipe}-{strategy}"
        run_dir = root / name
        path = write_config(root / f"{name}.yaml", config_for(recipe, strategy, run_dir))
        nproc = STRATEGIES[strategy][0]
        proc = run(["run", path] + (["--nproc", 2] if nproc == 2 else []), timeout=600)
        (root / f"{name}.log").write_text(
            f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        check(proc)
        return run_dir

    def get(recipe: str, strategy: str) -> Path:
        if (recipe, strategy) not in cache:
            cache[recipe, strategy] = outcome(lambda: launch(recipe, strategy))
        return reraise(cache[recipe, strategy])

    return get


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(recipe, strategy) -> the state dict `launcher export RUN_DIR OUT.safetensors` wrote, exported once.
    The command runs in this process (launcher.cli.main, the console script's function): one
    import of torch, transformers and DeepSpeed for all the exports, not one per export."""
    from safetensors.torch import load_file

    from launcher.cli import main

    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str], dict] = {}

    def export(recipe: str, strategy: str) -> dict:
        out = root / f"{recipe}-{strategy}.safetensors"
        code = main(["export", str(trained(recipe, strategy)), str(out)])
        assert code == 0, f"launcher export exited {code}"
        return load_file(str(out))

    def get(recipe: str, strategy: str) -> dict:
        if (recipe, strategy) not in cache:
            cache[recipe, strategy] = outcome(lambda: export(recipe, strategy))
        return reraise(cache[recipe, strategy])

    return get


def fresh_instance(recipe: str) -> torch.nn.Module:
    """A new instance of the package's own class, built the way the recipe builds it (same sizes)."""
    if recipe.startswith("hf_"):
        from toy_recipes import wild_hf
        from transformers import GPT2LMHeadModel, LlamaForCausalLM

        cfg = wild_hf.Config(arch=RECIPES[recipe][1]["arch"])
        return {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}[cfg.arch](wild_hf.hf_config(cfg))
    if recipe == "boring":
        from lightning.pytorch.demos import BoringModel

        return BoringModel()
    from lightning.pytorch.demos import LightningTransformer

    return LightningTransformer(vocab_size=256)


def val_values(run_dir: Path) -> dict:
    """The final validation row's values (val_loss and whatever the module logged)."""
    rows = metrics(run_dir)[1]
    assert rows, "no validation row"
    return {k: v for k, v in rows[-1].items() if k not in ("step", "epoch", "split")}


# ---------------------------------------------------------------- one process: the reference


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_trains_in_one_process(trained, recipe):
    requires(recipe)
    steps = RECIPES[recipe][2]
    rows = metrics(trained(recipe, "single"))[0]
    values = [r["loss"] for r in rows]
    lrs = [r["lr"] for r in rows]
    print(f"{recipe}: loss {' '.join(f'{v:.4f}' for v in values)}; lr {' '.join(f'{v:.3g}' for v in lrs)}")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in values)
    if recipe != "boring":  # BoringModel: MSE of random inputs' outputs against ones, no trend to expect
        assert values[-1] < values[0] - 0.1 and min(values) < values[0] - (0.3 if steps >= 10 else 0.1), values


def test_boring_model_steps_its_scheduler_every_epoch(trained):
    """configure_optimizers() returns ([SGD(lr=0.1)], [StepLR(step_size=1)]): a scheduler without a
    config dict is stepped once an epoch in Lightning (LRSchedulerConfig.interval = "epoch").
    64 samples, global batch 8: steps 1-8 are epoch 0 at lr 0.1, steps 9-10 epoch 1 at 0.01."""
    requires("boring")
    rows = metrics(trained("boring", "single"))[0]
    assert [r["lr"] for r in rows] == pytest.approx([0.1] * 8 + [0.01] * 2, rel=1e-6)


# ---------------------------------------------------------------- 2 processes: the same losses


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
@pytest.mark.parametrize("recipe", COMPARED)
def test_same_losses_as_one_process(trained, recipe, strategy):
    requires(recipe, strategy)
    ref_rows = metrics(trained(recipe, "single"))[0]
    rows = metrics(trained(recipe, strategy))[0]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, RECIPES[recipe][2] + 1))
    ref, got = [r["loss"] for r in ref_rows], [r["loss"] for r in rows]
    loss_rel = max_rel(ref, got)
    print(f"{recipe} {strategy}: max relative difference to one process: loss {loss_rel:.2e}")
    assert loss_rel < LOSS_RTOL, (ref, got)
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in ref_rows], rel=1e-6)
    ref_val, val = val_values(trained(recipe, "single")), val_values(trained(recipe, strategy))
    assert val.keys() == ref_val.keys()
    for key in ref_val:
        assert val[key] == pytest.approx(ref_val[key], rel=LOSS_RTOL), key


# ---------------------------------------------------------------- export: the package's own class loads it


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("recipe", COMPARED)
def test_export_loads_strictly_into_a_fresh_instance(exported, recipe, strategy):
    requires(recipe, strategy)
    state = exported(recipe, strategy)
    model = fresh_instance(recipe)
    assert set(state) == set(model.state_dict())  # the module's own names: no launcher wrapper prefix
    model.load_state_dict(state, strict=True)
    if recipe == "hf_gpt2":  # tied: one tensor under two names, still one Parameter after loading
        assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
        assert model.lm_head.weight is model.transformer.wte.weight
    if strategy != "single":  # the same weights as one process
        reference = exported(recipe, "single")
        # The largest |a - b| / (atol + rtol |b|): below 1 passes; how close to the limit it came.
        used = max(((state[k] - reference[k]).abs() / (WEIGHT_ATOL + WEIGHT_RTOL * reference[k].abs())).max().item()
                   for k in state if state[k].is_floating_point())
        print(f"{recipe} {strategy}: exported weights use {used:.2f} of the tolerance")
        for key, value in state.items():
            torch.testing.assert_close(value, reference[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       msg=f"{strategy}: {key}")


@pytest.mark.parametrize("recipe", ["hf_gpt2"])
def test_exported_weights_give_the_logged_validation_loss(exported, trained, recipe):
    """The exported file holds the trained weights: the fresh instance, loaded from it, gives the
    final validation loss the run logged (the same samples, all sequences the same length)."""
    requires(recipe)
    from toy_recipes import wild_hf

    model = fresh_instance(recipe)
    model.load_state_dict(exported(recipe, "single"), strict=True)
    model.eval()
    cfg = wild_hf.Config(arch=RECIPES[recipe][1]["arch"])
    val = wild_hf.data(cfg)[1]
    batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        value = wild_hf.loss(model, batch).item()
    assert value == pytest.approx(val_values(trained(recipe, "single"))["val_loss"], rel=1e-5)


# ---------------------------------------------------------------- LightningTransformer as shipped (dropout 0.2)


@pytest.mark.parametrize("strategy", ["ddp"])  # single: test_trains_in_one_process
def test_lightning_transformer_as_shipped_trains(trained, exported, strategy):
    """Dropout on: each rank draws its own masks, so the losses are not the one-process losses;
    it trains (the loss falls) and exports into a fresh LightningTransformer."""
    recipe = "lightning_transformer_shipped"
    requires(recipe, strategy)
    values = [r["loss"] for r in metrics(trained(recipe, strategy))[0]]
    print(f"{recipe} {strategy}: loss {' '.join(f'{v:.3f}' for v in values)}")
    assert len(values) == RECIPES[recipe][2] and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] - 0.1 and min(values) < values[0] - 0.3, values
    for strategy in ("single", strategy):
        model = fresh_instance(recipe)
        model.load_state_dict(exported(recipe, strategy), strict=True)
