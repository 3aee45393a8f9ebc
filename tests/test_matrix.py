"""Every optimizer x strategy x precision pair either trains or is refused before any worker starts.

The matrix (256 pairs): strategies single (1 process), ddp, fsdp, HSDP (fsdp.replicate=2 on 2
processes: 2 replica groups of 1), deepspeed ZeRO 0, 1, 2, 3 (2 processes); precisions fp32, bf16,
fp16, float8; optimizers sgd with momentum, sgd without, adam, adamw; optim.impl auto and fused. Each pair
trains the digits MLP (hidden 16) for 3 steps of 32 samples, validating after each step under
checkpoint.best and train.early_stop (whose checkpoint and state every pair checks), or is refused by
`preflight.check_inputs` (what `launcher run` calls before it starts any worker) with a ConfigError
(exit 2) of one paragraph that names the cause (`refusal` below says which pairs, and why).

- Fast tier, in this process: preflight on every pair; the single-process pairs trained (they are the
  references of the 2-process pairs); the fused-kernel choice for DTensor parameters; one refusal
  through the CLI (exit 2, no worker).
- Slow tier: the 2-process pairs, trained one after another by one pair of worker processes started
  once (tests/matrix_worker.py: a gloo group, a Trainer per pair), not by a `launcher run --nproc 2`
  per pair (5-10 s of start-up each). Each must give the per-step losses of the 1-process run of the
  same optimizer, precision and impl (LOSS_RTOL), and use the optimizer implementation expected.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import max_rel, metrics, monitoring, run, run_ranks, write_config
from launcher.config import validate
from launcher.env import DistEnv
from launcher.errors import ConfigError
from launcher.optim import dtensor_runs_fused, implementation
from launcher.preflight import check_inputs
from launcher.trainer import Trainer

CPU = torch.device("cpu")
WORKER = Path(__file__).resolve().parent / "matrix_worker.py"

# name -> (processes, config sections)
STRATEGIES = {
    "single": (1, {"strategy": "single"}),
    "ddp": (2, {"strategy": "ddp"}),
    "fsdp": (2, {"strategy": "fsdp"}),
    "hsdp": (2, {"strategy": "fsdp", "fsdp": {"replicate": 2}}),  # R = W: every group one rank (DDP-like)
    **{f"zero{s}": (2, {"strategy": "deepspeed", "deepspeed": {"zero_stage": s}}) for s in range(4)},
}
PRECISIONS = ("fp32", "bf16", "fp16", "float8")
OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
    "sgd_plain": {"name": "sgd", "lr": 0.5, "momentum": 0.0},  # no momentum buffer: another code path
    "adam": {"name": "adam", "lr": 1e-2},
    "adamw": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01},
}
IMPLS = ("auto", "fused")
STEPS = 3

# The 2-process losses against the 1-process run of the same optimizer, precision and impl, step by
# step (max relative difference). fp32: only the summation order differs (2 ranks' gradients averaged):
# measured <= 1.0e-7. fp16 (autocast and torch's gradient scaler on both): <= 1.9e-6. bf16: DDP and
# FSDP (whose MixedPrecisionPolicy casts what autocast casts) <= 2.8e-5; ZeRO 1-3 run the forward with
# the module itself in bf16 (DeepSpeed casts it and keeps fp32 master weights) where one process casts
# op by op under autocast: <= 1.7e-4. Each bound leaves >= 5x room, stays below its format's rounding
# unit (bf16 3.9e-3, fp16 4.9e-4) and below what a wrong update shows: an SGD step twice too large (as
# gradients summed over the 2 ranks instead of averaged) moves the losses by 3.6e-3 by step 3.
# float8 (torchao, emulated on the CPU): each micro-batch's activations get their own float8 scale, and a
# micro-batch is 32 samples on one process, 16 on each of two: <= 5.7e-4 (Adam under FSDP), 4x room.
LOSS_RTOL = {"fp32": 1e-5, "fp16": 1e-4, "bf16": 1e-3, "float8": 2.5e-3}


@dataclass(frozen=True)
class Pair:
    strategy: str
    precision: str
    optimizer: str
    impl: str

    def __str__(self) -> str:
        return f"{self.strategy}-{self.precision}-{self.optimizer}-{self.impl}"

    @property
    def processes(self) -> int:
        return STRATEGIES[self.strategy][0]

    @property
    def fsdp(self) -> bool:
        return STRATEGIES[self.strategy][1]["strategy"] == "fsdp"

    def config(self, run_dir: Path) -> dict:
        cfg = {
            "recipe": {"name": "recipes.digits", "hidden": 16},
            "run_dir": str(run_dir),
            "precision": self.precision,
            # The same 32 samples a step at 1 and at 2 processes (Batch math).
            "train": {"global_batch_size": 32, "micro_batch_size": 32 // self.processes, "max_steps": STEPS,
                      "log_every_steps": 1, "seed": 0, "eval_every_steps": 1,
                      "early_stop": {"monitor": "val_loss", "patience": STEPS}},  # follows, never stops
            "optim": {**OPTIMIZERS[self.optimizer], "impl": self.impl},
            "checkpoint": {"resume": "never", "keep_last": 1, "best": {"monitor": "accuracy", "mode": "max"}},
            "dist": {"timeout_s": 120},  # a hang ends, naming its rank, well inside the test's timeout
        }
        cfg.update(STRATEGIES[self.strategy][1])
        return cfg

    def twin(self, **changes) -> "Pair":
        return Pair(**{**self.__dict__, **changes})


PAIRS = [Pair(s, p, o, i) for s in STRATEGIES for p in PRECISIONS for o in OPTIMIZERS for i in IMPLS]
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
TORCHAO = importlib.util.find_spec("torchao") is not None


def refusal(pair: Pair, cuda: bool) -> str | None:
    """The message (a regular expression) preflight refuses the pair with, or None where it trains."""
    name = OPTIMIZERS[pair.optimizer]["name"]
    if pair.strategy.startswith("zero"):
        if not DEEPSPEED:
            return r"deepspeed is not installed, but the config asks for it: pip install"
        if pair.precision == "fp16" and not cuda:
            return (r"precision=fp16 with strategy=deepspeed needs a GPU: DeepSpeed has no fp16 on the CPU\. "
                    r"Use precision=bf16 \(or fp32\), or another strategy")
        if pair.strategy == "zero0" and pair.precision != "fp32":
            return (rf"deepspeed\.zero_stage=0 with precision={pair.precision} is not supported: .* "
                    r"Use strategy=ddp .* or deepspeed\.zero_stage>=1")
    if pair.precision == "float8" and not TORCHAO:
        return r"precision=float8 needs torchao, which is not installed: pip install 'launcher\[float8\]'"
    if pair.precision == "float8" and pair.strategy.startswith("zero"):
        return r"precision=float8 with strategy=deepspeed is not supported: use strategy=fsdp"
    if pair.fsdp and pair.impl == "fused" and not dtensor_runs_fused(name):
        # torch 2.13: aten._fused_sgd_ has no DTensor sharding rule (Adam's and AdamW's have).
        return (rf"optim\.impl=fused with optim\.name={name} and strategy=fsdp: torch \S+ has no DTensor sharding "
                rf"rule for aten\._fused_{name}_ \(the fused \w+ kernel\), so it cannot step FSDP's sharded "
                r"\(DTensor\) parameters: set optim\.impl=auto .* or optim\.impl=foreach, or use strategy=ddp or "
                "deepspeed")
    return None


def expected_flags(pair: Pair) -> list[list[bool]]:
    """(foreach, fused) of the optimizer a pair that trains gets: fused wherever torch's kernel steps the
    parameters (plain tensors everywhere but FSDP, DTensors there), else foreach."""
    fused = not pair.fsdp or dtensor_runs_fused(OPTIMIZERS[pair.optimizer]["name"])
    return [[not fused, fused]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """This tiny model trains fastest on one intra-op thread, and on cores shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_trained(rows_steps: list[int], losses: list[float], what: str) -> None:
    assert rows_steps == list(range(1, STEPS + 1)), f"{what}: rows for steps {rows_steps}"
    assert all(math.isfinite(x) for x in losses), f"{what}: losses {losses}"
    assert losses[-1] < losses[0], f"{what}: the loss did not fall: {losses}"


