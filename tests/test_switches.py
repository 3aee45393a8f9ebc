"""The switches that make big runs fast, each against the same run without it.

- train.activation_checkpointing: bit-identical losses and gradients, and far fewer
  tensors kept for the backward; under ZeRO-3 on 2 processes, the same losses;
- optim.impl: for_loop, foreach and fused give the same losses; the choice survives
  loading a checkpoint's optimizer state;
- data.num_workers (persistent workers, prefetch_factor): the same batches and losses
  as loading in the training process;
- ddp: (bucket_cap_mb, gradient_as_bucket_view, static_graph) and fsdp: prefetching,
  on 2 processes: the same losses;
- train.compile: on one process (the whole model) and on 2 under DDP and FSDP2 (per
  shard unit, with activation checkpointing and accumulation), losses within rounding.

Combinations that cannot work are bad input. The multi-process and compile tests are
slow (compiling costs ~20 s per process on the CPU); the rest run in this process.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from helpers import check, digits_config, losses, max_rel, metrics, outcome, reraise, run, write_config
from launcher.config import ConfigError, load_config, validate
from launcher.batch import BatchSizes
from launcher.data import train_loader
from launcher.env import DistEnv
from launcher.optim import build_optimizer, implementation
from launcher.precision import Precision
from launcher.recipe import Recipe
from launcher.strategies.single import SingleStrategy
from launcher.trainer import Trainer

# A tiny GPT: 2 layers (2 shard units), width 32, 32-byte windows.
GPT = {"name": "recipes.gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "max_chars": 60000}
CPU = torch.device("cpu")


def train_in_process(tmp_path: Path, name: str, **sections) -> list[dict]:
    """Train the digits config (with SECTIONS merged) in this process; its training rows."""
    cfg = write_config(tmp_path / f"{name}.yaml", digits_config(tmp_path / name, **sections))
    Trainer(load_config(cfg), DistEnv("single"), CPU).fit()
    return metrics(tmp_path / name)[0]


# ---------------------------------------------------------------- activation checkpointing


def gpt_strategy(**train) -> tuple[Recipe, SingleStrategy]:
    cfg = validate({"recipe": dict(GPT), "train": train}, "test")
    recipe = Recipe.load(cfg.recipe)
    torch.manual_seed(0)
    strategy = SingleStrategy(cfg, DistEnv("single"), CPU, Precision("fp32", CPU), None, recipe.shard_units)
    strategy.setup(recipe.build_model(), lambda model: (build_optimizer(cfg.optim, model), None))
    return recipe, strategy


def test_activation_checkpointing_gives_the_same_losses_and_gradients_from_fewer_saved_tensors():
    recipe, plain = gpt_strategy()
    _, checkpointed = gpt_strategy(activation_checkpointing=True)
    train_set, _ = recipe.build_data()
    for step in range(3):
        batch = tuple(torch.stack(t) for t in zip(*(train_set[i] for i in range(8 * step, 8 * step + 8))))
        saved, grads, values = [], [], []
        for strategy in (plain, checkpointed):
            numel = [0]

            def pack(t, numel=numel):
                numel[0] += t.numel()
                return t

            # The tensors autograd keeps outside a checkpointed unit (inside one, checkpoint's own hooks
            # take over and keep only the unit's inputs).
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                total, count = recipe.loss(strategy.model, batch)
            strategy.backward(total / count)
            saved.append(numel[0])
            values.append(total.item())
            grads.append([p.grad.clone() for p in strategy.model.parameters()])
            strategy.step()
        # The backward recomputes each unit with the same ops on the same inputs (deterministic CPU
        # kernels), so the results are the same bits, not merely close.
        assert values[0] == values[1]
        assert all(torch.equal(a, b) for a, b in zip(*grads)), step
        print(f"step {step}: saved for the backward, elements: {saved[0]} without, {saved[1]} with")
        assert saved[1] < saved[0] / 2, saved
    with torch.no_grad():  # validation runs the unit as it is
        torch.testing.assert_close(checkpointed.model(batch[0]), plain.model(batch[0]), rtol=0, atol=0)


def test_activation_checkpointing_needs_shard_units(tmp_path):
    from launcher.preflight import check_inputs

    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train={"activation_checkpointing": True}))
    with pytest.raises(ConfigError, match="activation_checkpointing=true needs shard units"):
        check_inputs(load_config(cfg), 1, "c.yaml")  # an MLP: no ModuleList


# ---------------------------------------------------------------- optimizer implementations


def test_impl_flags():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]  # a device without fused kernels
    assert implementation("auto", cpu) == {"foreach": False, "fused": True}  # torch 2.4+ fuses on the CPU
    assert implementation("auto", meta) == {"foreach": True, "fused": False}
    assert implementation("for_loop", cpu) == {"foreach": False, "fused": False}
    assert implementation("foreach", cpu) == {"foreach": True, "fused": False}
    with pytest.raises(ConfigError, match="optim.impl=fused: .* no fused optimizer kernel for torch.float32 "
                                          "parameters on meta: set optim.impl=auto"):
        implementation("fused", meta)


# Fused AdamW computes the update in one kernel with its own order of float32 operations: measured
# 1.0e-7 relative on the loss over these 20 steps (foreach and SGD: 0). 1e-5 leaves a margin of 100x,
# while real changes to the update show above it (measured: weight_decay 0.01 left out 9.5e-5, eps
# 1e-6 for 1e-8 7e-4, Adam's coupled decay for AdamW's 3e-2).
IMPL_RTOL = 1e-5


@pytest.mark.parametrize("name, lr", [("sgd", 0.1), ("adamw", 3e-3)])
def test_optimizer_impls_give_the_same_losses(tmp_path, name, lr):
    runs = {impl: train_in_process(tmp_path, impl, optim={"name": name, "lr": lr, "weight_decay": 0.01,
                                                          "impl": impl})
            for impl in ("for_loop", "foreach", "fused")}
    reference = [r["loss"] for r in runs["for_loop"]]
    for impl in ("foreach", "fused"):
        rel = max_rel(reference, [r["loss"] for r in runs[impl]])
        print(f"{name} {impl}: max relative loss difference to for_loop {rel:.1e}")
        assert rel < IMPL_RTOL
    assert reference[-1] < reference[0] - 0.05  # the updates did something to compare


def test_optimizer_impl_survives_loading_a_state_dict():
    """load_state_dict would take foreach / fused from the checkpoint's param groups."""
    cfg = validate({"recipe": {"name": "recipes.digits"}}, "test")

    def optimizer(impl):
        model = torch.nn.Linear(3, 2)
        opt = build_optimizer(cfg.optim.model_copy(update={"impl": impl}), model)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        return opt

    fused, loop = optimizer("fused"), optimizer("for_loop")
    loop.load_state_dict(fused.state_dict())
    assert {(g["foreach"], g["fused"]) for g in loop.param_groups} == {(False, False)}
    fused.load_state_dict(optimizer("for_loop").state_dict())
    assert {(g["foreach"], g["fused"]) for g in fused.param_groups} == {(False, True)}
    assert all(s["step"].dtype == torch.float32 for s in fused.state.values())
    fused.step()  # the fused kernel accepts the loaded step counters


