"""LightningModules run the way Lightning's Trainer runs them (tests/toy_recipes/lightning_full.py
is a real LightningModule that uses what the Trainer gives a module)."""
import json

import pytest

from helpers import check, digits_config, metrics, run, write_config

pytest.importorskip("lightning")
pytestmark = pytest.mark.slow  # Lightning's import and several runs: the full suite


def settings(tmp_path, name, optimizers="one", checkpoint=None, **train) -> dict:
    return digits_config(tmp_path / name, recipe={"name": "toy_recipes.lightning_full", "optimizers": optimizers,
                                                  "record_to": str(tmp_path / f"{name}.json")},
                         train={"global_batch_size": 64, "micro_batch_size": 32, "max_steps": 6, "log_every_steps": 1,
                                "eval_every_steps": 3, **train},
                         checkpoint=checkpoint or {},
                         optim={"name": "adamw", "lr": 1.0})  # not used: configure_optimizers() is


def config(tmp_path, name, optimizers="one", checkpoint=None, **train):
    return write_config(tmp_path / f"{name}.yaml", settings(tmp_path, name, optimizers, checkpoint, **train))


@pytest.mark.parametrize("form, lrs", [
    ("one", [0.05] * 6), ("list", [0.05] * 6),
    # StepLR(step_size=2, gamma=0.5): without an interval Lightning steps it once an epoch (22 steps here)
    ("lists", [0.05] * 6), ("dict", [0.05] * 6),
    ("dict_step", [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]),  # "interval": "step"
])
def test_every_configure_optimizers_form_and_its_scheduler(tmp_path, form, lrs):
    proc = check(run(["run", config(tmp_path, "run", form)]))
    assert [r["lr"] for r in metrics(tmp_path / "run")[0]] == pytest.approx(lrs)
    assert "the config's optim: section is not used: configure_optimizers() takes its place" in proc.stderr


def test_an_epoch_interval_scheduler_steps_at_epoch_ends(tmp_path):
    # 1437 samples / 64 = 22 steps an epoch; StepLR(step_size=2) stepped once an epoch halves the
    # rate after the second epoch, at step 44, and not before (stepped every step, it would at step 2).
    check(run(["run", config(tmp_path, "run", "dict_epoch", max_steps=45, log_every_steps=1, eval_every_steps=None)]))
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "run")[0]}
    assert lrs[44] == pytest.approx(0.05) and lrs[45] == pytest.approx(0.025)


@pytest.mark.parametrize("form, words", [("two", "2 optimizers"), ("manual", "manual optimization"),
                                         ("trainer_attr", "self.trainer.callback_metrics")])
def test_what_launcher_does_not_do_is_refused_before_training(tmp_path, form, words):
    proc = run(["run", config(tmp_path, "run", form), "--nproc", 2])
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "run").exists()  # no worker started


def test_hooks_trainer_and_logged_values(tmp_path):
    check(run(["run", config(tmp_path, "run", "dict_step", max_steps=24, checkpoint={"every_steps": 10})]))
    seen = json.loads((tmp_path / "run.json").read_text())
    calls = seen["calls"]
    micro_batch = ["on_train_batch_start", "on_before_backward", "on_after_backward", "on_train_batch_end"]
    order = ["setup", "configure_model", "on_fit_start", "on_train_start", "on_train_epoch_start",
             *micro_batch, *micro_batch, "on_before_optimizer_step", "on_before_zero_grad"]  # 2 micro-batches a step
    assert calls[:len(order)] == order
    for hook in ("on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
                 "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end",
                 "on_train_epoch_end", "on_save_checkpoint", "on_train_end", "on_fit_end"):
        assert hook in calls, hook
    assert calls.index("on_train_end") < calls.index("on_fit_end")
    # (global_step, current_epoch, batch_idx) as training_step saw them: 2 micro-batches a step, 22 steps an epoch
    assert seen["seen"][:4] == [[0, 0, 0], [0, 0, 1], [1, 0, 2], [1, 0, 3]]
    assert seen["seen"][44] == [22, 1, 0]
    assert (seen["world_size"], seen["max_steps"], seen["estimated_stepping_batches"]) == (1, 24, 24)
    train, val = metrics(tmp_path / "run")
    assert all("train_loss_step" in r for r in train)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train_epoch"]
    assert [r["step"] for r in epochs] == [22, 24] and all("train_loss_epoch" in r and "seen_max" in r for r in epochs)
    # What validation_step logged (reduced over the whole set), not training_step rerun on it.
    assert {"val_loss", "val_acc", "val_n_sum", "epoch_end_marker"} <= set(val[-1])
    assert val[-1]["val_n_sum"] == 359  # every validation sample counted once
    assert "train_loss_step=" in run(["run", config(tmp_path, "again", "one", max_steps=2)]).stdout  # prog_bar


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_under_every_strategy_the_numbers_equal_one_process(tmp_path, references, strategy):
    """Training losses, the schedule and every validation value (reduced exactly over the ranks)
    equal one process's, and a resume continues the scheduler; only float reduction order differs."""
    one_dir = references.get(settings(references.root, "one", "dict_step"))
    extra = ["strategy=deepspeed", "deepspeed.zero_stage=3"] if strategy == "zero3" else [f"strategy={strategy}"]
    check(run(["run", config(tmp_path, "two", "dict_step", max_steps=3, checkpoint={"every_steps": 3}), "--nproc", 2,
               *extra]))
    check(run(["run", config(tmp_path, "two", "dict_step"), "--nproc", 2, *extra]))  # resumed at step 3, mid-schedule
    one, two = metrics(one_dir), metrics(tmp_path / "two")
    assert [r["loss"] for r in two[0]] == pytest.approx([r["loss"] for r in one[0]], rel=1e-5)
    assert [r["lr"] for r in two[0]] == pytest.approx([r["lr"] for r in one[0]])
    for a, b in zip(one[1], two[1]):
        for key in ("val_loss", "val_acc", "val_n_sum"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.parametrize("strategy", [{"strategy": "single"}, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}],
                         ids=["single", "zero2"])
def test_hooks_before_the_step_see_the_weights_before_the_update(tmp_path, strategy):
    """Lightning's order under every strategy: on_before_optimizer_step and on_before_zero_grad come
    before the update. Under ZeRO the norm and the clipping happen inside DeepSpeed's step, and still
    nothing changes the weights before step()."""
    if strategy["strategy"] == "deepspeed":
        pytest.importorskip("deepspeed")
    record = tmp_path / "hooks.jsonl"
    cfg = digits_config(tmp_path / "run", recipe={"name": "toy_recipes.hook_order", "record_to": str(record)},
                        train={"max_steps": 3, "grad_clip": 1.0, "log_every_steps": 1}, **strategy)
    check(run(["run", write_config(tmp_path / "c.yaml", cfg)]))
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    names = [c["hook"] for c in calls]
    assert names == ["on_train_batch_start", "on_before_optimizer_step", "on_before_zero_grad"] * 3
    for k in range(3):
        start, before_step, before_zero = (c["weights"] for c in calls[3 * k : 3 * k + 3])
        assert before_step == start and before_zero == start  # nothing updated before step()
        if k < 2:
            assert calls[3 * k + 3]["weights"] != start  # the update did happen, after the hooks
