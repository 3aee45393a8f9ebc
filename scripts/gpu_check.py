"""Every CUDA path of launcher, measured on one GPU in one short lease.

    python scripts/gpu_check.py [--out FILE.json] [--smoke] [--only NAME,...] [--tmp DIR] [--budget-s S]

Each check prints one line when it ends, `NAME: ok | failed | skipped (why)` and its figures,
and FILE.json (default gpu_check.json) holds every result; it is rewritten after each check,
so a run cut short keeps what it measured. A check's failure never stops the others. The
exit code is 1 when a check failed, else 0.

The checks, in the order they run:

  bf16            (a) GPT in bf16 through launcher, tokens/s and MFU, beside a hand-written loop
                      on the same model, data, order and optimizer in this process; same losses
  compile         (b) the same with train.compile (each block, as launcher compiles them)
  fp16            (c) fp16 with torch's gradient scaler
  activation_ckpt (e) train.activation_checkpointing: peak memory and step time against without
  plan_memory     (g) `launcher plan`'s per-rank estimate against what CUDA allocated
  async_ckpt      (f) checkpoint.async (CUDA staging): blocking time against a sync save, and a
                      resume from the async checkpoint that gives the same losses
  export          (j) `launcher export` of a run, loaded strictly into a fresh model
  ddp, fsdp       (d) strategy=ddp and strategy=fsdp over NCCL on one rank (`launcher run --nproc 1`)
  fsdp_offload    (h) fused AdamW with fsdp.cpu_offload
  zero2           (i) DeepSpeed ZeRO-2, where deepspeed can be imported
  sync_debug      (k) torch.cuda.set_sync_debug_mode("warn") over the steps of single, ddp, fsdp (fused AdamW),
                      fsdp with cpu_offload and ZeRO-2, in this process: a step that logs nothing may not
                      synchronise, except where the strategy must read its flag (offload: one copy; ZeRO)
  offload_nan     (l) fsdp.cpu_offload with fused AdamW and a NaN loss at one step: that step is skipped
                      exactly (weights and optimizer state as before it) and the run goes on
  setup_memory    (m) the set-up peak CUDA memory of the 350M model under fsdp against `launcher plan`
  float8          (n) precision=float8 (torchao) against bf16 on the 350M model: step time, MFU and the loss
                      after the same steps (within 3%); where torchao can be imported
  tp_mesh         (o) tensor parallelism's code on this device: recipes.gpt split by its TP plan (with
                      sequence parallelism) over a TP mesh of one rank gives the unsplit model's loss
                      and gradients

Figures come from what launcher writes (RUN_DIR/metrics.jsonl rows: loss, tokens_per_s, mfu,
step_time, mem_max_allocated_gib) or are measured around a call. A row's rates cover the
steps since the previous row; the first row (start-up, first kernels) is left out of them.

--smoke runs the same code on the CPU at tiny sizes in about a minute (tests/test_gpu_check.py
runs it): what needs CUDA (NCCL, MFU, CUDA memory, background staging) is skipped or says so,
ddp and fsdp run over gloo, and torch.compile uses the aot_eager backend (inductor's C++ build
alone takes ~40 s on 2 cores).

On the GPU machine (torch there, but no pydantic or deepspeed and no network), with the
wheels from scripts/gpu_wheels.sh carried in .whl/:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 scripts/gpu_check.py --out gpu_check.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 0


# ---------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Size:
    model: dict  # recipes.gpt's Config fields
    batch: int  # sequences per optimizer step
    steps: int  # optimizer steps in a run
    log_every: int  # a metrics row every N steps
    lr: float


# Byte-level text (the Python standard library's sources) as uint16 token ids, so that the
# embedding and head can have GPT-2's vocabulary (padded to a multiple of 64) while the loss
# still falls within a few steps.
GPT_350M = dict(n_layer=24, n_head=16, d_model=1024, seq_len=1024, vocab_size=50304)  # 354M parameters
GPT_124M = dict(n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab_size=50304)  # 124M
TINY = dict(n_layer=2, n_head=2, d_model=32, seq_len=32, vocab_size=512)  # 27k
GPT_SMALL = dict(n_layer=4, n_head=4, d_model=256, seq_len=256, vocab_size=50304)  # 16M: behaviour, not speed

# One row a check. The GPU rows are sized for about 6 minutes on one H100/H200, most of it
# start-up, compiling and checkpoint writes (a 350M model's checkpoint is 4.2 GB).
SIZES = {
    "gpu": {
        "bf16": Size(GPT_350M, batch=16, steps=40, log_every=10, lr=3e-4),
        "compile": Size(GPT_350M, batch=16, steps=40, log_every=10, lr=3e-4),
        "fp16": Size(GPT_350M, batch=16, steps=20, log_every=10, lr=3e-4),
        "activation_ckpt": Size(GPT_350M, batch=16, steps=20, log_every=10, lr=3e-4),
        "plan_memory": Size(GPT_350M, batch=16, steps=10, log_every=5, lr=3e-4),
        "async_ckpt": Size(GPT_350M, batch=16, steps=7, log_every=1, lr=3e-4),  # saves at 3, 6 and 7
        "export": Size(GPT_124M, batch=16, steps=5, log_every=5, lr=3e-4),
        "ddp": Size(GPT_124M, batch=16, steps=20, log_every=10, lr=3e-4),
        "fsdp": Size(GPT_124M, batch=16, steps=20, log_every=10, lr=3e-4),
        "fsdp_offload": Size(GPT_124M, batch=16, steps=10, log_every=5, lr=3e-4),
        "zero2": Size(GPT_124M, batch=16, steps=20, log_every=10, lr=3e-4),
        "sync_debug": Size(GPT_SMALL, batch=8, steps=8, log_every=4, lr=3e-4),
        "offload_nan": Size(GPT_SMALL, batch=8, steps=6, log_every=1, lr=3e-4),
        "setup_memory": Size(GPT_350M, batch=8, steps=2, log_every=1, lr=3e-4),
        "float8": Size(GPT_350M, batch=16, steps=30, log_every=10, lr=3e-4),
        "tp_mesh": Size(GPT_SMALL, batch=8, steps=1, log_every=1, lr=3e-4),
    },
    "smoke": {  # the same runs at a size the CPU trains in a second or two
        "bf16": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "compile": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "fp16": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "activation_ckpt": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "plan_memory": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "async_ckpt": Size(TINY, batch=8, steps=7, log_every=1, lr=3e-3),
        "export": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "ddp": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "fsdp": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "fsdp_offload": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "zero2": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "sync_debug": Size(TINY, batch=8, steps=8, log_every=4, lr=3e-3),
        "offload_nan": Size(TINY, batch=8, steps=6, log_every=1, lr=3e-3),
        "setup_memory": Size(TINY, batch=8, steps=2, log_every=1, lr=3e-3),
        "float8": Size(TINY, batch=8, steps=6, log_every=2, lr=3e-3),
        "tp_mesh": Size(TINY, batch=8, steps=1, log_every=1, lr=3e-3),
    },
}
BUDGET_S = {"gpu": 450, "smoke": 200}  # no check starts after this; subprocesses stop a minute later
SUBPROCESS_CAP_S = {"gpu": 240, "smoke": 150}  # one `launcher run`, at most
# Launcher and the loop against each other: the same math, so the same losses up to the
# GPU's non-deterministic kernels (attention's backward); on the CPU exactly.
LOSS_TOL = {"gpu": 1e-2, "smoke": 1e-6}


# ---------------------------------------------------------------- results

class Outcome(Exception):
    """A check that ends early, with the figures it has so far."""

    def __init__(self, why: str, figures: dict | None = None):
        super().__init__(why)
        self.figures = figures or {}


class Skip(Outcome):
    pass


class Failed(Outcome):
    pass


def expect(condition: bool, why: str, figures: dict) -> None:
    if not condition:
        raise Failed(why, figures)


@contextlib.contextmanager
def part(what: str, figures: dict):
    """An error inside fails the check naming `what`, keeping the figures measured before it."""
    try:
        yield
    except Outcome:
        raise
    except Exception as e:  # noqa: BLE001 - reported as this check's failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Failed(f"{what}: {type(e).__name__}: {first}", figures) from e


@dataclass
class Result:
    status: str  # ok | failed | skipped
    why: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0
    log_tail: str = ""

    def line(self, name: str) -> str:
        text = f"{name}: {self.status}" + (f" ({self.why})" if self.why else "")
        if self.figures:
            text += "  " + " ".join(f"{k}={show(v)}" for k, v in self.figures.items())
        return f"{text}  [{self.seconds:.0f} s]"


def show(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------- running launcher

class Context:
    """What every check shares: the mode's sizes, the device, a scratch folder and the token file."""

    def __init__(self, smoke: bool, tmp: str | None, budget_s: float):
        self.mode = "smoke" if smoke else "gpu"
        self.smoke = smoke
        self.device = torch.device("cpu") if smoke else torch.device("cuda", 0)
        self.cuda = self.device.type == "cuda"
        self.sizes = SIZES[self.mode]
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.root = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=tmp or default_tmp(smoke)))
        self.tokens = self.root / "tokens.bin"
        write_tokens(self.tokens, max(s.batch * s.steps * (s.model["seq_len"] + 1) for s in self.sizes.values()))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def config(self, name: str, size: Size, overrides: list[str] = ()) -> tuple[Path, Path, list[str]]:
        """(config file, run dir, overrides) for a run called `name`: launcher's GPT recipe on the token file."""
        run_dir = self.root / name
        shutil.rmtree(run_dir, ignore_errors=True)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "recipe": {"name": "recipes.gpt", **size.model, "data_file": str(self.tokens), "token_dtype": "uint16",
                       "val_fraction": 0.0},  # no validation: only training is measured
            "run_dir": str(run_dir),
            "strategy": "single",
            "precision": "bf16",
            "train": {"global_batch_size": size.batch, "max_steps": size.steps, "log_every_steps": size.log_every,
                      "seed": SEED},
            "optim": {"name": "adamw", "lr": size.lr, "weight_decay": 0.1, "betas": [0.9, 0.95], "impl": "fused"},
            "log": {"progress": "lines"},
            "checkpoint": {"resume": "never", "keep_last": 1},
            "dist": {"timeout_s": 900},
        }, sort_keys=False))
        return path, run_dir, list(overrides)

    def fit(self, name: str, size: Size, overrides: list[str] = (), inspect=None, built=None) -> list[dict]:
        """Train in this process through launcher's Trainer; its train rows. built(trainer) runs once it
        is built, before fit(); inspect(trainer) after fit(), before the trainer is released."""
        from launcher.config import load_config
        from launcher.env import DistEnv
        from launcher.trainer import Trainer

        path, run_dir, overrides = self.config(name, size, overrides)
        cfg = load_config(path, overrides)
        self.free()
        log = self.root / f"{name}.log"
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            trainer = Trainer(cfg, DistEnv("single"), self.device)
            try:
                if built is not None:
                    built(trainer)
                trainer.fit()
                if inspect is not None:
                    inspect(trainer)
            except BaseException:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    release(trainer)
                raise
            release(trainer)
            del trainer
            self.free()
        return train_rows(run_dir)

    def launch(self, name: str, size: Size, overrides: list[str]) -> list[dict]:
        """`python -m launcher run CONFIG overrides --nproc 1` (one worker under torch.distributed.run) in a
        subprocess; its train rows."""
        path, run_dir, overrides = self.config(name, size, overrides)
        self.command(name, ["run", str(path), *overrides, "--nproc", "1"])
        return train_rows(run_dir)

    def command(self, name: str, args: list[str]) -> str:
        """`python -m launcher ARGS` in a subprocess, within the time left; raises Failed on a non-zero exit."""
        self.free()
        left = self.start + self.budget_s + 60 - time.perf_counter()
        timeout = max(30.0, min(SUBPROCESS_CAP_S[self.mode], left))
        log = self.root / f"{name}.log"
        with open(log, "a") as out:
            try:
                proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=self.env(),
                                      stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise Failed(f"`launcher {args[0]}` still running after {timeout:.0f} s") from None
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise Failed(f"`launcher {args[0]}` exited {proc.returncode}: {error_line(text)}")
        return text

    def env(self) -> dict:
        """The subprocesses' environment: launcher importable from the repository, no outer launcher's ranks."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if self.smoke:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # the CPU on any machine, one thread a worker
        return env

    def free(self) -> None:
        """Give back what the previous run held, so each run's memory figures are its own."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def cleanup(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)  # checkpoints: gigabytes at GPU sizes


