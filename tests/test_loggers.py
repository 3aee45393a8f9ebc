"""W&B, TensorBoard and the console, end to end: what W&B and TensorBoard wrote is read back from
their own files and compared with RUN_DIR/metrics.jsonl, key for key and step for step."""
import json
import signal
import socket
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, check, digits_config, metrics, run, worker_env, write_config
from launcher.config import validate
from launcher.errors import Stopped, TrainingError
from launcher.loggers import WANDB_STATE, ConsoleLogger, Loggers
from test_checkpoint import wait_for_step

# ---------------------------------------------------------------- reading what the loggers wrote

BLOCK = 32 * 1024  # a .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed chunks


def wandb_records(path: Path):
    """The protobuf Records of one .wandb file (W&B 0.31 ships no Python reader for it).

    After the 7-byte file header (":W&B", magic, version), each chunk has a 7-byte header:
    CRC-32 of its type byte and data, data length, type (1 full, 2 first, 3 middle, 4 last).
    A block's tail too short for a header is padding. Reading stops at a chunk that does not
    check out: the end of what a killed process wrote.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind not in (1, 2, 3, 4) or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(parts)
            yield record


def wandb_segments(run_dir: Path) -> list[list]:
    """The records of each W&B run dir under RUN_DIR/wandb (one per start of the launcher), oldest first."""
    dirs = sorted(p for p in (run_dir / "wandb").iterdir() if p.is_dir() and not p.is_symlink())
    return [list(wandb_records(next(d.glob("*.wandb")))) for d in dirs]


def kind(record) -> str:
    return record.WhichOneof("record_type")


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """step -> {key: value} over every segment; fails if any key is logged twice for a step."""
    history: dict[int, dict] = {}
    for records in wandb_segments(run_dir):
        for record in (r for r in records if kind(r) == "history"):
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
                    assert key not in row, f"{key} logged twice at step {record.history.step.num}"
                    row[key] = json.loads(item.value_json)
    return history


def wandb_config(records) -> dict:
    config = {}
    for record in records:
        if kind(record) in ("run", "config"):  # the run record's config, then later updates
            updates = (record.run.config if kind(record) == "run" else record.config).update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    config.pop("_wandb", None)
    return config


def expected(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as W&B and TensorBoard should name it: step -> {"<split>/<key>": value}."""
    train, val = metrics(run_dir)
    return as_logged(train + val)


