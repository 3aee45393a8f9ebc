"""The single-process loop."""
import math
import time

import pytest
import torch

from helpers import ROOT, check, digits_config, losses, metrics, run, write_config
from launcher.config import ScheduleConfig, load_config
from launcher.data import epoch_permutation
from launcher.env import DistEnv
from launcher.optim import lr_factor
from launcher.trainer import Trainer


def test_default_config_reaches_95_percent_in_under_a_minute(tmp_path):
    start = time.perf_counter()
    proc = check(run(["run", ROOT / "configs" / "digits.yaml", f"run_dir={tmp_path / 'run'}"]))
    seconds = time.perf_counter() - start
    _, val_rows = metrics(tmp_path / "run")
    print(f"digits.yaml: val accuracy {val_rows[-1]['accuracy']:.4f} in {seconds:.1f} s")
    assert val_rows[-1]["accuracy"] >= 0.95
    assert "step=" in proc.stdout  # not a terminal: plain lines


@pytest.mark.slow  # a run and an export
def test_a_run_says_where_it_writes_first_and_what_it_did_last(tmp_path):
    """stderr's first line is the run dir; its last sums the run up: steps, time, the final validation,
    the newest checkpoint (on the disk) and the export command for it, which works as printed."""
    proc = check(run(["run", ROOT / "configs" / "digits.yaml", f"run_dir={tmp_path / 'run'}", "train.max_steps=25"]))
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"run dir: {tmp_path / 'run'}"
    _, val = metrics(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000025"
    assert lines[-1].startswith("done: 25 steps in 0:0") and f"accuracy={val[-1]['accuracy']:.4g}" in lines[-1]
    assert f"checkpoint {ckpt};" in lines[-1] and ckpt.is_dir()
    command = lines[-1].split("one file: ")[1].split()
    assert command[:3] == ["launcher", "export", str(tmp_path / "run")]
    exported = check(run(command[1:], cwd=tmp_path))
    assert exported.stdout.strip() == "wrote model.safetensors (the weights of step 25)"
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow  # four short runs
def test_batch_statistics_layers_are_named_where_the_math_differs(tmp_path):
    """BatchNorm normalises over a micro-batch: with accumulation (or several processes) the start-up
    and `launcher plan` say the steps differ from one process with the whole batch, and why."""
    sections = dict(recipe={"name": "toy_recipes.batchnorm", "hidden": 32}, train={"max_steps": 2})
    split = write_config(tmp_path / "a.yaml", digits_config(tmp_path / "a", **{**sections, "train": {
        "max_steps": 2, "micro_batch_size": 32}}))
    whole = write_config(tmp_path / "b.yaml", digits_config(tmp_path / "b", **sections))
    phrase = "1 batch-statistics layer(s) (BatchNorm1d); each normalises over one micro-batch of 32"
    assert phrase in check(run(["run", split])).stderr
    assert "batch-statistics" not in check(run(["run", whole])).stderr  # one micro-batch a step: the same math
    assert phrase in check(run(["plan", split])).stdout
    assert "sync_batchnorm" in check(run(["plan", whole, "--nproc", 2])).stdout


def test_regression_recipe_trains(tmp_path):
    check(run(["run", ROOT / "configs" / "diabetes.yaml", f"run_dir={tmp_path / 'run'}"]))
    train_rows, val_rows = metrics(tmp_path / "run")
    assert train_rows[-1]["loss"] < 0.7 * train_rows[0]["loss"]
    assert val_rows[-1]["val_loss"] < 0.7  # MSE in units of the target's variance: better than the mean


def test_outputs_and_validation_schedule(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", train={"max_steps": 25, "log_every_steps": 5, "eval_every_steps": 10}))
    proc = check(run(["run", cfg]))
    run_dir = tmp_path / "run"
    assert load_config(run_dir / "config.yaml").train.max_steps == 25  # the resolved config, loadable
    train_rows, val_rows = metrics(run_dir)
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25]
    for row in train_rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "time"} <= row.keys()
        assert row["samples_per_s"] > 0 and math.isfinite(row["loss"])
    assert [r["step"] for r in val_rows] == [10, 20, 25]  # every 10 steps and at the end
    assert all({"val_loss", "accuracy"} <= r.keys() for r in val_rows)
    # Not a terminal: one plain line per logging step, one per validation.
    assert sum(line.startswith("step=") for line in proc.stdout.splitlines()) == 5
    assert sum(line.startswith("[val]") for line in proc.stdout.splitlines()) == 3


def test_same_config_twice_gives_identical_losses(tmp_path):
    for name in ("a", "b"):
        cfg = write_config(tmp_path / f"{name}.yaml", digits_config(tmp_path / name, data={"num_workers": 1}))
        check(run(["run", cfg]))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("optim", ["sgd", "adam", "adamw"])
def test_each_optimizer_trains(tmp_path, optim):
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", optim={"name": optim, "lr": 0.3 if optim == "sgd" else 1e-2},
        train={"max_steps": 60, "log_every_steps": 60}))
    check(run(["run", cfg]))
    first = torch.log(torch.tensor(10.0)).item()  # the loss of a uniform guess
    assert losses(tmp_path / "run")[-1] < 0.7 * first