def default_tmp(smoke: bool) -> str | None:
    """On the GPU machine, memory-backed /dev/shm where it has room: a 350M model writes a 4.2 GB
    checkpoint at the end of every run (--tmp puts them elsewhere)."""
    shm = Path("/dev/shm")
    if not smoke and shm.is_dir() and shutil.disk_usage(shm).free > 40 * 1024**3:
        return str(shm)
    return None


def write_tokens(path: Path, count: int) -> None:
    """`count` token ids: the standard library's sources as bytes, repeated if they run short."""
    import numpy as np

    from recipes.gpt import stdlib_corpus

    text = np.frombuffer(stdlib_corpus(count), dtype=np.uint8)
    tokens = np.resize(text, count).astype("<u2")
    tokens.tofile(path)


def release(trainer) -> None:
    """What Trainer.fit leaves open (the strategy's async stager); train() closes it the same way."""
    close = getattr(getattr(trainer, "strategy", None), "close", None)
    if close is not None:
        close()


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "split" not in r]


def error_line(text: str) -> str:
    """The line of a run's output that says what went wrong: launcher's `error:` line or the
    exception's, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [line for line in lines if re.match(r"(error: |\w+(Error|Exception)\b)", line)]
    return (said or lines or ["(no output)"])[-1][:300]


# ---------------------------------------------------------------- figures from rows

def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def rates(rows: list[dict]) -> dict:
    """Throughput over the rows after the first (which holds start-up), and the run's peak memory."""
    timed = rows[1:] or rows
    out = {"tokens_per_s": mean(r.get("tokens_per_s") for r in timed),
           "step_time": mean(r.get("step_time") for r in timed)}
    mfu = mean(r.get("mfu") for r in timed)
    if mfu is not None:
        out["mfu"] = mfu
    peak = max((r["mem_max_allocated_gib"] for r in rows if "mem_max_allocated_gib" in r), default=None)
    if peak is not None:
        out["mem_max_allocated_gib"] = peak
    return out