def test_resume_from_another_impl_takes_the_configured_one(tmp_path):
    """A checkpoint's optimizer state written by the for-loop AdamW, resumed with fused: the run goes
    on fused (not as the checkpoint's param groups say) and the same as one fused run throughout."""
    def config(name, impl, steps):
        return load_config(write_config(tmp_path / f"{name}_{steps}.yaml", digits_config(
            tmp_path / name, train={"max_steps": steps}, optim={"lr": 3e-3, "impl": impl})))

    Trainer(config("through", "fused", 6), DistEnv("single"), CPU).fit()
    Trainer(config("resumed", "for_loop", 3), DistEnv("single"), CPU).fit()
    trainer = Trainer(config("resumed", "fused", 6), DistEnv("single"), CPU)  # resumes at step 3
    assert trainer.step == 3
    assert {(g["foreach"], g["fused"]) for g in trainer.strategy.optimizer.param_groups} == {(False, True)}
    trainer.fit()
    assert max_rel(losses(tmp_path / "through"), losses(tmp_path / "resumed")) < IMPL_RTOL


# ---------------------------------------------------------------- data loading


def test_workers_load_the_same_batches_across_epochs_and_resumes():
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(100))
    plan = BatchSizes(8, 4, 2, 100)

    def batches(workers, **kwargs):
        loader = train_loader(data, plan, 1, 0, True, workers, None, "auto", **kwargs)
        out = []
        for epoch, start in ((0, 0), (1, 0), (2, 5), (3, 0)):  # an epoch resumed at step 5
            loader.sampler.set_epoch(epoch, start)
            it = iter(loader)  # persistent workers: the same processes every epoch
            out.append([next(it)[0].tolist() for _ in range(4)])  # a partial epoch, as max_steps cuts one
        return out, loader

    reference, _ = batches(0, prefetch_factor=3)  # no workers: prefetch_factor is not torch's to refuse
    loaded, loader = batches(2, prefetch_factor=3)
    assert loaded == reference
    assert loader.persistent_workers and loader.prefetch_factor == 3 and not loader.pin_memory


