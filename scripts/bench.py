"""Benchmarks: launcher's step time against a hand-written loop, Lightning and Accelerate;
start-up time of `launcher run`; checkpoint save and resume times. One command a section:

    python scripts/bench.py --workload mlp       # step time, small MLP (per-step overhead shows)
    python scripts/bench.py --workload gpt       # step time, small GPT (compute dominates)
    python scripts/bench.py --profile            # cProfile: the launcher's MLP step against the hand-written one
    python scripts/bench.py --startup            # command to first training step, through the real CLI
    python scripts/bench.py --checkpoint         # seconds a save blocks training, sync / async; load
    python scripts/bench.py --memory             # peak host memory per rank: a 150M GPT under fsdp and ZeRO-3 x4

    options: --steps N --warmup N --block N --rounds R --device cpu|cuda --optim-impl for_loop|foreach|fused

Step time: the same model, data, order and optimizer trained by (a) a hand-written loop,
(b) launcher's Trainer in this process, (c) Lightning's Trainer and (d) Accelerate, the
last two when installed. All read the same dataset through a torch DataLoader with the
same per-epoch permutation (launcher.data.epoch_permutation), batch size and collate;
launcher uses its own sampler and loader, which are part of what it costs. Each run
does --warmup steps untimed, then --steps steps in blocks of --block steps; clocks are
read only between blocks. A run's step time is its fastest block (other jobs on the
machine only ever add time), in CPU time of the process on the CPU (it leaves out the
time other jobs held the cores) and in wall time. Runs are interleaved a, b, c, d, a,
b, ... in one process, each round starting one loop further on; the table gives the
median over rounds of the step time and of each run's ratio to the hand-written run of
its round. The final weights of each run
are compared with the hand-written loop's, to show that the four trained the same thing.

One thread, fp32, the same optimizer kernel everywhere (--optim-impl). The machines are
shared and noisy: compare ratios, not milliseconds, and rerun before believing a change
of a few percent.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc
import importlib.util
import logging
import os
import platform
import pstats
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.checkpoint import latest_checkpoint  # noqa: E402
from launcher.config import OptimConfig, validate  # noqa: E402
from launcher.data import epoch_permutation  # noqa: E402
from launcher.env import DistEnv  # noqa: E402
from launcher.recipe import import_recipe  # noqa: E402
from launcher.trainer import Trainer  # noqa: E402

SEED = 0
clock = time.perf_counter


def now() -> tuple[float, float]:
    """(wall, CPU time of this process). On a shared CPU the CPU time leaves out the time other
    jobs held the cores; the wall time does not."""
    return time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class Workload:
    recipe: dict  # launcher's recipe section; the other loops build the same module from it
    batch: int
    optim: dict  # launcher's optim section; the other loops build the same torch optimizer
    warmup: int
    steps: int
    block: int  # steps timed as one block; a run's step time is its fastest block


WORKLOADS = {
    # ~200k parameters, batch 64: ~1.5 ms a step on one thread, so per-step overhead shows.
    # 3200 samples: 50 steps an epoch, so the warm-up ends on an epoch boundary.
    "mlp": Workload({"name": str(ROOT / "scripts" / "bench_mlp.py")}, 64,
                    {"name": "sgd", "lr": 0.01, "momentum": 0.9}, warmup=50, steps=300, block=50),
    # ~450k parameters, 8 x 128 tokens: ~45 ms a step on one thread; compute dominates.
    "gpt": Workload({"name": "recipes.gpt", "max_chars": 200_000, "seq_len": 128, "n_layer": 2, "n_head": 4,
                     "d_model": 128}, 8,
                    {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.95]}, warmup=5, steps=40,
                    block=10),
}

# --checkpoint: ~57M parameters (fp32 weights + AdamW state: ~0.7 GB a checkpoint).
CKPT_RECIPE = {"name": "recipes.gpt", "max_chars": 20_000, "seq_len": 64, "n_layer": 8, "n_head": 12, "d_model": 768}

# The floor for --startup: a bare script that imports torch, builds the digits data and MLP and
# trains, printing a row a step as launcher does.
BARE_DIGITS = """
import sys, torch, torch.nn.functional as F
from recipes import digits
torch.manual_seed(0)
cfg = digits.Config()
train, _ = digits.data(cfg)
model = digits.model(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
step, steps = 0, int(sys.argv[1])
while step < steps:
    for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"step={step} loss={loss.item():.4f}", flush=True)
        if step == steps:
            break