def trained(rows: list[dict], figures: dict) -> dict:
    """Adds the loss of the first and last row to figures; the run must have logged finite losses that fell."""
    losses = [r["loss"] for r in rows]
    figures.update(loss_first=losses[0], loss_last=losses[-1])
    expect(all(math.isfinite(v) for v in losses), f"non-finite loss in {losses}", figures)
    expect(len(losses) < 2 or losses[-1] < losses[0], f"the loss did not fall: {losses}", figures)
    return figures


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


# ---------------------------------------------------------------- the hand-written loop

def plain_loop(ctx: Context, size: Size, compile: bool = False) -> dict:
    """The model, data, order, optimizer and precision of launcher's run, in a loop written out by
    hand: what launcher's overhead is measured against. Returns each window's loss as launcher
    logs it (the window's summed loss over its summed count) and the tokens/s after the first window."""
    from launcher.data import epoch_permutation  # launcher's data order, so both see the same batches
    from recipes import gpt

    cfg = gpt.Config(**size.model, data_file=str(ctx.tokens), token_dtype="uint16", val_fraction=0.0)
    train_set, _ = gpt.data(cfg)
    torch.manual_seed(SEED)  # as launcher seeds right before model(): the same initial weights
    model = gpt.model(cfg).to(ctx.device)
    if compile:
        for block in model.blocks:  # what train.compile compiles: each shard unit
            block.forward = torch.compile(block.forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=True)
    order = epoch_permutation(len(train_set), SEED, 0, True)[: size.batch * size.steps].tolist()
    loader = torch.utils.data.DataLoader(train_set, batch_size=size.batch, sampler=order, pin_memory=ctx.cuda)
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    totals, counts, start = [], [], None
    for step, (x, y) in enumerate(loader, 1):
        if step == size.log_every + 1:  # the first window is warm-up, as in launcher's figures
            sync()
            start = time.perf_counter()
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            total, count = gpt.loss(model, (x, y))
        total = total.float()
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals.append(total.detach())
        counts.append(torch.as_tensor(count, dtype=torch.float32))  # a host int (recipes.gpt): summed on the host
    sync()
    seconds = time.perf_counter() - start
    tokens = (size.steps - size.log_every) * size.batch * size.model["seq_len"]
    windows = []
    for i in range(0, size.steps, size.log_every):
        num, den = torch.stack([torch.stack(totals[i:i + size.log_every]).sum(),
                                torch.stack(counts[i:i + size.log_every]).sum()]).tolist()
        windows.append(num / den)
    params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    return {"losses": windows, "tokens_per_s": tokens / seconds, "params": params}


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """--smoke compiles with aot_eager: launcher still decides what to compile and when, without
    inductor's C++ build. None: torch's default (inductor)."""
    if backend is None:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