def test_workers_give_the_same_losses(tmp_path):
    # 1437 training samples, 64 a step: 22 steps an epoch, so 30 steps cross an epoch boundary.
    train = {"max_steps": 30}
    reference = train_in_process(tmp_path, "main", train=train)
    loaded = train_in_process(tmp_path, "workers", train=train, data={"num_workers": 2, "prefetch_factor": 4})
    assert [r["loss"] for r in loaded] == [r["loss"] for r in reference]  # exact: the same batches


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_pin_memory_is_for_cuda():
    from torch.utils.data import TensorDataset

    data, plan = TensorDataset(torch.arange(8)), BatchSizes(8, 8, 1, 8)
    assert not train_loader(data, plan, 0, 0, True, 0, None, "auto").pin_memory
    with pytest.raises(ConfigError, match="data.pin_memory=true needs CUDA"):
        train_loader(data, plan, 0, 0, True, 0, None, True)


# ---------------------------------------------------------------- DDP and FSDP options, bad input


def test_ddp_options_reach_ddp(monkeypatch):
    import launcher.strategies.ddp as ddp_mod

    seen = {}
    monkeypatch.setattr(ddp_mod, "ensure_process_group", lambda device: None)
    monkeypatch.setattr(ddp_mod, "DistributedDataParallel", lambda model, **kwargs: seen.update(kwargs) or model)

    def wrap(accumulation, **ddp):
        cfg = validate({"recipe": {"name": "recipes.digits"}, "strategy": "ddp", "ddp": ddp}, "test")
        plan = BatchSizes(16, 8 // accumulation, 2, 100)
        ddp_mod.DDPStrategy(cfg, DistEnv("single"), CPU, Precision("fp32", CPU), plan).wrap(torch.nn.Linear(2, 2))

    wrap(1)
    assert seen == {"device_ids": None, "bucket_cap_mb": 25, "static_graph": False, "gradient_as_bucket_view": True}
    wrap(1, bucket_cap_mb=1.5, static_graph=True, gradient_as_bucket_view=False)
    assert seen == {"device_ids": None, "bucket_cap_mb": 1.5, "static_graph": True, "gradient_as_bucket_view": False}
    cfg = validate({"recipe": {"name": "recipes.digits"}, "strategy": "ddp", "ddp": {"static_graph": True}}, "test")
    ddp_mod.DDPStrategy.check(cfg, BatchSizes(16, 8, 2, 100), 2, None)  # no accumulation: fine
    with pytest.raises(ConfigError, match="static_graph=true cannot be combined with gradient accumulation"):
        ddp_mod.DDPStrategy.check(cfg, BatchSizes(16, 4, 2, 100), 2, None)


def test_sync_batchnorm_converts_the_batchnorm_layers_of_a_multi_process_run():
    """The conversion itself (SyncBatchNorm's forward needs CUDA, so it is refused on the CPU before any
    worker: tests/test_bad_inputs.py)."""
    from launcher.strategies.ddp import DDPStrategy

    cfg = validate({"recipe": {"name": "recipes.digits"}, "strategy": "ddp", "train": {"sync_batchnorm": True}}, "t")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    two = DistEnv("torchrun", rank=0, world_size=2)
    prepared = DDPStrategy(cfg, two, CPU, Precision("fp32", CPU)).prepare(model)
    assert isinstance(prepared[1], torch.nn.SyncBatchNorm)
    one = DDPStrategy(cfg, DistEnv("single"), CPU, Precision("fp32", CPU)).prepare(
        torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    assert type(one[0]) is torch.nn.BatchNorm1d  # one process: nothing to sync


def test_a_first_deepspeed_run_on_the_cpu_knows_it_builds_an_op(tmp_path, monkeypatch):
    """DeepSpeed compiles its CPU communication op once per machine (a minute or two, silent): the
    launcher says so before, where torch's extension cache does not hold it yet."""
    from launcher.strategies.deepspeed import shm_op_built

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not shm_op_built()
    built = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    assert shm_op_built()


def test_fsdp_prefetch_lists():
    from launcher.strategies.fsdp import FSDPStrategy

    class Unit:
        def __init__(self, i):
            self.i, self.forward, self.backward = i, None, None

        def set_modules_to_forward_prefetch(self, units):
            self.forward = [u.i for u in units]

        def set_modules_to_backward_prefetch(self, units):
            self.backward = [u.i for u in units]

    def lists(**fsdp):
        strategy = types.SimpleNamespace(cfg=validate({"recipe": {"name": "x"}, "fsdp": fsdp}, "test"))
        units = [Unit(i) for i in range(4)]
        FSDPStrategy.set_prefetch(strategy, units)
        return [u.forward for u in units], [u.backward for u in units]

    assert lists() == ([None] * 4, [None] * 4)  # FSDP2's own defaults
    assert lists(forward_prefetch=2, backward_prefetch=2) == ([[1, 2], [2, 3], [3], []], [[], [0], [1, 0], [2, 1]])


def test_compile_with_deepspeed_is_bad_input():
    from launcher.strategies.deepspeed import ds_config

    cfg = validate({"recipe": {"name": "recipes.digits"}, "strategy": "deepspeed", "train": {"compile": True}}, "t")
    with pytest.raises(ConfigError, match="train.compile=true is not supported with strategy=deepspeed"):
        ds_config(cfg, BatchSizes(64, 32, 2, 1000), cuda=False)


# ---------------------------------------------------------------- on 2 processes, and compile

# name -> (processes, recipe, config sections); accumulation 2 throughout unless the micro batch says so
RUNS = {
    "single": (1, GPT, {"strategy": "single"}),
    "fsdp": (2, GPT, {"strategy": "fsdp"}),
    "ddp_buckets": (2, GPT, {"strategy": "ddp", "ddp": {"bucket_cap_mb": 0.01, "gradient_as_bucket_view": False}}),
    # static_graph only without accumulation (torch's no_sync with it is refused above)
    "ddp_static_graph": (2, GPT, {"strategy": "ddp", "ddp": {"static_graph": True}, "train": {"micro_batch_size": 8}}),
    "fsdp_prefetch": (2, GPT, {"strategy": "fsdp", "fsdp": {"forward_prefetch": 2, "backward_prefetch": 2}}),
    "zero3_checkpointing": (2, GPT, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3},
                                     "train": {"activation_checkpointing": True}}),
    "ddp_compile": (2, GPT, {"strategy": "ddp", "train": {"compile": True, "activation_checkpointing": True}}),
    "fsdp_compile": (2, GPT, {"strategy": "fsdp", "train": {"compile": True, "activation_checkpointing": True}}),
    "digits": (1, {"name": "recipes.digits", "hidden": 32}, {"strategy": "single"}),
    "digits_compile": (1, {"name": "recipes.digits", "hidden": 32}, {"strategy": "single", "train": {"compile": True}}),
}

