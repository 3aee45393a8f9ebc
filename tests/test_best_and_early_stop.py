"""checkpoint.best and train.early_stop: the monitor's rules, then real runs at 1 and 2 processes,
cut in two by a resume."""
import json

import pytest
from safetensors.torch import load_file

from helpers import check, digits_config, metrics, run, write_config
from launcher.errors import ConfigError
from launcher.monitor import Monitor
from test_checkpoint import by_step


def test_monitor_counts_validations_without_improvement_by_more_than_min_delta():
    stop = Monitor("val_loss", "min", min_delta=0.1, patience=2)
    assert stop.update({"val_loss": 1.0}, 3)  # the first is always the best
    assert not stop.update({"val_loss": 0.95}, 6) and stop.bad == 1  # better, by less than min_delta
    assert stop.update({"val_loss": 0.85}, 9) and stop.bad == 0 and (stop.best, stop.best_step) == (0.85, 9)
    assert not stop.update({"val_loss": float("nan")}, 12) and not stop.exhausted
    assert not stop.update({"val_loss": 2.0}, 15) and stop.exhausted

    resumed = Monitor("val_loss", "min", min_delta=0.1, patience=2)
    resumed.load_state_dict(stop.state_dict())
    assert (resumed.best, resumed.best_step, resumed.bad) == (0.85, 9, 2)
    other = Monitor("accuracy", "max")
    other.load_state_dict(stop.state_dict())  # another value: a fresh start
    assert other.best is None and other.update({"accuracy": 0.5}, 1) and not other.update({"accuracy": 0.5}, 2)
    with pytest.raises(ConfigError, match="acc is not among the validation's values .*accuracy"):
        Monitor("acc", "max").update({"step": 1, "accuracy": 0.5, "val_loss": 1.0}, 1)


def config(tmp_path, name, max_steps):
    """Digits at a constant learning rate, validated every 3 steps: val_loss stops gaining 0.02 a
    validation at step 36 and the run stops at 42; the best accuracy is at step 36."""
    cfg = digits_config(tmp_path / name, train={"max_steps": max_steps, "eval_every_steps": 3,
                                                "early_stop": {"monitor": "val_loss", "patience": 2,
                                                               "min_delta": 0.02}},
                        optim={"lr": 0.03}, schedule={"warmup_steps": 0, "decay": "constant"},
                        checkpoint={"every_steps": 6, "keep_last": 1, "best": {"monitor": "accuracy", "mode": "max"}})
    return write_config(tmp_path / f"{name}-{max_steps}.yaml", cfg)


def steps_kept(run_dir):
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "meta.json").is_file())


@pytest.mark.slow
def test_early_stop_and_best_checkpoint_at_any_world_size_and_across_a_resume(tmp_path):
    one = check(run(["run", config(tmp_path, "one", 60)]))
    val = {r["step"]: r["accuracy"] for r in metrics(tmp_path / "one")[1]}
    best_step = max(val, key=val.get)
    stop_step = max(val)
    assert stop_step < 60 and best_step < stop_step  # it did stop early, after its best
    assert "done (stopped early: val_loss did not improve for 2 validations; best val_loss=" in one.stderr
    assert f"best checkpoint accuracy={val[best_step]:.4g} at step {best_step}" in one.stderr
    assert one.returncode == 0
    # keep_last=1 keeps the last; the best is kept besides it, and `best` names it.
    assert steps_kept(tmp_path / "one") == [best_step, stop_step]
    assert (tmp_path / "one" / "checkpoints" / "best").read_text() == f"step_{best_step:06d}"

    # On 2 processes, cut one validation before the stop, after one without improvement: the rerun
    # counts on from it (and compares with the best before the cut), so it stops where the
    # uninterrupted run on 1 process did, with its losses.
    cut = stop_step - 3
    assert best_step < cut
    check(run(["run", config(tmp_path, "cut", cut), "--nproc", 2]))
    assert steps_kept(tmp_path / "cut") == [best_step, cut]
    resumed = check(run(["run", config(tmp_path, "cut", 60), "--nproc", 2]))
    assert "resumed from" in resumed.stderr and "stopped early" in resumed.stderr
    assert by_step(tmp_path / "cut") == pytest.approx(by_step(tmp_path / "one"), rel=1e-5)
    assert steps_kept(tmp_path / "cut") == [best_step, stop_step]
    assert (tmp_path / "cut" / "checkpoints" / "best").read_text() == f"step_{best_step:06d}"
    again = check(run(["run", config(tmp_path, "cut", 60), "--nproc", 2]))
    assert f"stopped early at step {stop_step}" in again.stderr and "nothing to do" in again.stderr
    # Killed after the early stop's save, before the run was marked finished: the rerun finishes it
    # without training a step.
    last = tmp_path / "cut" / "checkpoints" / f"step_{stop_step:06d}" / "meta.json"
    last.write_text(json.dumps({k: v for k, v in json.loads(last.read_text()).items() if k != "finished"}))
    rows = len(metrics(tmp_path / "cut")[0])
    finished = check(run(["run", config(tmp_path, "cut", 60), "--nproc", 2]))
    assert "done (stopped early: val_loss did not improve for 2 validations" in finished.stderr
    meta = json.loads(last.read_text())
    assert len(metrics(tmp_path / "cut")[0]) == rows and meta["finished"]
    assert meta["val"]["accuracy"] == metrics(tmp_path / "cut")[1][-1]["accuracy"]  # its validation kept

    listing = check(run(["ls", tmp_path / "cut"])).stdout
    lines = {line.split()[0]: line for line in listing.splitlines() if line.startswith("  step_")}
    assert lines.keys() == {f"step_{best_step:06d}", f"step_{stop_step:06d}"}
    assert lines[f"step_{best_step:06d}"].endswith("best") and f"accuracy={val[best_step]:.4g}" in listing
    assert lines[f"step_{stop_step:06d}"].endswith("latest")

    for args, name in ((["--best"], "best"), (["--step", best_step], "at_best"), ([], "last")):
        check(run(["export", tmp_path / "cut", tmp_path / f"{name}.safetensors", *args]))
    best, at_best, last = (load_file(tmp_path / f"{n}.safetensors") for n in ("best", "at_best", "last"))
    assert all((best[k] == at_best[k]).all() for k in best)
    assert any((best[k] != last[k]).any() for k in best)


def test_a_resume_names_the_best_of_its_own_timeline(tmp_path):
    """Resumed from an earlier checkpoint, `best` must not name a later one of the abandoned timeline."""
    from launcher.checkpoint import Checkpointer
    from launcher.config import validate

    cfg = validate({"recipe": {"name": "recipes.digits"}, "run_dir": str(tmp_path)}, "test").checkpoint
    ckpts = Checkpointer(tmp_path, cfg, rank=0)
    for step in (10, 20, 30):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:06d}" / "meta.json").write_text("{}")
    (tmp_path / "checkpoints" / "best").write_text("step_000030")
    ckpts.name_best(10)
    assert (tmp_path / "checkpoints" / "best").read_text() == "step_000010"
    ckpts.name_best(40)  # gone (never saved, or set aside): no best rather than a wrong one
    assert not (tmp_path / "checkpoints" / "best").exists()
    Checkpointer(tmp_path, cfg, rank=1).name_best(20)  # rank 0 writes it
    assert not (tmp_path / "checkpoints" / "best").exists()