# ---------------------------------------------------------------- the checks

def against_loop(ctx: Context, name: str, overrides: list[str], compile: bool = False) -> dict:
    """(a), (b): launcher and the hand-written loop on the same work; their tokens/s and losses."""
    size = ctx.sizes[name]
    rows = ctx.fit(name, size, overrides)
    ctx.cleanup(name)
    figures = rates(rows)
    with part("the hand-written loop", figures):  # launcher's figures stay if the loop fails
        loop = plain_loop(ctx, size, compile)
    ctx.free()
    figures.update(loop_tokens_per_s=loop["tokens_per_s"], ratio=figures["tokens_per_s"] / loop["tokens_per_s"],
                   params_m=loop["params"] / 1e6)
    if "mfu" in figures:
        figures["loop_mfu"] = figures["mfu"] / figures["ratio"]  # MFU scales with tokens/s
    trained(rows, figures)
    diff = max_rel_diff([r["loss"] for r in rows], loop["losses"])
    figures["loss_vs_loop"] = diff
    expect(diff <= LOSS_TOL[ctx.mode], f"launcher's losses differ from the loop's by {diff:.3g} (relative)", figures)
    return figures


def check_bf16(ctx: Context) -> dict:
    return against_loop(ctx, "bf16", [])


def check_compile(ctx: Context) -> dict:
    try:
        with compile_backend("aot_eager" if ctx.smoke else None):
            figures = against_loop(ctx, "compile", ["train.compile=true"], compile=True)
    finally:
        torch._dynamo.reset()  # the compiled code and the graphs it holds on to
    figures["backend"] = "aot_eager" if ctx.smoke else "inductor"
    return figures


def check_fp16(ctx: Context) -> dict:
    rows = ctx.fit("fp16", ctx.sizes["fp16"], ["precision=fp16"])
    ctx.cleanup("fp16")
    figures = trained(rows, {**rates(rows), "scaler_skipped_steps": rows[-1].get("skipped_steps", 0)})
    expect(figures["scaler_skipped_steps"] < len(rows) * ctx.sizes["fp16"].log_every / 2,
           "the gradient scaler skipped most steps", figures)
    return figures