def assert_monitored(got: dict, what: str) -> None:
    """The best accuracy's checkpoint is kept (besides keep_last's 1) and named; val_loss's early-stopping
    count is the validations since its best."""
    steps = [s for s, _, _ in got["val"]]
    assert steps == list(range(1, STEPS + 1)), f"{what}: validations at {steps}"
    best = max(got["val"], key=lambda v: v[1])[0]  # the first of equals: a tie is no improvement
    losses = [v[2] for v in got["val"]]
    since = len(losses) - 1 - losses.index(min(losses))
    assert got["best"] == f"step_{best:06d}", f"{what}: {got}"
    assert got["kept"] == sorted({f"step_{best:06d}", f"step_{STEPS:06d}"}), f"{what}: {got}"
    assert got["monitors"]["best"]["best_step"] == best and got["monitors"]["early_stop"]["bad"] == since, \
        f"{what}: {got}"


# ---------------------------------------------------------------- fast: preflight on every pair


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_preflight_passes_or_refuses_with_the_cause(pair, root):
    cfg = validate(pair.config(root / "preflight" / str(pair)), str(pair))
    expected = refusal(pair, torch.cuda.is_available())
    if expected is None:
        check_inputs(cfg, pair.processes, str(pair))
        return
    with pytest.raises(ConfigError) as refused:
        check_inputs(cfg, pair.processes, str(pair))
    message = str(refused.value)
    assert re.match(expected, message), message
    assert "\n" not in message, f"not one paragraph: {message}"