def as_logged(rows: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in rows:
        split = row.get("split", "train")
        out.setdefault(row["step"], {}).update(
            {f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split") and isinstance(v, (int, float))})
    return out


def tensorboard_scalars(run_dir: Path) -> dict[int, dict]:
    """step -> {tag: value} as TensorBoard shows it (after its purge of what a resume redid)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[int, dict] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            row = out.setdefault(event.step, {})
            assert tag not in row, f"{tag} twice at step {event.step}"
            row[tag] = event.value
    return out


def assert_float32_equal(scalars: dict[int, dict], want: dict[int, dict]) -> None:
    """TensorBoard stores float32."""
    import numpy as np

    assert scalars.keys() == want.keys()
    for step, row in want.items():
        assert scalars[step].keys() == row.keys(), step
        for tag, value in row.items():
            assert scalars[step][tag] == np.float32(value), (step, tag)


def wandb_env(tmp_path: Path, **extra) -> dict:
    """W&B's own files (config, cache, data) in the test's directory, not the home directory."""
    home = tmp_path / "wandb-home"
    return {"WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data"), **extra}


WANDB_OFFLINE = {"wandb": {"project": "launcher-tests", "mode": "offline"}, "tensorboard": True, "progress": "lines"}

# ---------------------------------------------------------------- the console


def test_console_lines_show_the_step_metrics_and_an_eta(capsys):
    console = ConsoleLogger(total_steps=100, start_step=20, mode="lines")
    console.started, console.clock = 0.0, lambda: 5.0  # 10 steps in 5 s since it started: 2 steps/s
    console.log({"step": 30, "epoch": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 0.25, "samples_per_s": 640.0,
                 "time": 5.0, "step_time": 0.5, "data_wait": 0.125, "mem_rss_gib": 1.5, "alloc_retries": 0})
    line = capsys.readouterr().out.strip()
    assert line == ("step=30 epoch=1 loss=0.5 lr=0.001 grad_norm=0.25 samples_per_s=640 step_time=0.5 "
                    "data_wait=0.125 mem_rss_gib=1.5 eta=0:00:35")  # 70 steps left at 2 steps/s
    console.clock = lambda: 7200.0
    console.log({"step": 40, "loss": 0.4, "tokens_per_s": 1e6, "mfu": 0.41, "mem_max_allocated_gib": 20.5,
                 "mem_max_reserved_gib": 22.0, "alloc_retries": 3})
    line = capsys.readouterr().out.strip()
    assert line == ("step=40 loss=0.4 tokens_per_s=1e+06 mfu=0.41 mem_max_allocated_gib=20.5 mem_max_reserved_gib=22 "
                    "alloc_retries=3 eta=6:00:00")  # 20 steps in 2 h, 60 left
    console.log({"step": 40, "epoch": 1, "split": "val", "val_loss": 0.3, "time": 1.0})
    assert capsys.readouterr().out.strip() == "[val] step=40 epoch=1 val_loss=0.3"


# ---------------------------------------------------------------- W&B in process: start, failures, the end


class FakeRun:
    id = "fake0001"

    def __init__(self, fail_from_call: int = 0):
        self.fail_from_call, self.calls, self.logged = fail_from_call, 0, []
        self.finished, self.preempting = None, False

    def log(self, values, step):
        self.calls += 1
        if self.fail_from_call and self.calls >= self.fail_from_call:
            raise RuntimeError("the W&B service went away")
        self.logged.append((step, values))

    def mark_preempting(self):
        self.preempting = True

    def finish(self, exit_code=0):
        self.finished = exit_code


def fake_wandb(monkeypatch, init) -> None:
    module = types.ModuleType("wandb")
    module.init, module.Settings = init, dict
    monkeypatch.setitem(sys.modules, "wandb", module)


def loggers_for(tmp_path: Path, resumed=False, start_step=0, **wandb) -> Loggers:
    log = {"wandb": {"project": "p", **wandb}, "progress": "lines"}
    cfg = validate(digits_config(tmp_path / "run", log=log), "test")
    (tmp_path / "run").mkdir(exist_ok=True)
    return Loggers.for_rank(True, cfg, tmp_path / "run", total_steps=10, start_step=start_step, resumed=resumed)


def row(step: int) -> dict:
    return {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 0.1, "samples_per_s": 100.0, "time": float(step)}


def test_wandb_that_cannot_start_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def init(**kwargs):
        raise ConnectionError("no route to api.wandb.ai")

    fake_wandb(monkeypatch, init)
    loggers = loggers_for(tmp_path, mode="online")
    for step in (1, 2):
        loggers.log(row(step))
    loggers.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "W&B could not start (no route to api.wandb.ai): training goes on without it" in err
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [1, 2]
    assert not (tmp_path / "run" / WANDB_STATE).exists()


def test_wandb_that_cannot_start_ends_the_run_when_fatal(tmp_path, monkeypatch):
    def init(**kwargs):
        raise ConnectionError("no route to api.wandb.ai")

    fake_wandb(monkeypatch, init)
    with pytest.raises(TrainingError, match=r"W&B could not start \(no route to api.wandb.ai\)\. The run stops "
                                            r"because log.wandb.fatal=true"):
        loggers_for(tmp_path, mode="online", fatal=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # W&B starts first: nothing else was opened


def test_a_wandb_error_during_training_is_one_warning_and_the_other_loggers_go_on(tmp_path, monkeypatch, capsys):
    fake = FakeRun(fail_from_call=2)
    fake_wandb(monkeypatch, lambda **kwargs: fake)
    loggers = loggers_for(tmp_path)
    for step in (1, 2, 3, 4):
        loggers.log(row(step))
    loggers.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "W&B failed at step 2 (the W&B service went away)" in err
    assert [step for step, _ in fake.logged] == [1] and fake.calls == 2  # off after its first failure
    assert fake.finished is None  # a broken run is not waited for
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / WANDB_STATE).read_text()) == {"id": "fake0001", "sent": {"train": 1}}


@pytest.mark.parametrize("ending, exit_code", [(None, 0), (RuntimeError("boom"), 1), (Stopped(), 3)])
def test_the_wandb_run_ends_as_the_training_did(tmp_path, monkeypatch, ending, exit_code):
    fake = FakeRun()
    fake_wandb(monkeypatch, lambda **kwargs: fake)
    loggers = loggers_for(tmp_path)
    loggers.log(row(1))
    try:
        try:
            if ending is not None:
                raise ending
        finally:  # as the trainer closes its loggers: saying how the training ended
            loggers.close(ending)
    except (RuntimeError, Stopped):
        pass
    assert fake.finished == exit_code
    assert fake.preempting == isinstance(ending, Stopped)  # W&B's "preempted": the same command resumes it


def test_wandb_keys_are_split_slash_key_and_a_resume_skips_the_steps_it_has(tmp_path, monkeypatch):
    calls = []
    fake = FakeRun()
    fake_wandb(monkeypatch, lambda **kwargs: calls.append(kwargs) or fake)
    loggers = loggers_for(tmp_path)
    for step in (1, 2, 3):
        loggers.log(row(step))
    loggers.log({"step": 3, "epoch": 0, "split": "val", "val_loss": 0.5, "accuracy": 0.75, "time": 9.0})
    loggers.close()
    assert "id" not in calls[0] and "resume" not in calls[0]
    assert fake.logged[2] == (3, {"train/epoch": 0, "train/loss": 1 / 3, "train/lr": 0.1, "train/samples_per_s": 100.0,
                                  "train/time": 3.0})
    assert fake.logged[3] == (3, {"val/epoch": 0, "val/val_loss": 0.5, "val/accuracy": 0.75, "val/time": 9.0})
    # Resumed from a checkpoint at step 1: steps 2 and 3 are redone, but W&B has them.
    fake.logged.clear()
    loggers = loggers_for(tmp_path, resumed=True, start_step=1)
    assert calls[1]["id"] == "fake0001" and calls[1]["resume"] == "allow"
    for step in (2, 3, 4):
        loggers.log(row(step))
    loggers.log({"step": 4, "epoch": 0, "split": "val", "val_loss": 0.4, "time": 9.0})
    loggers.close()
    assert [(step, next(iter(values))) for step, values in fake.logged] == [(4, "train/epoch"), (4, "val/epoch")]
    state = json.loads((tmp_path / "run" / WANDB_STATE).read_text())
    assert state == {"id": "fake0001", "sent": {"train": 4, "val": 4}}


def test_disabled_wandb_is_not_even_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would raise
    loggers = loggers_for(tmp_path, mode="disabled")
    loggers.log(row(1))
    loggers.close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow  # an end-to-end run: the full suite
def test_tensorboard_has_the_metrics_and_disabled_wandb_writes_nothing(tmp_path):
    log = {**WANDB_OFFLINE, "wandb": {"project": "launcher-tests", "mode": "disabled"}}
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", log=log, train={"eval_every_steps": 10}))
    check(run(["run", cfg], env=wandb_env(tmp_path)))
    run_dir = tmp_path / "run"
    assert not (run_dir / "wandb").exists() and not (run_dir / WANDB_STATE).exists()
    assert not (tmp_path / "wandb-home").exists()
    want = expected(run_dir)
    assert sorted(want) == list(range(1, 21)) and {"val/val_loss", "val/accuracy", "train/loss"} <= set(want[20])
    assert_float32_equal(tensorboard_scalars(run_dir), want)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # online against a closed port: seconds of wandb retries
@pytest.mark.parametrize("fatal", [False, True])
def test_wandb_that_cannot_reach_its_server(tmp_path, fatal):
    """Online, with the server's port closed: one warning and a complete run, or (fatal) exit 1."""
    log = {"wandb": {"project": "launcher-tests", "mode": "online", "fatal": fatal}, "progress": "lines"}
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", log=log))
    env = wandb_env(tmp_path, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", WANDB_API_KEY="0" * 40,
                    WANDB_INIT_TIMEOUT="1", WANDB_SILENT="true")  # silent: no user name lookup, which waits 10 s
    proc = run(["run", cfg], env=env, timeout=120)
    if fatal:
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("error: W&B could not start (") == 1, proc.stderr
        assert "log.wandb.fatal=true" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    else:
        check(proc)
        assert proc.stderr.count("warning: W&B could not start (") == 1, proc.stderr
        assert "training goes on without it" in proc.stderr
        assert [r["step"] for r in metrics(tmp_path / "run")[0]] == list(range(1, 21))
    assert not (tmp_path / "run" / WANDB_STATE).exists()


@pytest.mark.slow
def test_wandb_offline_on_two_processes_logs_what_metrics_jsonl_has_from_rank_0(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", log=WANDB_OFFLINE,
                                                          train={"eval_every_steps": 10}))
    check(run(["run", cfg, "--nproc", 2, "strategy=ddp"], env=wandb_env(tmp_path)))
    run_dir = tmp_path / "run"
    [records] = wandb_segments(run_dir)  # one W&B run: rank 0's
    [run_record] = [r.run for r in records if kind(r) == "run"]
    assert run_record.project == "launcher-tests"
    state = json.loads((run_dir / WANDB_STATE).read_text())
    assert state == {"id": run_record.run_id, "sent": {"train": 20, "val": 20}}
    want = expected(run_dir)
    assert {"train/loss", "train/lr", "train/grad_norm", "val/val_loss", "val/accuracy"} <= set(want[20])
    assert {"val/val_loss", "val/accuracy"} <= set(want[10])
    assert wandb_history(run_dir) == want  # every step, key and value, exactly
    assert wandb_config(records) == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [r.exit.exit_code for r in records if kind(r) == "exit"] == [0]
    assert_float32_equal(tensorboard_scalars(run_dir), want)  # TensorBoard: the same names and values


SLOW = {"name": "toy_recipes.slow", "hidden": 32, "delay_s": 0.05}


@pytest.mark.slow
def test_a_stopped_run_continues_the_same_wandb_run(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe=SLOW, log=WANDB_OFFLINE,
                                                          train={"max_steps": 40}))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(cfg)], cwd=ROOT, text=True,
                            env=worker_env(wandb_env(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(run_dir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 5 <= stopped_at < 40
    first = json.loads((run_dir / WANDB_STATE).read_text())
    assert first["sent"] == {"train": stopped_at}
    check(run(["run", cfg], env=wandb_env(tmp_path)))
    segments = wandb_segments(run_dir)
    assert len(segments) == 2
    runs = [next(r.run for r in records if kind(r) == "run") for records in segments]
    assert [r.run_id for r in runs] == [first["id"]] * 2 and runs[1].resume
    assert [[r.exit.exit_code for r in records if kind(r) == "exit"] for records in segments] == [[3], [0]]
    assert any(kind(r) == "preempting" for r in segments[0])
    assert wandb_history(run_dir) == expected(run_dir)  # steps 1-40 once each
    assert json.loads((run_dir / WANDB_STATE).read_text()) == {"id": first["id"], "sent": {"train": 40, "val": 40}}
    assert_float32_equal(tensorboard_scalars(run_dir), expected(run_dir))


@pytest.mark.slow
def test_a_run_resumed_after_a_crash_logs_each_step_once(tmp_path):
    """The crash comes at step 16, after the checkpoint of step 10: steps 11-15 are trained and
    logged twice. W&B keeps the values it got first, TensorBoard (and metrics.jsonl) the redone ones."""
    recipe = {"name": "toy_recipes.failing", "hidden": 32, "fail_rank": 0, "fail_at": 16}  # 1 micro-step a step
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe=recipe, log=WANDB_OFFLINE,
                                                          checkpoint={"every_steps": 10}))
    run_dir = tmp_path / "run"
    proc = run(["run", cfg], env=wandb_env(tmp_path))
    assert proc.returncode == 1 and "deliberate failure" in proc.stderr, proc.stderr
    crashed = as_logged(metrics(run_dir)[0])
    assert sorted(crashed) == list(range(1, 16))
    first = json.loads((run_dir / WANDB_STATE).read_text())
    assert first["sent"] == {"train": 15}
    proc = check(run(["run", cfg, "recipe.fail_at=0", "checkpoint.resume_changed=allow"], env=wandb_env(tmp_path)))
    assert "resumed from" in proc.stderr and "at step 10" in proc.stderr
    want = expected(run_dir)
    assert sorted(want) == list(range(1, 21))
    history = wandb_history(run_dir)  # fails on a step logged twice
    segments = wandb_segments(run_dir)
    assert {next(r.run.run_id for r in records if kind(r) == "run") for records in segments} == {first["id"]}
    assert [[r.exit.exit_code for r in records if kind(r) == "exit"] for records in segments] == [[1], [0]]
    assert history.keys() == want.keys()
    for step in want:
        assert history[step] == (crashed[step] if 10 < step < 16 else want[step]), step
    for step in range(11, 16):  # resuming is exact: the kept rows differ from the redone ones in timings only
        assert crashed[step]["train/time"] != want[step]["train/time"]
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            assert crashed[step][key] == want[step][key], (step, key)
    assert_float32_equal(tensorboard_scalars(run_dir), want)