def check_activation_ckpt(ctx: Context) -> dict:
    size = ctx.sizes["activation_ckpt"]
    plain = ctx.fit("ac_off", size, [])
    ctx.cleanup("ac_off")
    checkpointed = ctx.fit("ac_on", size, ["train.activation_checkpointing=true"])
    ctx.cleanup("ac_on")
    off, on = rates(plain), rates(checkpointed)
    figures = {"step_time_off": off["step_time"], "step_time_on": on["step_time"],
               "time_ratio": on["step_time"] / off["step_time"]}
    if ctx.cuda:
        figures.update(mem_off_gib=off["mem_max_allocated_gib"], mem_on_gib=on["mem_max_allocated_gib"],
                       mem_ratio=on["mem_max_allocated_gib"] / off["mem_max_allocated_gib"])
    else:
        figures["memory"] = "CUDA only"
    trained(checkpointed, figures)
    diff = max_rel_diff([r["loss"] for r in plain], [r["loss"] for r in checkpointed])
    figures["loss_vs_off"] = diff
    expect(diff <= LOSS_TOL[ctx.mode], f"losses differ from the run without by {diff:.3g}", figures)
    if ctx.cuda:
        expect(figures["mem_ratio"] < 1, "activation checkpointing did not lower the peak memory", figures)
    return figures


def check_plan_memory(ctx: Context) -> dict:
    """The plan counts parameters, gradients and optimizer state, not activations: after a run the
    memory still allocated (parameters and optimizer state; gradients are freed) must match its
    estimate of those, and the peak must exceed its total."""
    from launcher.config import load_config
    from launcher.plan import estimate
    from launcher.recipe import Recipe

    size = ctx.sizes["plan_memory"]
    path, _, overrides = ctx.config("plan_memory", size)
    cfg = load_config(path, overrides)
    _, per_rank = estimate(cfg, Recipe.load(cfg.recipe), 1)["single"].largest
    gib = 1024**3
    figures = {"plan_total_gib": per_rank.total.bytes / gib,
               "plan_params_optim_gib": (per_rank.parameters.bytes + per_rank.optimizer.bytes) / gib}
    if not ctx.cuda:
        raise Skip("no CUDA memory figures on the CPU", figures)
    ctx.free()
    before = torch.cuda.memory_allocated(ctx.device)
    held = {}
    rows = ctx.fit("plan_memory", size, [],
                   inspect=lambda trainer: held.update(now=torch.cuda.memory_allocated(ctx.device) - before))
    ctx.cleanup("plan_memory")
    peak = rates(rows)["mem_max_allocated_gib"] - before / gib
    figures.update(held_after_gib=held["now"] / gib, peak_gib=peak, not_in_plan_gib=peak - figures["plan_total_gib"])
    figures["held_vs_plan"] = figures["held_after_gib"] / figures["plan_params_optim_gib"]
    expect(abs(figures["held_vs_plan"] - 1) < 0.05, "the memory held after the run is not what the plan says",
           figures)
    expect(peak >= figures["plan_total_gib"], "the peak is below the plan's total", figures)
    return figures


def check_async_ckpt(ctx: Context) -> dict:
    """A sync run and an async run save at step k; what each save blocks is the step after it
    (its row's step_time) less a plain step. A third run resumes from the async save at step k and
    must log the async run's losses: the background copy held step k's state."""
    size = ctx.sizes["async_ckpt"]
    k = (size.steps - 1) // 2  # the async run saves at k and 2k, then at the end

    def blocked(rows: list[dict], after: int) -> float:
        plain = statistics.median(r["step_time"] for r in rows[1:k])  # steps 2 .. k: no save, no start-up
        return rows[after]["step_time"] - plain  # rows[after] is step after + 1

    sync_rows = ctx.fit("ckpt_sync", Size(size.model, size.batch, k + 1, 1, size.lr), [f"checkpoint.every_steps={k}"])
    ctx.cleanup("ckpt_sync")
    figures = {"sync_blocks_s": blocked(sync_rows, k)}
    try:
        with part("the async run", figures):
            async_rows = ctx.fit("ckpt_async", size, [f"checkpoint.every_steps={k}", "checkpoint.async=true",
                                                      "checkpoint.keep_last=3"])
        figures.update(async_blocks_s=blocked(async_rows, k), async_blocks_2nd_s=blocked(async_rows, 2 * k))
        figures["async_vs_sync"] = figures["async_blocks_s"] / max(figures["sync_blocks_s"], 1e-9)
        figures["staging"] = "background, pinned (CUDA)" if ctx.cuda else "in save() (the CPU)"
        saved = ctx.root / "ckpt_async" / "checkpoints" / f"step_{k:06d}"
        with part("the resumed run", figures):
            resumed = ctx.fit("ckpt_resume", size, [f"checkpoint.resume={saved}"])
    finally:
        ctx.cleanup("ckpt_async")
        ctx.cleanup("ckpt_resume")
    want = [r["loss"] for r in async_rows if r["step"] > k]
    got = [r["loss"] for r in resumed]
    expect([r["step"] for r in resumed] == list(range(k + 1, size.steps + 1)),
           f"the resumed run did not start at step {k + 1}: steps {[r['step'] for r in resumed]}", figures)
    figures["resume_first_loss_diff"] = max_rel_diff(want[:1], got[:1])
    figures["resume_loss_diff"] = max_rel_diff(want, got)
    # The first resumed step reads only the saved weights through deterministic forward kernels.
    expect(figures["resume_first_loss_diff"] == 0, "the resumed run's first loss differs: the checkpoint is not "
           "step k's state", figures)
    expect(figures["resume_loss_diff"] <= LOSS_TOL[ctx.mode], "the resumed run's losses drift", figures)
    return figures


