"""A resume never mixes two configs silently, and rerunning a finished run does nothing."""
import pytest

from helpers import check, digits_config, metrics, run, write_config

pytestmark = pytest.mark.slow  # several runs each


def config(tmp_path, **train):
    cfg = digits_config(tmp_path / "run", train={"max_steps": 6, **train}, checkpoint={"every_steps": 3})
    return write_config(tmp_path / "c.yaml", cfg)


def test_changed_math_is_refused_with_a_diff_and_allowed_on_request(tmp_path):
    check(run(["run", config(tmp_path, max_steps=3)]))
    proc = run(["run", config(tmp_path, max_steps=6), "optim.lr=0.01", "recipe.hidden=48"])
    assert proc.returncode == 2
    err = proc.stderr
    assert "optim.lr: 0.003 -> 0.01" in err and "recipe.hidden: 32 -> 48" in err and "train.max_steps" not in err
    assert "checkpoint.resume_changed=allow" in err and "Traceback" not in err
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [1, 2, 3]  # nothing appended
    proc = check(run(["run", config(tmp_path, max_steps=6), "optim.lr=0.01", "checkpoint.resume_changed=allow"]))
    assert "warning: resuming step_000003 with a config that changes the training math" in proc.stderr
    assert "resumed from" in proc.stderr
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [1, 2, 3, 4, 5, 6]


def test_a_longer_run_resumes_with_a_note_and_a_finished_run_does_nothing(tmp_path):
    check(run(["run", config(tmp_path, max_steps=3)]))
    proc = check(run(["run", config(tmp_path, max_steps=6)]))
    assert "note: resuming step_000003 with changed settings: train.max_steps: 3 -> 6" in proc.stderr
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert len(metrics(tmp_path / "run")[1]) == 2  # the end of each of the two runs
    proc = check(run(["run", config(tmp_path, max_steps=6)]))
    assert "finished at step 6: nothing to do" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