# ---------------------------------------------------------------- fast: the single-process pairs


@pytest.fixture(scope="module")
def single(root):
    """Train a single-process pair in this process, once: (steps, losses, flags)."""
    done: dict[Pair, tuple] = {}

    def get(pair: Pair) -> tuple:
        if pair not in done:
            run_dir = root / "single" / str(pair)
            trainer = Trainer(validate(pair.config(run_dir), str(pair)), DistEnv("single"), CPU)
            flags = sorted({(bool(g["foreach"]), bool(g["fused"])) for g in trainer.strategy.optimizer.param_groups})
            trainer.fit()
            trainer.strategy.close()
            rows = metrics(run_dir)[0]
            done[pair] = ([r["step"] for r in rows], [r["loss"] for r in rows], [list(f) for f in flags],
                          monitoring(run_dir))
        return done[pair]

    return get


@pytest.mark.parametrize("pair", [p for p in PAIRS if p.strategy == "single"], ids=str)
def test_single_process_pair_trains(pair, single):
    steps, losses, flags, monitored = single(pair)
    assert_trained(steps, losses, str(pair))
    assert flags == expected_flags(pair)
    assert_monitored(monitored, str(pair))
    if pair.impl == "fused":  # the same optimizer as auto picks: the same bits
        assert losses == single(pair.twin(impl="auto"))[1]


# ---------------------------------------------------------------- fast: the fused kernel and DTensors


def fake_dtensor() -> types.SimpleNamespace:
    """What implementation() reads of an FSDP parameter (a DTensor: a device mesh and to_local)."""
    return types.SimpleNamespace(device=CPU, dtype=torch.float32, device_mesh=None, to_local=lambda: None)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_auto_takes_fused_only_where_the_kernel_steps_the_parameters(name):
    plain = [torch.nn.Parameter(torch.zeros(2))]
    # Plain tensors (single, ddp, deepspeed): fused, as before, whatever the optimizer.
    assert implementation("auto", plain, name) == implementation("fused", plain, name) == {"foreach": False,
                                                                                            "fused": True}
    sharded = [fake_dtensor()]
    if dtensor_runs_fused(name):
        assert implementation("auto", sharded, name) == implementation("fused", sharded, name) == {
            "foreach": False, "fused": True}
        return
    assert implementation("auto", sharded, name) == {"foreach": True, "fused": False}
    with pytest.raises(ConfigError, match=rf"optim\.impl=fused: torch \S+ has no DTensor sharding rule for "
                                          rf"aten\._fused_{name}_ .*: set optim\.impl=auto"):
        implementation("fused", sharded, name)


def test_the_dtensor_rules_are_found():
    """torch >= 2.9 (the floor) has DTensor rules for the fused Adam and AdamW kernels: where torch's
    registries move, the lookup must not silently turn FSDP's Adam into foreach. (What torch really
    does with each kernel: test_dtensor_rules_match_what_torch_does, on 2 processes.)"""
    assert dtensor_runs_fused("adam") and dtensor_runs_fused("adamw")
    assert implementation("auto", [fake_dtensor()]) == {"foreach": True, "fused": False}  # which kernel: unknown


