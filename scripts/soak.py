"""Soak test: many complete short training runs per strategy, through the real CLI.

    python scripts/soak.py --runs N [--strategies single,ddp,fsdp,zero1,zero2,zero3]
                           [--out DIR] [--keep] [--timeout SECONDS]

Each run is `python -m launcher run configs/digits.yaml` in a subprocess (2 workers
through --nproc, except `single`): 12 steps, a checkpoint every 4, then the final
checkpoint and validation. Strategies are interleaved round-robin so that machine
noise spreads evenly over them, and checkpoint saves alternate between sync and
async (DeepSpeed saves are always sync, so its runs stay sync).

A run fails when its exit code is not 0, when it outlives --timeout (it is then
killed with its workers; the table counts it among the other failures), or when its
run dir lacks the final checkpoint (`checkpoints/latest` naming step_000012, with
meta.json in it) or the final validation row in metrics.jsonl. Rare failures (a
crash at exit one run in ten, say) are what this is for: a single run proves little.

A failed run's command, exit code and output tail are printed and its run dir is
kept; other run dirs are deleted after checking unless --keep is given. Exit 1 if
any run failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/digits.yaml"
MAX_STEPS = 12
EVERY_STEPS = 4

# name -> (worker processes, strategy overrides, whether async saves apply)
STRATEGIES = {
    "single": (1, ["strategy=single"], True),
    "ddp": (2, ["strategy=ddp"], True),
    "fsdp": (2, ["strategy=fsdp"], True),
    "zero1": (2, ["strategy=deepspeed", "deepspeed.zero_stage=1"], False),
    "zero2": (2, ["strategy=deepspeed", "deepspeed.zero_stage=2"], False),
    "zero3": (2, ["strategy=deepspeed", "deepspeed.zero_stage=3"], False),
}


@dataclass
class Result:
    strategy: str
    index: int
    async_save: bool
    run_dir: Path
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def nonzero_exit(self) -> bool:
        """It ended on its own with an exit code other than 0 (a run killed for the timeout is an "other failure")."""
        return not self.timed_out and self.returncode not in (0, None)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems


def child_env() -> dict:
    """This environment without any launcher's rank variables, one thread per process, the repo importable."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def command(strategy: str, run_dir: Path, async_save: bool) -> list[str]:
    nproc, overrides, _ = STRATEGIES[strategy]
    cmd = [sys.executable, "-m", "launcher", "run", CONFIG]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return cmd + overrides + [
        f"run_dir={run_dir}",
        "train.global_batch_size=64", "train.micro_batch_size=32",
        f"train.max_steps={MAX_STEPS}", f"checkpoint.every_steps={EVERY_STEPS}", f"train.log_every_steps={EVERY_STEPS}",
        f"checkpoint.async={'true' if async_save else 'false'}",
        "log.progress=lines",
    ]


def check_outputs(run_dir: Path) -> list[str]:
    """What the run dir lacks of a finished run: the final checkpoint and the final validation row."""
    problems = []
    final = f"step_{MAX_STEPS:06d}"
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        problems.append("no checkpoints/latest")
    elif latest.read_text().strip() != final:
        problems.append(f"checkpoints/latest names {latest.read_text().strip()!r}, not {final}")
    elif not (run_dir / "checkpoints" / final / "meta.json").is_file():
        problems.append(f"checkpoints/{final} is missing or has no meta.json")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        problems.append("no metrics.jsonl")
    else:
        rows = []
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                problems.append(f"metrics.jsonl has a line that is not JSON: {line[:80]!r}")
        if not any(r.get("split") == "val" and r.get("step") == MAX_STEPS for r in rows):
            problems.append(f"metrics.jsonl has no validation row at step {MAX_STEPS}")
    return problems