"""

STARTUP_CASES = [  # (label, arguments after `launcher run`, or None for the bare script)
    ("bare torch script, digits", None),
    ("digits, single", ["configs/digits.yaml"]),
    ("gpt, ddp x2", ["configs/gpt_ddp.yaml", "--nproc", "2"]),
    ("gpt, fsdp x2", ["configs/gpt_fsdp.yaml", "--nproc", "2"]),
    ("gpt, deepspeed zero2 x2", ["configs/gpt_zero2.yaml", "--nproc", "2"]),
]


# ---------------------------------------------------------------- shared pieces


class EpochOrder(Sampler[int]):
    """launcher's order on one process: each epoch's permutation from (seed, epoch), tail dropped."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.used, self.seed, self.epoch = n, n // batch * batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_permutation(self.n, self.seed, self.epoch, True)[: self.used].tolist())

    def __len__(self) -> int:
        return self.used


def load_recipe(section: dict):
    module = import_recipe(section["name"])
    fields = {k: v for k, v in section.items() if k != "name"}
    return module, (module.Config(**fields) if hasattr(module, "Config") else None)


def build(w: Workload, device: torch.device):
    """Model (on the CPU, seeded as launcher seeds it), loader and loss function."""
    module, cfg = load_recipe(w.recipe)
    train_set, _ = module.data(cfg)
    torch.manual_seed(SEED)  # launcher seeds right before model(): the same initial weights
    model = module.model(cfg)
    loader = DataLoader(train_set, batch_size=w.batch, sampler=EpochOrder(len(train_set), w.batch, SEED),
                        pin_memory=device.type == "cuda")
    return model, loader, module.loss


IMPLS = {"for_loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
         "fused": {"foreach": False, "fused": True}}


def make_optimizer(spec: dict, params) -> torch.optim.Optimizer:
    """What launcher.optim builds from the same section, with the same kernel (optim.impl)."""
    impl = IMPLS[spec.get("impl", "for_loop")]
    if spec["name"] == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec.get("momentum", 0.9),
                               weight_decay=spec.get("weight_decay", 0.0), **impl)
    cls = torch.optim.Adam if spec["name"] == "adam" else torch.optim.AdamW
    return cls(params, lr=spec["lr"], betas=tuple(spec.get("betas", (0.9, 0.999))), eps=spec.get("eps", 1e-8),
               weight_decay=spec.get("weight_decay", 0.0), **impl)


def check_impl(trainer, spec: dict) -> None:
    """The launcher's optimizer must run the kernel the other loops run, or the comparison is off."""
    want = IMPLS[spec.get("impl", "for_loop")]
    got = {k: bool(trainer.strategy.optimizer.defaults.get(k)) for k in want}
    if got != want:
        raise SystemExit(f"launcher built its optimizer with {got}, the other loops with {want}: "
                         "pick --optim-impl to match")


def mean_loss(loss_fn, model, batch) -> torch.Tensor:
    out = loss_fn(model, batch)
    return out[0] / out[1] if isinstance(out, tuple) else out  # a (total, count) pair: its mean


def to_device(batch, device: torch.device):
    return [t.to(device, non_blocking=True) for t in batch] if device.type != "cpu" else batch


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


