"""Shared test plumbing: run the launcher in a subprocess and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEST_RECIPES = Path(__file__).resolve().parent / "toy_recipes"  # importable as toy_recipes.NAME


def worker_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TEST_RECIPES.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 300,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` (or PREFIX ARGS), output captured. Without a prefix the command runs in a
    child forked from tests/zygote.py, which has torch and launcher imported already: a process of its own
    (pid, environment, working directory, output, exit code) without the start-up. LAUNCHER_TESTS_ZYGOTE=0
    starts a fresh interpreter for every command instead."""
    cmd = (prefix or [sys.executable, "-m", "launcher"]) + [str(a) for a in args]
    env = worker_env(env)
    zygote = None
    if prefix is None and os.environ.get("LAUNCHER_TESTS_ZYGOTE") != "0":
        zygote = Zygote.get()
    if zygote is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return zygote.run(cmd, [str(a) for a in args], cwd, env, timeout)


class Zygote:
    """The tests' fork server (tests/zygote.py), one per test process, started at its first command."""

    _running: "Zygote | None" = None
    _failed = False  # it could not start: every command then starts its own interpreter

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py"))], cwd=ROOT,
                                     env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError(f"tests/zygote.py did not start (exit {self.proc.wait()})")

    @classmethod
    def get(cls) -> "Zygote | None":
        if cls._failed:
            return None
        if cls._running is None or cls._running.proc.poll() is not None:
            try:
                cls._running = cls()
            except RuntimeError as e:
                print(f"{e}: the tests' commands start their own interpreters", file=sys.stderr)
                cls._failed = True
                return None
        return cls._running

    def run(self, cmd: list[str], argv: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zygote_") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv, "env": env, "cwd": str(cwd), "out": str(out), "err": str(err),
                       "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = json.loads(self.proc.stdout.readline())
            stdout, stderr = (p.read_text(errors="replace") if p.exists() else "" for p in (out, err))
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, answer["code"], stdout, stderr)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "val"]


def monitoring(run_dir: Path) -> dict:
    """What checkpoint.best and train.early_stop left: the validations, `best`, the last meta.json's state."""
    ckpts = Path(run_dir) / "checkpoints"
    meta = json.loads((ckpts / (ckpts / "latest").read_text() / "meta.json").read_text())
    return {"val": [[r["step"], r["accuracy"], r["val_loss"]] for r in metrics(run_dir)[1]],
            "best": (ckpts / "best").read_text(), "monitors": meta["monitors"],
            "kept": sorted(p.name for p in ckpts.glob("step_*"))}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)[0]]


def digits_config(run_dir: Path, **sections) -> dict:
    """A small, quick digits config logging every step; sections override whole keys."""
    config = {
        "recipe": {"name": "recipes.digits", "hidden": 32},
        "run_dir": str(run_dir),
        "train": {"global_batch_size": 64, "micro_batch_size": 64, "max_steps": 20, "log_every_steps": 1,
                  "seed": 0},
        "optim": {"name": "adamw", "lr": 3e-3},
    }
    return with_sections(config, sections)


def with_sections(config: dict, sections: dict) -> dict:
    """config with `sections` applied, in place: a mapping merged into the section it names, anything else
    replacing the key."""
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if merge else value
    return config


def outcome(fn):
    """fn() or the exception it raised: a failed launch is reported by every test using it, run once."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - re-raised by reraise()
        return e


def reraise(value):
    if isinstance(value, Exception):
        raise value
    return value


def max_rel(a: list[float], b: list[float]) -> float:
    """The largest relative difference of b from a, element by element (a is the reference)."""
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


# ---------------------------------------------------------------- what a trained strategy holds (in a worker)


def local_numel(strategy) -> dict[str, int]:
    """Elements this rank holds: the parameters (its shards under FSDP, its partition under ZeRO-3)
    and the optimizer state (partitioned under ZeRO 1-3, padded to equal partitions)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    module = strategy.engine.module if getattr(strategy, "engine", None) is not None else strategy.model
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else local(p).numel() for p in module.parameters())
    optim = sum(local(v).numel() for s in strategy.optimizer.state.values()
                for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "optim": optim}


def full_state_dict(strategy) -> dict:
    """Full, unsharded fp32 weights on CPU under the module's own names (a collective)."""
    if getattr(strategy, "engine", None) is not None:
        return deepspeed_full_state_dict(strategy)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def deepspeed_full_state_dict(strategy) -> dict:
    """ZeRO keeps fp32 master weights in its partitions: each trainable parameter is gathered from
    there; parameters outside the optimizer (frozen ones) come from the module, gathered under ZeRO-3."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    entries = strategy.engine.module.state_dict(keep_vars=True)
    gather = strategy.zero_stage == 3 or strategy.precision.name != "fp32"
    full = {}
    for tensor in entries.values():
        if id(tensor) in full or not isinstance(tensor, torch.nn.Parameter):
            continue
        value = safe_get_full_fp32_param(tensor) if gather else None  # collective; same order on every rank
        if value is None:
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 parameter outside the optimizer
                with deepspeed.zero.GatheredParameters([tensor]):
                    value = tensor.detach().clone()
            else:  # ZeRO 0-2: every rank holds the full parameter
                value = tensor.detach()
        full[id(tensor)] = value
    out = {}
    for name, tensor in entries.items():
        value = full.get(id(tensor), tensor.detach() if torch.is_tensor(tensor) else tensor)
        if torch.is_tensor(value):
            value = (value.float() if value.is_floating_point() else value).cpu().clone()
        out[name] = value
    return out


# ---------------------------------------------------------------- ranks of a test's own worker script


def free_port() -> int:
    """A loopback port free now, below the ephemeral range (32768 and up on Linux): there the system
    may hand the port to any process's outgoing connection (a test's S3 client, a rendezvous) before
    the job that was given it listens on it."""
    import random
    import socket

    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def run_ranks(script: Path, args: list, nproc: int, log_dir: Path, timeout: float = 600) -> tuple[list, str]:
    """`python SCRIPT ARGS` as ranks 0..nproc-1 of one job on the loopback (RANK, WORLD_SIZE, MASTER_*:
    what the script's launcher.env.detect() reads), without a GPU. Returns (exit codes, the tails of each
    rank's output) once all have ended, or killed them after `timeout` seconds."""
    port, logs, procs = free_port(), [], []
    for rank in range(nproc):
        env = worker_env({"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                          "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                          "CUDA_VISIBLE_DEVICES": ""})
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{(log_dir / f'rank{r}.log').read_text()[-4000:]}"
                      for r, p in enumerate(procs))
    return [p.returncode for p in procs], tails


# ---------------------------------------------------------------- runs several tests compare with


class References:
    """Runs that several tests only read (their losses, checkpoints, exported weights), each trained once
    per test session on first use: the key is the config without its run_dir, and the command's extra
    arguments (--nproc 2). A test that changes a run's files trains its own."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}

    def get(self, config: dict, extra: list = ()) -> Path:
        key = json.dumps({k: v for k, v in config.items() if k != "run_dir"}, sort_keys=True) + repr(list(extra))
        if key not in self.done:
            name = f"ref{len(self.done)}"
            cfg = write_config(self.root / f"{name}.yaml", {**config, "run_dir": str(self.root / name)})
            check(run(["run", cfg, *extra]))
            self.done[key] = self.root / name
        return self.done[key]