def check_export(ctx: Context) -> dict:
    from safetensors.torch import load_file

    from recipes import gpt

    size = ctx.sizes["export"]
    rows = ctx.fit("export", size, [])
    out = ctx.root / "export.safetensors"
    start = time.perf_counter()
    ctx.command("export_cmd", ["export", str(ctx.root / "export"), str(out)])
    figures = {"export_s": time.perf_counter() - start, "file_mb": out.stat().st_size / 1e6}
    state = load_file(str(out))
    model = gpt.model(gpt.Config(**size.model))
    model.load_state_dict(state, strict=True)  # raises on a missing or unexpected key, or a wrong shape
    figures["tensors"] = len(state)
    expect(all(torch.isfinite(t).all() for t in state.values()), "non-finite weights in the export", figures)
    trained(rows, figures)
    ctx.cleanup("export")
    out.unlink()
    return figures


def launched(ctx: Context, name: str, overrides: list[str]) -> dict:
    """(d), (h), (i): one worker through `launcher run --nproc 1` (torch.distributed.run)."""
    start = time.perf_counter()
    rows = ctx.launch(name, ctx.sizes[name], overrides)
    ctx.cleanup(name)
    figures = {"backend": "nccl" if ctx.cuda else "gloo", "wall_s": time.perf_counter() - start, **rates(rows)}
    return trained(rows, figures)


def check_ddp(ctx: Context) -> dict:
    return launched(ctx, "ddp", ["strategy=ddp"])


def check_fsdp(ctx: Context) -> dict:
    return launched(ctx, "fsdp", ["strategy=fsdp"])


def check_fsdp_offload(ctx: Context) -> dict:
    # fused AdamW steps the offloaded (host) parameters: torch's fused CPU kernel
    return launched(ctx, "fsdp_offload", ["strategy=fsdp", "fsdp.cpu_offload=true", "optim.impl=fused"])


def check_zero2(ctx: Context) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed not installed: scripts/gpu_wheels.sh puts its wheel in .whl/")
    return launched(ctx, "zero2", ["strategy=deepspeed", "deepspeed.zero_stage=2"])


@contextlib.contextmanager
def syncs_per_step(ctx: Context, counts: dict):
    """counts[step] = the synchronising CUDA calls inside that optimizer step (StepRunner.train_step),
    from torch.cuda.set_sync_debug_mode("warn"); on the CPU nothing synchronises, so none are counted."""
    import warnings

    from launcher.step import StepRunner

    original = StepRunner.train_step

    def counted(self, batches, window):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = original(self, batches, window)
        counts[self.state.step + 1] = sum("synchroniz" in str(w.message) for w in caught)
        return out

    StepRunner.train_step = counted
    if ctx.cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        StepRunner.train_step = original
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("default")


SYNC_CASES = {  # strategy overrides: the syncs a step that logs nothing may make (its flag read on the host)
    "single": ([], 0),
    "ddp": (["strategy=ddp"], 0),
    "fsdp": (["strategy=fsdp"], 0),
    "fsdp_offload": (["strategy=fsdp", "fsdp.cpu_offload=true"], None),  # its flag's copy to the host, and FSDP's
    "zero2": (["strategy=deepspeed", "deepspeed.zero_stage=2"], None),  # DeepSpeed's step syncs itself
}


def check_sync_debug(ctx: Context) -> dict:
    """The design's rule (docs/design.md, Host syncs): a step that neither logs, evaluates nor saves never
    waits for the device. Steps 2.. that log nothing are counted (step 1 includes the first kernels'
    set-up); each strategy may make at most the syncs SYNC_CASES allows."""
    size, figures = ctx.sizes["sync_debug"], {}
    for name, (overrides, allowed) in SYNC_CASES.items():
        if name == "zero2" and importlib.util.find_spec("deepspeed") is None:
            figures["zero2"] = "deepspeed not installed"
            continue
        counts: dict[int, int] = {}
        with part(f"the {name} run", figures), syncs_per_step(ctx, counts):
            ctx.fit(f"sync_{name}", size, [*overrides, "optim.impl=fused"])
        ctx.cleanup(f"sync_{name}")
        quiet = [counts[k] for k in sorted(counts) if k > 1 and k % size.log_every]
        figures[f"{name}_syncs"] = max(quiet, default=0)
        if allowed is not None:
            expect(max(quiet, default=0) <= allowed, f"{name}: a step that logs nothing synchronised "
                   f"{max(quiet)} time(s) (at most {allowed}): steps {counts}", figures)
    figures["mode"] = "set_sync_debug_mode(warn)" if ctx.cuda else "the CPU: nothing synchronises"
    return figures