# As in test_sharded: float32 with another reduction order (2 ranks, buckets, accumulation) moves a
# loss by ~1e-7 relative; 1e-5 leaves a wide margin while a real mistake shows at 1e-3 or more.
LOSS_RTOL = 1e-5
# Inductor fuses each unit's ops into kernels of its own (other summation orders in LayerNorm,
# softmax and the matmul epilogues, vectorised for the CPU at hand): single-step gradients differ by
# up to 2e-6 relative, and AdamW carries that into the weights. Measured over these 8 steps: 1.9e-7
# on the loss and 1.5e-7 on the grad norm (as eager on 2 processes), 0 and 7.6e-8 for the digits
# MLP. 1e-4 leaves room for other CPUs, below the 1e-3 of a real mistake (the loss divided by the
# accumulation twice, test_sharded).
COMPILE_RTOL = 1e-4


def run_config(name: str, run_dir: Path) -> dict:
    nproc, recipe, extra = RUNS[name]
    cfg = {
        "recipe": dict(recipe), "run_dir": str(run_dir), "precision": "fp32",
        "train": {"global_batch_size": 16, "micro_batch_size": 8 // nproc, "max_steps": 8, "log_every_steps": 1,
                  "grad_clip": 1.0, "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2, "decay": "cosine"},
        "checkpoint": {"resume": "never"},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("switches")
    cache: dict[str, object] = {}

    def get(name: str) -> Path:
        if name not in cache:
            run_dir = root / name
            path = write_config(root / f"{name}.yaml", run_config(name, run_dir))
            nproc = RUNS[name][0]
            cache[name] = outcome(lambda: check(run(["run", path] + (["--nproc", 2] if nproc == 2 else []),
                                                    timeout=600)) and run_dir)
        return reraise(cache[name])

    return get


def compare(launched, name: str, reference: str, rtol: float) -> None:
    ref_rows, ref_val = metrics(launched(reference))
    rows, val = metrics(launched(name))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, 9))
    loss = max_rel([r["loss"] for r in ref_rows], [r["loss"] for r in rows])
    norm = max_rel([r["grad_norm"] for r in ref_rows], [r["grad_norm"] for r in rows])
    val_loss = max_rel([r["val_loss"] for r in ref_val], [r["val_loss"] for r in val])
    print(f"{name} against {reference}: max relative difference: loss {loss:.1e}, grad_norm {norm:.1e}, "
          f"val_loss {val_loss:.1e}")
    assert loss < rtol and val_loss < rtol
    assert norm < rtol * 10  # a whole gradient's norm: a sum of squares, more rounding


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_buckets", "ddp_static_graph", "zero3_checkpointing"])
def test_same_losses_on_two_processes(launched, name):
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")
    compare(launched, name, "single", LOSS_RTOL)


@pytest.mark.slow
def test_fsdp_prefetch_changes_nothing_but_timing(launched):
    """Prefetching only issues the same all-gathers earlier: the same bits as without."""
    assert losses(launched("fsdp_prefetch")) == losses(launched("fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("digits_compile", "digits"), ("ddp_compile", "single"),
                                             ("fsdp_compile", "single")])
def test_compiled_losses_match_eager(launched, name, reference):
    """The whole model on one process; per shard unit under DDP and FSDP2, with activation
    checkpointing and no_sync / set_requires_gradient_sync across the 2 micro-steps."""
    compare(launched, name, reference, COMPILE_RTOL)
