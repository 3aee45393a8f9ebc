"""train.profile: a torch.profiler trace of the chosen steps in RUN_DIR/profile.

The unit tests drive launcher.profiling.StepProfiler around tiny matmul "steps"; the
end-to-end test runs `launcher run` with the switch and reads the trace it wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import check, run
from launcher.config import ConfigError, load_config
from launcher.profiling import NoProfiler, StepProfiler

CPU = torch.device("cpu")


def traces(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "profile").glob("*.pt.trace.json"))


def step_spans(trace: Path) -> list[str]:
    """torch's `ProfilerStep#N` spans in a Chrome trace, each as often as it occurs, by N."""
    events = json.loads(trace.read_text())["traceEvents"]
    names = [e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    return sorted(names, key=lambda name: int(name.split("#")[1]))


def train(profiler, steps: int, first: int = 1) -> None:
    """`steps` tiny optimizer steps numbered from `first`, reported as the trainer reports them."""
    w = torch.randn(32, 32, requires_grad=True)
    for step in range(first, first + steps):
        (w @ w).sum().backward()
        with torch.no_grad():
            w -= 0.01 * w.grad
        w.grad = None
        profiler.after_step(step)


def profiler_for(tmp_path: Path, start_step: int, steps: int, done: int = 0):
    cfg = load_config("configs/digits.yaml", [f"train.profile.start_step={start_step}",
                                               f"train.profile.steps={steps}"])
    return StepProfiler.from_config(cfg.train.profile, tmp_path, CPU, rank=0, step=done)


def test_records_exactly_the_chosen_steps(tmp_path):
    profiler = profiler_for(tmp_path, start_step=2, steps=2)
    train(profiler, 5)
    profiler.close()
    (trace,) = traces(tmp_path)
    assert trace.name == "rank0.steps_2-3.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert step_spans(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    # each step's own work lies inside its span
    mms = [e["ts"] for e in events if e.get("name") == "aten::mm"]
    for span in (e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")):
        assert any(span["ts"] <= t <= span["ts"] + span["dur"] for t in mms), span["name"]


def test_step_one_starts_before_the_first_step(tmp_path):
    profiler = profiler_for(tmp_path, start_step=1, steps=1)
    train(profiler, 3)
    (trace,) = traces(tmp_path)
    assert step_spans(trace) == ["ProfilerStep#1"]


def test_a_run_resumed_inside_the_window_records_the_rest(tmp_path):
    profiler = profiler_for(tmp_path, start_step=2, steps=3, done=2)  # resumed after step 2
    train(profiler, 4, first=3)
    (trace,) = traces(tmp_path)
    assert step_spans(trace) == ["ProfilerStep#3", "ProfilerStep#4"]


def test_a_run_that_ends_inside_the_window_keeps_what_it_recorded(tmp_path):
    profiler = profiler_for(tmp_path, start_step=2, steps=10)
    train(profiler, 3)
    profiler.close()
    profiler.close()  # twice: harmless
    (trace,) = traces(tmp_path)
    assert trace.name == "rank0.steps_2-3.pt.trace.json"
    # the last span holds what ran after step 3 (in a run: the final save and validation)
    assert step_spans(trace) == ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"]


def test_a_window_the_run_never_reaches_writes_nothing(tmp_path):
    profiler = profiler_for(tmp_path, start_step=10, steps=2)
    train(profiler, 3)
    profiler.close()
    assert not (tmp_path / "profile").exists()


def test_off_by_default():
    cfg = load_config("configs/digits.yaml")
    assert cfg.train.profile is None
    assert isinstance(StepProfiler.from_config(cfg.train.profile, Path("unused"), CPU, rank=0), NoProfiler)


@pytest.mark.parametrize("override", ["train.profile.steps=0", "train.profile.start_step=0"])
def test_a_bad_window_is_a_config_error_naming_the_key(override):
    good = {"train.profile.start_step": "train.profile.start_step=1", "train.profile.steps": "train.profile.steps=1"}
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/digits.yaml", [override] + [v for k, v in good.items() if k != key])


def test_launcher_run_writes_the_trace(tmp_path):
    """Needs the trainer to call StepProfiler (after each optimizer step, and close at the end)."""
    run_dir = tmp_path / "run"
    check(run(["run", "configs/digits.yaml", f"run_dir={run_dir}", "train.max_steps=6", "train.profile.start_step=2",
               "train.profile.steps=2"]))
    found = traces(run_dir)
    assert [t.name for t in found] == ["rank0.steps_2-3.pt.trace.json"], found
    assert json.loads(found[0].read_text())["traceEvents"]
    assert step_spans(found[0]) == ["ProfilerStep#2", "ProfilerStep#3"]