def check_offload_nan(ctx: Context) -> dict:
    """A NaN loss at step k under fsdp.cpu_offload with fused AdamW (the flag copied from the GPU to the
    host kernel): step k changes neither the weights nor the optimizer state, and the run goes on."""
    from launcher.step import StepRunner

    size, k = ctx.sizes["offload_nan"], 3
    states: dict[int, tuple] = {}
    original_step, original_micro = StepRunner.train_step, StepRunner.micro_step

    def snapshot(strategy) -> tuple:
        local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().clone()  # noqa: E731
        params = [local(p) for p in strategy.model.parameters()]
        optim = [local(v) for st in strategy.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        return params, optim

    def train_step(self, batches, window):
        out = original_step(self, batches, window)
        if self.state.step + 1 in (k - 1, k):
            states[self.state.step + 1] = snapshot(self.strategy)
        return out

    def micro_step(self, batch, batch_idx, step, j, pair):
        out, pair = original_micro(self, batch, batch_idx, step, j, pair)
        if step + 1 == k and j == 0:  # a NaN in the graph already backpropagated: poison the gradients
            for p in self.strategy.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(float("nan"))
        return out, pair

    StepRunner.train_step, StepRunner.micro_step = train_step, micro_step
    try:
        rows = ctx.fit("offload_nan", size, ["strategy=fsdp", "fsdp.cpu_offload=true", "optim.impl=fused",
                                             "train.on_nonfinite=skip"])
    finally:
        StepRunner.train_step, StepRunner.micro_step = original_step, original_micro
        ctx.cleanup("offload_nan")
    figures = trained(rows, {"skipped_steps": rows[-1].get("skipped_steps", 0)})
    (params_before, optim_before), (params_after, optim_after) = states[k - 1], states[k]
    figures["weights_kept"] = all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    figures["optim_state_kept"] = all(torch.equal(a, b) for a, b in zip(optim_before, optim_after))
    expect(figures["skipped_steps"] == 1, f"{figures['skipped_steps']} step(s) skipped, not 1", figures)
    expect(figures["weights_kept"] and figures["optim_state_kept"], f"the NaN step {k} changed the weights or "
           "the optimizer state", figures)
    return figures


def check_setup_memory(ctx: Context) -> dict:
    """What building the 350M model under fsdp allocates on the GPU (the recipe's init_weights initialises
    it there, one whole parameter at a time beside the shards), against `launcher plan`'s set-up peak."""
    from launcher.config import load_config
    from launcher.plan import setup, setup_peak
    from launcher.recipe import Recipe

    size = ctx.sizes["setup_memory"]
    path, _, overrides = ctx.config("setup_memory", size, ["strategy=fsdp"])
    cfg = load_config(path, overrides)
    peaks, _ = setup_peak(setup(cfg, Recipe.load(cfg.recipe), 1), "fsdp", init_weights=True)
    gib = 1024**3
    figures = {"plan_setup_gib": peaks[0].device / gib}
    if not ctx.cuda:
        raise Skip("no CUDA memory figures on the CPU", figures)
    ctx.free()
    before = torch.cuda.memory_allocated(ctx.device)
    held = {}
    ctx.fit("setup_memory", size, overrides,
            built=lambda trainer: held.update(peak=torch.cuda.max_memory_allocated(ctx.device) - before))
    ctx.cleanup("setup_memory")
    figures["setup_peak_gib"] = held["peak"] / gib
    figures["measured_vs_plan"] = figures["setup_peak_gib"] / figures["plan_setup_gib"]
    expect(abs(figures["measured_vs_plan"] - 1) < 0.1, "the set-up peak is not what the plan says", figures)
    return figures


def check_float8(ctx: Context) -> dict:
    if importlib.util.find_spec("torchao") is None:
        raise Skip("torchao is not installed (carry its wheel: scripts/gpu_wheels.sh)")
    size, figures = ctx.sizes["float8"], {}
    bf16 = ctx.fit("f8_bf16", size, [])
    ctx.cleanup("f8_bf16")
    float8 = ctx.fit("f8_float8", size, ["precision=float8"])
    ctx.cleanup("f8_float8")
    for name, rows in (("bf16", bf16), ("float8", float8)):
        for key, value in rates(rows).items():
            figures[f"{name}_{key}"] = value
        figures[f"{name}_loss_last"] = rows[-1]["loss"]
    trained(float8, figures)
    figures["step_time_ratio"] = figures["float8_step_time"] / figures["bf16_step_time"]
    diff = abs(figures["float8_loss_last"] - figures["bf16_loss_last"]) / figures["bf16_loss_last"]
    figures["loss_vs_bf16"] = diff
    expect(diff < 0.03, f"float8's last loss differs from bf16's by {diff:.3g} (relative)", figures)
    return figures


def check_tp_mesh(ctx: Context) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from launcher.env import ensure_process_group
    from launcher.tensor_parallel import split_layers
    from recipes import gpt

    size = ctx.sizes["tp_mesh"]
    cfg = gpt.Config(**size.model)
    ensure_process_group(ctx.device)
    torch.manual_seed(SEED)
    with torch.device(ctx.device):
        plain = gpt.model(cfg)
    split = copy.deepcopy(plain)
    mesh = init_device_mesh(ctx.device.type, (1,), mesh_dim_names=("tp",))
    split_layers(split, gpt.tp_plan(split), mesh, sequence_parallel=True)
    x = torch.randint(0, cfg.vocab_size, (size.batch, cfg.seq_len), device=ctx.device)
    y = torch.randint(0, cfg.vocab_size, (size.batch, cfg.seq_len), device=ctx.device)
    losses = []
    for model in (plain, split):
        total, count = gpt.loss(model, (x, y))
        (total / count).backward()
        losses.append(float(total) / count)
    grads = {name: p.grad for name, p in plain.named_parameters()}
    worst = max(float((g.full_tensor() if hasattr(g, "full_tensor") else g).sub(grads[name]).abs().max())
                for name, g in ((n, p.grad) for n, p in split.named_parameters()))
    figures = {"loss": losses[0], "loss_diff": abs(losses[1] - losses[0]), "grad_max_abs_diff": worst,
               "dtensor_params": sum(hasattr(p, "full_tensor") for p in split.parameters())}
    expect(figures["dtensor_params"] == len(list(split.parameters())), "a parameter is not a DTensor", figures)
    expect(figures["loss_diff"] <= 1e-5 * abs(losses[0]) and worst <= 1e-5,
           "the split model's loss or gradients differ from the plain model's", figures)
    del plain, split
    return figures


CHECKS = {
    "bf16": check_bf16,
    "compile": check_compile,
    "fp16": check_fp16,
    "activation_ckpt": check_activation_ckpt,
    "plan_memory": check_plan_memory,
    "async_ckpt": check_async_ckpt,
    "export": check_export,
    "ddp": check_ddp,
    "fsdp": check_fsdp,
    "fsdp_offload": check_fsdp_offload,
    "zero2": check_zero2,
    "sync_debug": check_sync_debug,
    "offload_nan": check_offload_nan,
    "setup_memory": check_setup_memory,
    "float8": check_float8,
    "tp_mesh": check_tp_mesh,
}


# ---------------------------------------------------------------- main

def run_check(ctx: Context, name: str) -> Result:
    if ctx.elapsed() > ctx.budget_s:
        return Result("skipped", f"time budget: {ctx.elapsed():.0f} s of {ctx.budget_s:.0f} s spent")
    start = time.perf_counter()
    try:
        result = Result("ok", figures=CHECKS[name](ctx))
    except Skip as e:
        result = Result("skipped", str(e), e.figures)
    except Failed as e:
        result = Result("failed", str(e), e.figures)
    except Exception as e:  # noqa: BLE001 - any error is this check's failure, never the others'
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = Result("failed", f"{type(e).__name__}: {first}", log_tail=traceback.format_exc()[-4000:])
    if result.status == "failed":
        result.log_tail = "\n".join(filter(None, [result.log_tail, log_tails(ctx)]))
    result.seconds = time.perf_counter() - start
    with contextlib.suppress(Exception):
        ctx.free()
    return result


def log_tails(ctx: Context) -> str:
    """The end of what the latest runs printed (their logs are in the scratch folder)."""
    logs = sorted(ctx.root.glob("*.log"), key=lambda p: p.stat().st_mtime)[-2:]
    return "\n".join(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]) for p in logs)