@contextlib.contextmanager
def quiet():
    """The frameworks' prints, logs and warnings go nowhere (a real file, as a log file would be)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def launcher_config(w: Workload, run_dir: str, log_every: int, **checkpoint) -> object:
    optim = {k: v for k, v in w.optim.items() if k != "impl" or "impl" in OptimConfig.model_fields}
    return validate({
        "recipe": dict(w.recipe), "run_dir": run_dir, "strategy": "single", "precision": "fp32",
        "train": {"global_batch_size": w.batch, "max_steps": w.warmup + w.steps, "seed": SEED,
                  "log_every_steps": log_every},
        "optim": optim, "log": {"progress": "lines"},
        "checkpoint": {"resume": "never", "keep_last": 1, **checkpoint},
        "dist": {"timeout_s": 1e6},  # a slow shared machine is no hang
    }, "bench")


# ---------------------------------------------------------------- the four loops
# Each returns the clock readings (now()) at the block boundaries: after the warm-up, then
# every w.block steps; and the final weights. A loop reads the clocks only there.


def run_plain(w: Workload, device: torch.device, log_every: int, now=now):
    model, loader, loss_fn = build(w, device)
    model.to(device)
    optimizer = make_optimizer(w.optim, model.parameters())
    sync, total = synchronizer(device), w.warmup + w.steps
    step, epoch, mark, marks = 0, 0, w.warmup, []
    while step < total:
        if step == mark:  # a block starting on an epoch boundary counts making the iterator
            sync()
            marks.append(now())
            mark += w.block
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if step == mark:
                sync()
                marks.append(now())
                mark += w.block
            loss = mean_loss(loss_fn, model, to_device(batch, device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
        epoch += 1
    sync()
    marks.append(now())
    return marks, flat_weights(model)


def run_launcher(w: Workload, device: torch.device, log_every: int, now=now):
    with tempfile.TemporaryDirectory() as run_dir, quiet():
        trainer = Trainer(launcher_config(w, run_dir, log_every), DistEnv("single"), device)
        check_impl(trainer, w.optim)
        sync = synchronizer(device)
        # One call of the loop for the warm-up, then one a block: each stops at total_steps and
        # the next goes on from there (the loop derives its position from the step counter, as
        # on resume). A call ends with a logged row, as every log_every_steps does anyway.
        trainer.state.total_steps = w.warmup
        trainer.train_loop()
        sync()
        marks = [now()]
        for end in range(w.warmup + w.block, w.warmup + w.steps + 1, w.block):
            trainer.state.total_steps = end
            trainer.train_loop()
            sync()
            marks.append(now())
        weights = flat_weights(trainer.strategy.model)
        trainer.fit()  # nothing left to train: the final save, then it closes its threads and files
    return marks, weights


def run_lightning(w: Workload, device: torch.device, log_every: int, now=now):
    import lightning.pytorch as pl

    class Timed(pl.LightningModule):
        def __init__(self, net, loss_fn):
            super().__init__()
            self.net, self.loss_fn, self.done, self.mark, self.marks = net, loss_fn, 0, w.warmup, []
            self.sync = synchronizer(device)

        def training_step(self, batch, batch_idx):
            return mean_loss(self.loss_fn, self.net, batch)

        def configure_optimizers(self):
            return make_optimizer(w.optim, self.net.parameters())

        def on_train_batch_end(self, outputs, batch, batch_idx):
            # Lightning calls this hook after every step anyway: a block runs from the end of one
            # step to the end of another, with no call added.
            self.done += 1
            if self.done == self.mark:
                self.sync()
                self.marks.append(now())
                self.mark += w.block

    model, loader, loss_fn = build(w, device)
    module = Timed(model, loss_fn)
    with tempfile.TemporaryDirectory() as root, quiet():
        for name in ("lightning.pytorch", "lightning.fabric"):  # its info lines go to the real stderr
            logging.getLogger(name).setLevel(logging.ERROR)
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="32-true",
            max_steps=w.warmup + w.steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            use_distributed_sampler=False, default_root_dir=root)
        trainer.fit(module, train_dataloaders=loader)
    return module.marks, flat_weights(model)


def run_accelerate(w: Workload, device: torch.device, log_every: int, now=now):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
    model, loader, loss_fn = build(w, device)
    model, optimizer, loader = accelerator.prepare(model, make_optimizer(w.optim, model.parameters()), loader)
    sync, total = synchronizer(device), w.warmup + w.steps
    step, mark, marks = 0, w.warmup, []
    while step < total:  # the prepared loader moves to the next epoch's order itself
        if step == mark:
            sync()
            marks.append(now())
            mark += w.block
        for batch in loader:
            if step == mark:
                sync()
                marks.append(now())
                mark += w.block
            optimizer.zero_grad()
            loss = mean_loss(loss_fn, model, batch)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            if step == total:
                break
    sync()
    marks.append(now())
    return marks, flat_weights(accelerator.unwrap_model(model))


RUNNERS = {"plain": run_plain, "launcher": run_launcher, "lightning": run_lightning, "accelerate": run_accelerate}
LABELS = {"plain": "hand-written loop", "launcher": "launcher Trainer", "lightning": "Lightning Trainer",
          "accelerate": "Accelerate"}
PACKAGES = {"lightning": "lightning", "accelerate": "accelerate", "deepspeed": "deepspeed"}


def installed(name: str) -> bool:
    return name not in PACKAGES or importlib.util.find_spec(PACKAGES[name]) is not None


def step_times(args) -> None:
    device = torch.device(args.device)
    names = [n for n in RUNNERS if installed(n)]
    missing = [n for n in RUNNERS if n not in names]
    rounds = args.rounds or 8
    # On the CPU the process's CPU time is the figure to read (it leaves out the time other jobs
    # held the cores); on a GPU the wall time (the CPU time does not see the device).
    kinds = ("wall", "cpu") if device.type == "cuda" else ("cpu", "wall")
    for wname in (list(WORKLOADS) if args.workload == "all" else [args.workload]):
        w = workload(wname, args)
        print(f"\n== {wname}: {w.steps} timed steps in blocks of {w.block} after {w.warmup} warm-up, batch {w.batch}, "
              f"{w.optim['name']} ({w.optim['impl']}), {rounds} rounds, {device}"
              + (f" (not installed: {', '.join(missing)})" if missing else ""), flush=True)
        # Per run and kind: seconds a step in its fastest block (other jobs only ever add time),
        # and over all its timed steps.
        fast = {n: {k: [] for k in kinds} for n in names}
        mean = {n: {k: [] for k in kinds} for n in names}
        drift = {n: 0.0 for n in names}
        finals = {}
        for r in range(rounds):
            # Interleaved a, b, c, d, a, b, ...; each round starts one further on, so that every
            # loop takes every place in a round equally often (rounds a multiple of the loops).
            for name in names[r % len(names):] + names[: r % len(names)]:
                gc.collect()
                marks, weights = RUNNERS[name](w, device, args.log_every)
                torch.set_num_threads(args.threads)  # in case a framework changed it
                assert len(marks) == w.steps // w.block + 1, (name, len(marks))
                for i, kind in enumerate(("wall", "cpu")):
                    if kind in kinds:
                        blocks = [b[i] - a[i] for a, b in zip(marks, marks[1:])]
                        fast[name][kind].append(min(blocks) / w.block)
                        mean[name][kind].append(sum(blocks) / w.steps)
                finals[name] = weights
            for name in names:
                drift[name] = max(drift[name], (finals[name] - finals["plain"]).abs().max().item())
            print(f"  round {r + 1} ({kinds[0]} ms a step, fastest block / all steps): " + "  ".join(
                f"{n} {fast[n][kinds[0]][-1] * 1e3:.3f} / {mean[n][kinds[0]][-1] * 1e3:.3f}" for n in names),
                flush=True)

        def ratio(table, name, kind):  # the median over rounds of each round's ratio to the hand-written run
            rs = [a / b for a, b in zip(table[name][kind], table["plain"][kind])]
            return statistics.median(rs), min(rs), max(rs)

        columns = [(kinds[0], fast, "fastest block"), (kinds[0], mean, "all steps"), (kinds[1], fast, "fastest block")]
        print(f"\n  {'':18s}" + "".join(f"  {f'{k} time, {what}':>33s}" for k, _, what in columns)
              + f"  {'max |w - w_plain|':>17s}")
        print(f"  {'':18s}" + f"  {'ms/step':>9s} {'ratio':>6s} {'(min..max)':>16s}" * len(columns))
        for name in names:
            cells = []
            for kind, table, _ in columns:
                med, lo, hi = ratio(table, name, kind)
                cells.append(f"  {statistics.median(table[name][kind]) * 1e3:9.3f} {med:6.3f} ({lo:6.3f}..{hi:6.3f})")
            print(f"  {LABELS[name]:18s}{''.join(cells)}  {drift[name]:17.2e}", flush=True)
        print(f"  (ms/step: median over {rounds} rounds; ratio: median over rounds of the ratio to the hand-written "
              "run of the same round)", flush=True)


def workload(name: str, args) -> Workload:
    w = WORKLOADS[name]
    block = args.block or w.block
    steps = -(-(args.steps or w.steps) // block) * block  # whole blocks
    return replace(w, steps=steps, block=block, warmup=max(1, w.warmup if args.warmup is None else args.warmup),
                   optim={**w.optim, "impl": args.optim_impl})


# ---------------------------------------------------------------- --profile


def profile(args) -> None:
    """cProfile of the launcher's timed MLP steps, then of the hand-written loop's, and where they
    differ. Warm-up steps run unprofiled. cProfile adds a cost to every Python call, so read the
    µs as relative; the default timer is CPU time, which other jobs on the machine inflate less."""
    w = replace(workload("mlp", args), block=workload("mlp", args).steps)  # one block: start, end
    device, n = torch.device(args.device), w.steps
    timer = time.thread_time if args.profile_timer == "cpu" else time.perf_counter
    found = {}
    for name in ("launcher", "plain"):
        prof = cProfile.Profile(timer)

        def mark(prof=prof, state=[]):  # the first block boundary starts the profile, the last one ends it
            (prof.disable if state else prof.enable)()
            state.append(1)
            return now()

        gc.collect()
        RUNNERS[name](w, device, args.log_every, now=mark)
        # {(file, line, function): (primitive calls, calls, own s, cumulative s, callers)}
        found[name] = {key: (calls, own, cum) for key, (_, calls, own, cum, _) in pstats.Stats(prof).stats.items()}
        total = sum(own for _, own, _ in found[name].values())
        print(f"{LABELS[name]}, mlp: {n} steps under cProfile ({args.profile_timer} timer): "
              f"{total / n * 1e6:.0f} µs a step")
    print(f"\nlauncher:  {'own µs/step':>11s} {'cum µs/step':>11s} {'calls/step':>10s}  function")
    rows = [(own, cum, calls, key) for key, (calls, own, cum) in found["launcher"].items()]
    for title, index in (("own time", 0), ("cumulative time", 1)):
        print(f"top {args.top} by {title}")
        for own, cum, calls, key in sorted(rows, key=lambda r: -r[index])[: args.top]:
            print(f"  {own / n * 1e6:19.1f} {cum / n * 1e6:11.1f} {calls / n:10.2f}  {where(key)}")
    print(f"\nlauncher minus hand-written loop, by own time (top {args.top}; negative: the hand-written loop's more)")
    print(f"  {'own µs/step':>19s} {'calls/step':>11s}  function")
    plain = found["plain"]
    diff = [(own - plain.get(key, (0, 0.0, 0.0))[1], calls - plain.get(key, (0, 0.0, 0.0))[0], key)
            for key, (calls, own, _) in found["launcher"].items()]
    diff += [(-own, -calls, key) for key, (calls, own, _) in plain.items() if key not in found["launcher"]]
    for own, calls, key in sorted(diff, key=lambda r: -abs(r[0]))[: args.top]:
        print(f"  {own / n * 1e6:+19.1f} {calls / n:+11.2f}  {where(key)}")
    print(f"  {sum(d[0] for d in diff) / n * 1e6:+19.1f} {'':11s}  (all functions)")


def where(key) -> str:
    file, line, name = key
    if file == "~":
        return name  # a C function
    parts = Path(file).parts
    for anchor in ("launcher", "torch", "site-packages"):
        if anchor in parts:
            parts = parts[len(parts) - 1 - parts[::-1].index(anchor):]
            break
    return f"{'/'.join(parts[-3:])}:{line}({name})"


# ---------------------------------------------------------------- --startup

FIRST_STEP = re.compile(r"\bstep=1\b")  # the console row of step 1 (train.log_every_steps=1)
FIT_START = re.compile(r"process\(es\)")  # the trainer's first line, on stderr


def launcher_command() -> list[str]:
    script = Path(sys.executable).with_name("launcher")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "launcher"]


def startup_once(argv: list[str] | None, steps: int, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        if argv is None:
            cmd = [sys.executable, "-c", BARE_DIGITS, str(steps or 440)]  # 440: digits.yaml's 20 epochs
        else:
            cmd = launcher_command() + ["run", *argv, "train.log_every_steps=1", f"run_dir={run_dir}",
                                        "checkpoint.resume=never"] + ([f"train.max_steps={steps}"] if steps else [])
        marks: dict = {}
        start = clock()
        env = dict(os.environ)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU figures on any machine (the launcher takes a GPU when it sees one)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=env)
        err: list[str] = []

        def drain_stderr():
            for line in proc.stderr:
                if "fit" not in marks and FIT_START.search(line):
                    marks["fit"] = clock() - start
                err.append(line)

        reader = threading.Thread(target=drain_stderr, daemon=True)
        reader.start()
        for line in proc.stdout:
            if "first" not in marks and FIRST_STEP.search(line) and not line.startswith("["):
                marks["first"] = clock() - start
        code = proc.wait()
        marks["total"] = clock() - start
        reader.join()
        shown = (["python", "-c", "<bare script>", *cmd[3:]] if argv is None
                 else ["launcher", *cmd[len(launcher_command()):]])
        marks["code"], marks["cmd"] = code, " ".join(shown).replace(run_dir, "$TMP")
        if code != 0:
            marks["tail"] = "".join(err[-15:])
    return marks


def startup(args) -> None:
    rounds = args.rounds or 2
    print("== start-up: each command in a subprocess, a row printed every step"
          + (f", {args.startup_steps} steps" if args.startup_steps else "") + f", {rounds} rounds", flush=True)
    found = {label: [] for label, _ in STARTUP_CASES}
    for r in range(rounds):
        for label, argv in STARTUP_CASES:  # interleaved over the cases
            m = startup_once(argv, args.startup_steps, args.device)
            found[label].append(m)
            state = "ok" if m["code"] == 0 else f"exit {m['code']}"
            print(f"  round {r + 1} {label:26s} step 1 after {m.get('first', float('nan')):6.2f} s, "
                  f"total {m['total']:6.2f} s ({state})", flush=True)
            if m["code"] != 0:
                print("    " + m["tail"].replace("\n", "\n    "), flush=True)

    def med(label, key):
        values = [m[key] for m in found[label] if key in m and m["code"] == 0]
        return statistics.median(values) if values else float("nan")

    floor = med(STARTUP_CASES[0][0], "first")
    print(f"\n  median seconds from the command to: {'fit start':>9s} {'step 1':>7s} {'x bare':>7s} {'exit':>7s}")
    for label, _ in STARTUP_CASES:
        cells = [med(label, "fit"), med(label, "first"), med(label, "first") / floor, med(label, "total")]
        print(f"  {label:35s} " + " ".join(f"{c:{w}.2f}" if c == c else f"{'-':>{w}s}"  # nan: not found
                                          for c, w in zip(cells, (9, 7, 7, 7))), flush=True)
    print("  (fit start: the trainer's first line on stderr; step 1: step 1's row on stdout; x bare: step 1 over "
          "the bare script's)")
    print("  commands:")
    for label, _ in STARTUP_CASES:
        print(f"    {found[label][0]['cmd']}")


# ---------------------------------------------------------------- --checkpoint


@contextlib.contextmanager
def moto_server():
    """An S3 server on the loopback (moto's), its bucket `bench`, and the environment that reaches it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        yield
    finally:
        server.terminate()
        server.wait()


def checkpoint_times(args) -> None:
    import torch.distributed.checkpoint  # noqa: F401  (its import is not part of the first save)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rounds = args.rounds or 3
    w = Workload(CKPT_RECIPE, 2, {"name": "adamw", "lr": 1e-4, "impl": args.optim_impl}, warmup=0, steps=2, block=1)
    keys = ("block1", "block2", "staged1", "staged2", "extra1", "extra2", "done2", "load")
    found = {mode: {k: [] for k in keys} for mode in ("sync", "async")}
    size = params = None
    print(f"== checkpoint: recipes.gpt {CKPT_RECIPE}, AdamW; two steps, then twice (a save, a step, the rest of "
          f"the save, a step), then a load; {rounds} rounds; to {args.ckpt_url or args.ckpt_dir or 'the temp dir'}",
          flush=True)
    for r in range(rounds):
        for mode in ("sync", "async"):  # interleaved
            gc.collect()
            with tempfile.TemporaryDirectory(dir=args.ckpt_dir) as run_dir:
                with quiet():
                    # keep_last 3: no pruning of the first checkpoint inside the second save
                    where = {"dir": f"{args.ckpt_url}/{r}-{mode}"} if args.ckpt_url else {}
                    trainer = Trainer(launcher_config(w, run_dir, 1, **{"async": mode == "async", "keep_last": 3},
                                                      **where), DistEnv("single"), device)
                    ckpt, got, waited = trainer.checkpointer, {}, [0.0]
                    staged = getattr(ckpt, "wait_staged", None)  # where a save stages in the background

                    def timed_wait_staged():
                        start = clock()
                        staged()
                        waited[0] += clock() - start

                    if staged is not None:
                        ckpt.wait_staged = timed_wait_staged

                    def step(n: int) -> float:
                        sync()
                        trainer.state.total_steps = n
                        start = clock()
                        trainer.train_loop()
                        sync()
                        return clock() - start

                    step(1)  # the optimizer state exists from here, as at any real save
                    plain = step(2)
                    for k, n in ((1, 3), (2, 5)):  # the first save of a run, and one later (what a run pays every time)
                        done = []
                        start = clock()
                        trainer.save()  # returns once written (sync), or staging has started or ended (async)
                        saved = clock()
                        if ckpt.pending is not None:
                            ckpt.pending[0].add_done_callback(lambda f: done.append(clock()))
                        waited[0] = 0.0
                        took = step(n)  # the next step waits for the staging copy before its optimizer step
                        ckpt.wait()  # the rest of an async save; nothing for a sync one
                        step(n + 1)  # a run trains on between saves (what the allocator then gives back counts)
                        got[f"staged{k}"] = waited[0]
                        got[f"block{k}"] = saved - start + waited[0]
                        got[f"extra{k}"] = took - plain  # what the save costs the next step (waits, contention)
                        got[f"done{k}"] = (done[0] if done else saved) - start
                    path = latest_checkpoint(ckpt.dir)
                    start = clock()
                    ckpt.load(path, trainer.strategy)  # what a resume reads
                    got["load"] = clock() - start
                    if params is None:
                        params = sum(p.numel() for p in trainer.strategy.model.parameters())
                        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    trainer.fit()  # nothing left to train: closes its threads and files
                    trainer.strategy.close()
            for key in keys:
                found[mode][key].append(got[key])
            print(f"  round {r + 1} {mode:5s}: blocks {got['block1']:6.3f} s (first save; staging wait "
                  f"{got['staged1']:.3f}), {got['block2']:6.3f} s (second; {got['staged2']:.3f}); next step "
                  f"{got['extra1']:+.3f} / {got['extra2']:+.3f} s; written after {got['done2']:6.3f} s; "
                  f"load {got['load']:6.3f} s", flush=True)
    med = {mode: {k: statistics.median(v) for k, v in d.items()} for mode, d in found.items()}
    print(f"\n  {params / 1e6:.1f}M parameters, {size / 1e9:.2f} GB a checkpoint (files on disk)")
    print(f"  {'':6s} {'blocks, 1st':>11s} {'2nd':>6s} {'next step +, 1st':>16s} {'2nd':>6s} {'written after':>13s} "
          f"{'load':>6s}   (median s)")
    for mode in ("sync", "async"):
        m = med[mode]
        print(f"  {mode:6s} {m['block1']:11.3f} {m['block2']:6.3f} {m['extra1']:16.3f} {m['extra2']:6.3f} "
              f"{m['done2']:13.3f} {m['load']:6.3f}")
    print(f"  an async save blocks {med['async']['block1'] / med['sync']['block1']:.3f} x the sync save (first save), "
          f"{med['async']['block2'] / med['sync']['block2']:.3f} x (second)", flush=True)
    print("  (blocks: save() plus the next step's wait for the staging copy; next step +: that step's time over "
          "a plain step's, waits and contention; written after: from save() to the files written)")


# ---------------------------------------------------------------- --memory
# What each rank holds at its peak, a large model's run against a tiny model's: the difference is what
# the model costs a rank (the torch runtime, the data and the process group cancel out).

BIG_GPT = {"d_model": 1024, "n_layer": 12, "n_head": 16}  # 151M parameters: 604 MB of fp32 weights
TINY_GPT = {"d_model": 32, "n_layer": 1, "n_head": 2}
MEMORY_RECIPE = {"seq_len": 64, "max_chars": 40_000}  # and BIG_GPT or TINY_GPT
RANK0_GPT = str(ROOT / "scripts" / "bench_gpt_rank0.py")  # recipes.gpt without init_weights
MEMORY_CASES = {  # label: launcher run arguments
    "fsdp, init_weights": ["strategy=fsdp"],
    "fsdp, from rank 0": ["strategy=fsdp", f"recipe.name={RANK0_GPT}"],
    "zero3, from rank 0": ["strategy=deepspeed", "deepspeed.zero_stage=3"],
}
# Each worker records its peak resident set (VmHWM) as it leaves. Workers leave through os._exit (no
# atexit), so a sitecustomize the bench puts first on PYTHONPATH wraps os._exit.
PEAK_HOOK = """
import os
if os.environ.get("BENCH_PEAK_DIR") and "RANK" in os.environ:
    _exit = os._exit

    def _exit_recording(code):
        try:
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            with open(os.path.join(os.environ["BENCH_PEAK_DIR"], "rank_" + os.environ["RANK"]), "w") as f:
                f.write(str(kib * 1024))
        finally:
            _exit(code)

    os._exit = _exit_recording
"""
# glibc serves allocations below its mmap threshold (raised at run time up to 32 MiB) from heaps that
# keep freed memory, one heap per thread: the resident set would then count what a step freed long
# ago, as often as threads freed it. A fixed threshold returns large blocks to the system when they are
# freed, so the peak resident set is the peak of what was held (the same setting before and after).
MMAP_THRESHOLD = 128 * 1024
SETUP_LINE = re.compile(r"set-up peak memory per rank \(GiB\): ([\d. ]+)")


def gpt_weights_bytes(model: dict) -> int:
    module, cfg = load_recipe({"name": "recipes.gpt", **model})
    with torch.device("meta"):
        return sum(p.numel() * p.element_size() for p in module.model(cfg).parameters())


def peak_memory(args: list[str], model: dict, nproc: int, root: Path = ROOT) -> dict:
    """Run `launcher run configs/gpt.yaml --nproc N ARGS` with the GPT of `model` (SGD without momentum,
    2 steps of 4 samples, fp32) and return {"peaks": bytes per rank, "setup": GiB per rank from the launcher's own
    line (None where it prints none), "code", "tail"}."""
    with tempfile.TemporaryDirectory() as tmp:
        hook_dir, peaks_dir = Path(tmp, "hook"), Path(tmp, "peaks")
        hook_dir.mkdir()
        peaks_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(PEAK_HOOK)
        recipe = [f"recipe.{k}={v}" for k, v in {**MEMORY_RECIPE, **model}.items()]
        cmd = launcher_command() + [
            "run", "configs/gpt.yaml", *(["--nproc", str(nproc)] if nproc > 1 else []), *recipe, *args,
            f"run_dir={tmp}/run", "checkpoint.resume=never", "train.global_batch_size=4", "train.micro_batch_size=1",
            "train.max_steps=2", "train.log_every_steps=1", "train.eval_every_steps=null", "train.grad_clip=null",
            "optim.name=sgd", "optim.momentum=0", "optim.lr=0.01", "optim.impl=foreach", "schedule.warmup_steps=0", "precision=fp32",
            "dist.timeout_s=1200"]
        env = {**os.environ, "BENCH_PEAK_DIR": str(peaks_dir), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
               "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
               "PYTHONPATH": os.pathsep.join([str(hook_dir), str(root), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        peaks = [int((peaks_dir / f"rank_{r}").read_text()) if (peaks_dir / f"rank_{r}").is_file() else None
                 for r in range(nproc)]
        found = SETUP_LINE.search(proc.stdout + proc.stderr)
        setup = [float(v) for v in found.group(1).split()] if found else None
        return {"peaks": peaks, "setup": setup, "code": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:],
                "losses": [float(v) for v in re.findall(r"\bloss=([\d.]+)", proc.stdout)]}


def memory(args) -> None:
    nproc = 4
    weights = gpt_weights_bytes(BIG_GPT)
    print(f"== memory: recipes.gpt {BIG_GPT} ({weights / 1e6:.0f} MB of fp32 weights) against {TINY_GPT}, "
          f"--nproc {nproc}, SGD without momentum, 2 steps; peak resident set of each rank", flush=True)
    for label, case in MEMORY_CASES.items():
        if "zero" in label and not installed("deepspeed"):
            print(f"  {label}: deepspeed is not installed")
            continue
        tiny, big = peak_memory(case, TINY_GPT, nproc), peak_memory(case, BIG_GPT, nproc)
        for name, got in (("tiny", tiny), ("big", big)):
            if got["code"] != 0 or None in got["peaks"]:
                print(f"  {label} {name}: exit {got['code']}\n    " + got["tail"].replace("\n", "\n    "))
        if tiny["code"] or big["code"] or None in tiny["peaks"] + big["peaks"]:
            continue
        growth = [(b - t) / weights for b, t in zip(big["peaks"], tiny["peaks"])]
        print(f"  {label}: peak per rank, tiny {' '.join(f'{p / 2**30:.2f}' for p in tiny['peaks'])} GiB, "
              f"large {' '.join(f'{p / 2**30:.2f}' for p in big['peaks'])} GiB")
        print(f"  {label}: growth per rank in fp32 weights: {' '.join(f'{g:.2f}' for g in growth)} "
              f"(rank 0 {growth[0]:.2f} x, ranks 1-{nproc - 1} at most {max(growth[1:]):.2f} x)")
        if big["setup"] and tiny["setup"]:
            setup = [(b - t) * 2**30 / weights for b, t in zip(big["setup"], tiny["setup"])]
            print(f"  {label}: set-up peak growth per rank (the launcher's line): "
                  f"{' '.join(f'{g:.2f}' for g in setup)} x")
        print(f"  {label}: losses {big['losses']}", flush=True)
    one = peak_memory(["strategy=single"], BIG_GPT, 1)  # the same 2 steps: 4 micro-batches of 1 a step
    print(f"  1 process: losses {one['losses']} (exit {one['code']})", flush=True)


# ---------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: mlp 300, gpt 40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: mlp 50, gpt 5)")
    parser.add_argument("--block", type=int, default=None,
                        help="steps a timed block (default: mlp 50, one epoch; gpt 10); --steps rounds up to blocks")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default: 8 step times, 2 start-up, 3 checkpoint)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--optim-impl", choices=list(IMPLS), default="fused",
                        help="the optimizer kernel every loop uses (launcher: optim.impl; its auto picks fused here)")
    parser.add_argument("--log-every", type=int, default=50, help="launcher's train.log_every_steps in step timing")
    parser.add_argument("--profile", action="store_true", help="cProfile the launcher's MLP steps")
    parser.add_argument("--top", type=int, default=25, help="--profile: entries to print")
    parser.add_argument("--profile-timer", choices=["cpu", "wall"], default="cpu", help="--profile: cProfile's clock")
    parser.add_argument("--startup", action="store_true", help="time `launcher run` to its first training step")
    parser.add_argument("--startup-steps", type=int, default=20,
                        help="--startup: train.max_steps for each run (0: the config's own length)")
    parser.add_argument("--checkpoint", action="store_true", help="save (sync, async) and load times")
    parser.add_argument("--ckpt-dir", default=None, help="--checkpoint: where to write (default: the temp dir)")
    parser.add_argument("--ckpt-url", default=None, help="--checkpoint: checkpoint.dir in object storage "
                        "(s3://bucket/prefix; credentials from the environment)")
    parser.add_argument("--moto", action="store_true", help="--checkpoint: to an S3 server of moto's started on the "
                        "loopback (pip install 'moto[server]'), as --ckpt-url s3://bench/ckpt")
    parser.add_argument("--memory", action="store_true", help="peak memory per rank, fsdp and ZeRO-3 on 4 processes")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device == "cuda":
        args.device = "cuda:0"
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {platform.node()}, {os.cpu_count()} CPUs "
          f"({cpu_name()}), Python {platform.python_version()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s)"
          + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""), flush=True)
    if args.startup:
        startup(args)
    elif args.checkpoint and args.moto:
        with moto_server():
            args.ckpt_url = "s3://bench/ckpt"
            checkpoint_times(args)
    elif args.checkpoint:
        checkpoint_times(args)
    elif args.memory:
        memory(args)
    elif args.profile:
        profile(args)
    else:
        step_times(args)


if __name__ == "__main__":
    main()