def test_schedules():
    const = lr_factor(ScheduleConfig(decay="constant"), 100)
    assert [const(s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    warm = lr_factor(ScheduleConfig(warmup_steps=10, decay="constant"), 100)
    assert warm(0) == pytest.approx(0.1) and warm(4) == pytest.approx(0.5) and warm(10) == 1.0
    cos = lr_factor(ScheduleConfig(warmup_steps=10, decay="cosine"), 110)
    assert cos(10) == 1.0 and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    lin = lr_factor(ScheduleConfig(decay="linear", min_lr_ratio=0.1), 100)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.55) and lin(100) == pytest.approx(0.1)


def test_logged_lr_follows_the_schedule(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", schedule={"warmup_steps": 4, "decay": "linear"}, optim={"name": "adamw", "lr": 0.01}))
    check(run(["run", cfg]))
    lrs = [r["lr"] for r in metrics(tmp_path / "run")[0]]
    factor = lr_factor(ScheduleConfig(warmup_steps=4, decay="linear"), 20)
    assert lrs == pytest.approx([0.01 * factor(s) for s in range(20)])


def test_gradient_clipping_bounds_the_update(tmp_path):
    """With SGD without momentum, a clipped step moves the weights by exactly lr * max_norm."""
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", optim={"name": "sgd", "lr": 1.0, "momentum": 0.0},
        train={"max_steps": 1, "grad_clip": 1e-3}))
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.strategy.model.parameters()]
    trainer.fit()
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(trainer.strategy.model.parameters(), before)))
    grad_norm = metrics(tmp_path / "run")[0][0]["grad_norm"]
    assert grad_norm > 1e-2  # the unclipped norm is logged
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)


def test_micro_batch_size_is_the_most_a_device_holds(tmp_path):
    """24 does not divide 64: the largest micro batch within it that does (16, so 4 accumulation
    steps) is used and announced; the math is the global batch's either way."""
    whole = write_config(tmp_path / "whole.yaml", digits_config(tmp_path / "whole", train={"max_steps": 5}))
    check(run(["run", whole]))
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train={"micro_batch_size": 24,
                                                                                   "max_steps": 5}))
    proc = check(run(["run", cfg]))
    assert "global batch 64 = micro 16 x 1 ranks x 4 accumulation (train.micro_batch_size=24" in proc.stderr
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_a_global_batch_no_micro_batch_can_serve_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", train={"global_batch_size": 63}))
    proc = run(["run", cfg, "--nproc", 2])
    assert proc.returncode == 2
    assert "train.global_batch_size=63 cannot be split evenly over 2 processes" in proc.stderr
    assert "62 or 64" in proc.stderr


@pytest.mark.slow
def test_parity_with_a_hand_written_loop(tmp_path):
    """300 steps of launcher and of the plain loop, same seed and data order: equal weights."""
    steps, batch, lr = 300, 32, 0.05
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", recipe={"name": "recipes.digits", "hidden": 32},
        train={"global_batch_size": batch, "micro_batch_size": batch, "max_steps": steps, "log_every_steps": 100},
        optim={"name": "sgd", "lr": lr, "momentum": 0.9}))
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    trainer.fit()

    from recipes import digits

    recipe_cfg = digits.Config(hidden=32)
    train_set, _ = digits.data(recipe_cfg)
    torch.manual_seed(0)
    model = digits.model(recipe_cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, fused=True)  # optim.impl=auto picks fused
    x_all, y_all = train_set.tensors
    step, epoch, per_epoch = 0, 0, len(train_set) // batch
    while step < steps:
        order = epoch_permutation(len(train_set), seed=0, epoch=epoch, shuffle=True)
        for k in range(min(per_epoch, steps - step)):
            idx = order[k * batch:(k + 1) * batch]
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        epoch += 1

    launched = dict(trainer.strategy.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(launched[name], p), name


def test_progress_bar_shows_loss_rate_and_eta(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", log={"progress": "bar"}))
    proc = check(run(["run", cfg]))
    last = proc.stderr.replace("\r", "\n").strip().splitlines()
    bar = next(line for line in reversed(last) if "20/20" in line)
    assert "loss=" in bar and "samples_s=" in bar and "<" in bar  # tqdm's [elapsed<remaining]
    assert not any(line.startswith("step=") for line in proc.stdout.splitlines())  # the bar replaces the lines


@pytest.mark.parametrize("recipe, forwards_per_batch", [("recipes.digits", 1), ("toy_recipes.tokens", 2)])
def test_validation_runs_the_model_once_per_batch_with_eval_step(tmp_path, recipe, forwards_per_batch):
    """A recipe with eval_step gets loss and metrics from one forward; one with loss and metrics
    (the older contract) still validates, at two forwards a batch."""
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe={"name": recipe},
                                                          train={"max_steps": 1, "eval_batch_size": 50}))
    trainer = Trainer(load_config(cfg), DistEnv("single"), torch.device("cpu"))
    calls = []
    trainer.strategy.eval_model.register_forward_hook(lambda *args: calls.append(1))
    trainer.evaluate(0)
    val = metrics(tmp_path / "run")[1][0]
    batches = math.ceil(len(trainer.evaluator.val_set) / 50)
    assert len(calls) == forwards_per_batch * batches
    assert math.isfinite(val["val_loss"]) and "accuracy" in val