def machine() -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["deepspeed"] = importlib.util.find_spec("deepspeed") is not None
    return info


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="where the results go (JSON)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the same code paths")
    parser.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    parser.add_argument("--tmp", default=None, help="scratch folder for run dirs and checkpoints (default: /dev/shm "
                        "on the GPU where it has room, else the system's temp folder)")
    parser.add_argument("--budget-s", type=float, default=None, help="no check starts after this many seconds "
                        f"(default {BUDGET_S['gpu']}, --smoke {BUDGET_S['smoke']})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, token file)")
    args = parser.parse_args()
    names = list(CHECKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}: choose from {', '.join(CHECKS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --smoke for the CPU version")
    if args.smoke:
        torch.set_num_threads(1)  # a small shared machine: predictable, and the subprocesses use one too
    mode = "smoke" if args.smoke else "gpu"
    ctx = Context(args.smoke, args.tmp, args.budget_s or BUDGET_S[mode])
    out = Path(args.out)
    report = {"mode": mode, "machine": machine(), "scratch": str(ctx.root), "checks": {}}
    print(f"gpu_check ({mode}): torch {torch.__version__}, {report['machine'].get('gpu', 'CPU')}; scratch "
          f"{ctx.root}", flush=True)
    try:
        for name in names:
            result = run_check(ctx, name)
            report["checks"][name] = {k: v for k, v in vars(result).items() if k != "log_tail" or v}
            report["seconds"] = round(ctx.elapsed(), 1)
            write_json(out, report)
            print(result.line(name), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(ctx.root, ignore_errors=True)
    failed = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    print(f"{len(names) - len(failed)} of {len(names)} checks did not fail; {ctx.elapsed():.0f} s; results in {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