# ---------------------------------------------------------------- fast: one refusal through the CLI

# What torch.distributed.run prints once it started workers (as tests/test_bad_inputs.py)
WORKER_OUTPUT = ("torch.distributed", "torchelastic", "elastic.", "ChildFailedError", "local_rank", "exitcode")


@pytest.mark.skipif(dtensor_runs_fused("sgd"), reason="this torch steps DTensors with the fused SGD kernel")
def test_cli_refuses_fused_sgd_under_fsdp_before_any_worker(tmp_path):
    pair = Pair("fsdp", "fp32", "sgd", "fused")
    run_dir = tmp_path / "run"
    proc = run(["run", write_config(tmp_path / "c.yaml", pair.config(run_dir)), "--nproc", 2], timeout=120)
    shown = f"exit {proc.returncode}\n--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-5000:]}"
    assert proc.returncode == 2, shown
    errors = re.findall(r"(?m)^error: .*$", proc.stderr)
    assert len(errors) == 1, shown
    assert re.search(refusal(pair, cuda=False), errors[0]), shown
    assert "Traceback" not in proc.stderr, shown
    assert not any(marker in proc.stdout + proc.stderr for marker in WORKER_OUTPUT), f"a worker started\n{shown}"
    assert not run_dir.exists(), shown


# ---------------------------------------------------------------- slow: the 2-process pairs

TWO_PROCESS = [p for p in PAIRS if p.processes == 2 and refusal(p, cuda=False) is None]


@pytest.fixture(scope="module")
def two_processes(root, request):
    """The 2-process pairs that train (on the CPU: the workers see no GPU) and whose tests were selected,
    trained by one pair of worker processes: (what rank 0 wrote, the workers' output)."""
    selected = {item.callspec.params["pair"] for item in request.session.items
                if getattr(item, "originalname", None) == test_two_process_pair_trains_as_one_process.__name__}
    base = root / "two"
    base.mkdir()
    spec = base / "spec.json"
    spec.write_text(json.dumps({"pairs": {str(p): p.config(base / str(p)) for p in TWO_PROCESS if p in selected}}))
    out = base / "out.json"
    _, tails = run_ranks(WORKER, [spec, out], 2, base)
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("pairs"):
        seconds = sum(r["seconds"] for r in result["pairs"].values())
        print(f"{len(result['pairs'])} pairs on 2 processes: {seconds:.1f} s of Trainer set-up and fit")
    return result, tails


@pytest.mark.slow
@pytest.mark.parametrize("pair", TWO_PROCESS, ids=str)
def test_two_process_pair_trains_as_one_process(pair, two_processes, single):
    result, tails = two_processes
    got = result.get("pairs", {}).get(str(pair))
    if got is None:
        failed = result.get("failed", {})
        if failed.get("pair") == str(pair):
            pytest.fail(f"{pair} failed in a worker:\n{failed['traceback']}\n{tails}")
        stopped = f"the workers stopped earlier, at {failed['pair']} (see its test)" if failed else \
            f"the workers wrote no result for it\n{tails}"
        pytest.fail(f"{pair} was not trained: {stopped}")
    assert_trained(got["steps"], got["losses"], str(pair))
    assert got["flags"] == expected_flags(pair), f"{pair}: (foreach, fused) {got['flags']}"
    assert_monitored(got["monitoring"], str(pair))
    _, reference, _, _ = single(pair.twin(strategy="single"))
    rel = max_rel(reference, got["losses"])
    print(f"{pair}: max relative loss difference to 1 process {rel:.1e}, {got['seconds']} s")
    assert rel < LOSS_RTOL[pair.precision], f"{pair}: {got['losses']} against 1 process {reference}"


@pytest.mark.slow
def test_dtensor_rules_match_what_torch_does(two_processes):
    """launcher.optim reads torch's DTensor registries to choose fused or foreach under FSDP; a fused step
    on a real sharded parameter says whether that answer is torch's."""
    result, tails = two_processes
    assert "fused_on_dtensor" in result, tails
    assert result["fused_on_dtensor"] == {name: dtensor_runs_fused(name) for name in ("sgd", "adam", "adamw")}