def run_one(result: Result, timeout: float) -> tuple[str, str]:
    """Run it, fill in the result; returns (stdout, stderr).

    The output goes to files in the run dir, not pipes: a worker orphaned by a crash
    could hold a pipe open long after the run ended."""
    cmd = command(result.strategy, result.run_dir, result.async_save)
    result.run_dir.mkdir(parents=True)
    out_path, err_path = result.run_dir / "soak.stdout.txt", result.run_dir / "soak.stderr.txt"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own: end the whole tree by pid.
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            result.timed_out = True
            result.problems.append(f"timed out after {timeout:.0f} s (killed with its workers)")
    result.seconds = time.perf_counter() - start
    result.returncode = proc.returncode
    if not result.timed_out:
        result.problems += check_outputs(result.run_dir)
    return out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


def descendants(root: int) -> list[int]:
    """The pids below `root` in the process tree (from /proc; children before their children's children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def report_failure(result: Result, stdout: str, stderr: str) -> None:
    cmd = " ".join(command(result.strategy, result.run_dir, result.async_save))
    print(f"  command: {cmd}")
    print(f"  exit code: {result.returncode}")
    for problem in result.problems:
        print(f"  problem: {problem}")
    print(f"  run dir kept: {result.run_dir} (the whole output in soak.stdout.txt, soak.stderr.txt)")
    print("  ---- stdout (tail) ----")
    print(indent(stdout[-3000:]))
    print("  ---- stderr (tail) ----")
    print(indent(stderr[-6000:]))
    print("  ----", flush=True)


def indent(text: str) -> str:
    return "\n".join("  | " + line for line in text.rstrip().splitlines())


def table(results: list[Result], strategies: list[str]) -> str:
    header = f"{'strategy':<10} {'runs':>5} {'non-zero exits':>15} {'other failures':>15} {'median s':>9}"
    lines = [header, "-" * len(header)]
    for name in strategies:
        mine = [r for r in results if r.strategy == name]
        nonzero = sum(r.nonzero_exit for r in mine)
        other = sum(not r.ok and not r.nonzero_exit for r in mine)
        median = statistics.median(r.seconds for r in mine) if mine else float("nan")
        lines.append(f"{name:<10} {len(mine):>5} {nonzero:>15} {other:>15} {median:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, required=True, help="complete runs per strategy")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all)")
    p.add_argument("--out", default=None, help="where the run dirs go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep every run dir (failed runs' dirs are always kept)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take before it counts as hung")
    args = p.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies or args.runs < 1:
        p.error(f"--runs must be >= 1 and --strategies a comma-separated subset of {', '.join(STRATEGIES)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="launcher-soak-"))
    out.mkdir(parents=True, exist_ok=True)

    # Round-robin: run i of every strategy before run i+1 of any. Sync and async saves
    # alternate per strategy, and start staggered across strategies, so one run each
    # still covers both kinds.
    plan = [(i, j, name) for i in range(args.runs) for j, name in enumerate(strategies)]
    print(f"soak: {args.runs} run(s) x {len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'} "
          f"({', '.join(strategies)}), {MAX_STEPS} steps each, run dirs under {out}", flush=True)
    results: list[Result] = []
    for n, (i, j, name) in enumerate(plan, 1):
        async_save = STRATEGIES[name][2] and (i + j) % 2 == 1
        result = Result(name, i, async_save, out / f"{name}-{i:03d}")
        shutil.rmtree(result.run_dir, ignore_errors=True)
        stdout, stderr = run_one(result, args.timeout)
        results.append(result)
        status = "ok" if result.ok else (f"FAILED (exit {result.returncode})" if result.nonzero_exit else "FAILED")
        print(f"[{n}/{len(plan)}] {name:<7} run {i + 1} {'async' if async_save else 'sync '} "
              f"{result.seconds:6.1f} s  {status}", flush=True)
        if not result.ok:
            report_failure(result, stdout, stderr)
        elif not args.keep:
            shutil.rmtree(result.run_dir, ignore_errors=True)

    print()
    print(table(results, strategies))
    failed = [r for r in results if not r.ok]
    if not args.keep and not args.out and not any(out.iterdir()):
        out.rmdir()
    if failed:
        print(f"\n{len(failed)} of {len(results)} runs failed; their run dirs are kept under {out}")
        return 1
    print(f"\nall {len(results)} runs passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
