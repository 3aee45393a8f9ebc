"""launcher slurm: write a SLURM batch job for a config, and optionally submit it.

`launcher slurm CONFIG [key=value ...] --nodes N [--gpus-per-node G] [--submit]` checks the
config for a world of N x P workers (as `launcher run` would), saves the resolved config as
RUN_DIR/slurm/config.yaml (so that editing the YAML later cannot change a queued job),
and writes RUN_DIR/slurm/job.sbatch: one srun task per node, each starting that node's P
workers with `launcher run --nproc P`, requeued after a preemption and (a bounded number
of times) after a failure.

`--nodes MIN-MAX` (sbatch's node range) writes an elastic job: `#SBATCH --nodes=MIN-MAX` and
`--no-kill`, NODE_RANGE=MIN:MAX, and each node's task runs `launcher run --nproc P --nnodes
MIN:MAX` (torchrun's c10d rendezvous), so that the job goes on when a node other than the
first is lost. The config is checked at every world size from MIN x P to MAX x P.

The job's shell body (JOB_BODY) is shared word for word with slurm/train.sbatch and
slurm/train_srun.sbatch; tests/test_slurm.py checks that they agree.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import ConfigError, dump_config, load_config
from .fs import replaced_atomically, say

# Seconds of warning before the time limit (SIGUSR1 to every task): enough for the
# current step to end and one checkpoint to be written, with a margin (SLURM may send it
# up to a minute early, never late).
SIGNAL_WARNING_S = 180

# A shorter time limit would have every attempt warned (and requeued) soon after it starts.
MIN_TIME_S = 600

BODY_START = "# ---------------------------------------------------------------- launcher job body"
BODY_END = "# ---------------------------------------------------------------- end of launcher job body"

JOB_BODY = BODY_START + r"""
# The same in slurm/train.sbatch, slurm/train_srun.sbatch and the job.sbatch that
# `launcher slurm` writes. Set above: CONFIG, OVERRIDES (an array), LAUNCH (node: one srun
# task per node starting NPROC_PER_NODE workers with `launcher run --nproc`; task: one
# srun task per worker) and, for LAUNCH=node, NPROC_PER_NODE and optionally NODE_RANGE.
#
# NODE_RANGE=MIN:MAX (LAUNCH=node; empty: a fixed number of nodes) makes the job elastic: it
# was submitted with --nodes MIN-MAX --no-kill, every node runs the same `launcher run --nproc P
# --nnodes MIN:MAX` (torchrun's c10d rendezvous, hosted by the first node), and srun keeps the
# other tasks running when one ends or its node is lost: the remaining nodes restart at the
# smaller world size from the newest checkpoint. The first node's task decides the outcome
# (losing that node, which also runs this script, ends the job).
#
# What happens when the run ends, by its exit code:
#   0      finished: the job ends (COMPLETED).
#   2      bad input (config, recipe): the job ends with 2; a requeue would fail the same way.
#   3      stopped by SIGUSR1 (the --signal warning, `scancel --signal=USR1 JOB`) after saving
#          a checkpoint: the job requeues itself (`scontrol requeue`) and resumes from it.
#   other  failed: requeued while SLURM_RESTART_COUNT < LAUNCHER_MAX_FAILURES (default 3),
#          then the job ends with that code. SLURM_RESTART_COUNT counts every requeue of
#          the job, preemptions included.
# A job SLURM ends itself (scancel, time limit, preemption: SIGTERM to every process) saves a
# checkpoint if it can within KillWait, but is not requeued by this script (preemption with
# PreemptMode=REQUEUE requeues it); nor are tasks sent SIGTERM alone (`scancel --signal=TERM`).
# Submit the same job again to resume.
#
# Signals: SLURM sends --signal and `scancel --signal` to the job steps, i.e. to every process
# of the srun tasks (launcher passes it on to its workers as well). The batch shell itself
# only gets them with B: (`--signal=B:USR1@180`, `scancel --batch`): it then forwards
# SIGUSR1 to srun, which forwards it to the tasks. Do not use `scancel --full`: the tasks
# would get the signal twice.
set -uo pipefail

if [ -n "${LAUNCHER_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$LAUNCHER_VENV/bin/activate"
fi
PY=${LAUNCHER_PYTHON:-python3}
export PYTHONUNBUFFERED=1
JOB_REF=$SLURM_JOB_ID
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then JOB_REF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi
RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_FAILURES=${LAUNCHER_MAX_FAILURES:-3}
say() { echo "[launcher-slurm] job $JOB_REF attempt $((RESTARTS + 1)): $*"; }

# Every attempt must use the same run dir, so that a requeued job resumes: the config's
# run_dir, else one named after the job (the job id does not change on a requeue).
if ! grep -qE '^run_dir[[:space:]]*:' "$CONFIG" && ! printf '%s\n' "${OVERRIDES[@]}" | grep -q '^run_dir='; then
    OVERRIDES+=("run_dir=runs/${SLURM_JOB_NAME//[^A-Za-z0-9_.-]/_}-$JOB_REF")
fi

# Where the workers meet: the first node of the job (MASTER_ADDR / MASTER_PORT win when set,
# e.g. MASTER_ADDR=127.0.0.1 where node names do not resolve), a port derived from the job id.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}

# Each srun task runs TASK (below) around the launcher: it reports 0, or 20 + the launcher's
# exit code (21 failed, 22 bad input, 23 stopped after a checkpoint), or 10 when SLURM ended it
# with SIGTERM. srun exits with the highest task code, so the task that ended first decides,
# not the ones srun ended after it (--kill-on-bad-exit: once one task exits non-zero, srun
# ends the others, which would otherwise wait on a dead peer until dist.timeout_s).
# Elastic (NODE_RANGE): srun ends no task (--kill-on-bad-exit=0 --no-kill), and a lost node's
# task counts in srun's code (137: killed), so the first node's task, the rendezvous host,
# also writes its code to FIRST_TASK_RC on its node, the one this script runs on; that code decides.
TASK='trap "ended=1" TERM
trap ":" USR1  # SIGUSR1 reaches every process of the step: this shell keeps running, the launcher acts on it
if [ "$LAUNCH" = node ] && [ -n "$NODE_RANGE" ]; then
    # No node rank: each rendezvous numbers the nodes. The first node hosts it (is_host), at
    # MASTER_ADDR:MASTER_PORT, which must name that node (127.0.0.1 would match every node).
    set -- "$@" --nproc "$NPROC_PER_NODE" --nnodes "$NODE_RANGE" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
        --rdzv-conf "is_host=$((SLURM_NODEID == 0))"
elif [ "$LAUNCH" = node ]; then
    set -- "$@" --nproc "$NPROC_PER_NODE" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
        --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
fi
"$@" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"
rc=$?
if [ "$rc" -eq 0 ]; then code=0
elif [ -n "${ended:-}" ]; then code=10
elif [ "$rc" -le 3 ]; then code=$((20 + rc))
else code=21
fi
if [ -n "$NODE_RANGE" ] && [ "$SLURM_NODEID" -eq 0 ]; then echo "$code" >"$FIRST_TASK_RC"; fi
exit "$code"'
NODE_RANGE=${NODE_RANGE:-}
FIRST_TASK_RC=${TMPDIR:-/tmp}/launcher-$SLURM_JOB_ID.first-task-rc
export LAUNCH NPROC_PER_NODE=${NPROC_PER_NODE:-1} NODE_RANGE FIRST_TASK_RC
# LAUNCH=node: how long torch.distributed.run waits for its workers to save and exit after
# passing a signal on, before it kills them (torch's default, 30 s, is less than a large
# checkpoint takes). Keep it below the --signal warning.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}
SRUN=(srun --kill-on-bad-exit=1)
if [ -n "$NODE_RANGE" ]; then
    MIN_NODES=${NODE_RANGE%%:*} MAX_NODES=${NODE_RANGE##*:}
    if [ "$LAUNCH" != node ]; then
        say "NODE_RANGE=$NODE_RANGE (elastic) needs one task per node (LAUNCH=node), not LAUNCH=$LAUNCH: not started"
        exit 2
    fi
    if [ "$SLURM_JOB_NUM_NODES" -lt "$MIN_NODES" ] || [ "$SLURM_JOB_NUM_NODES" -gt "$MAX_NODES" ]; then
        say "the job has $SLURM_JOB_NUM_NODES node(s), outside NODE_RANGE=$NODE_RANGE: submit it with --nodes $MIN_NODES-$MAX_NODES"
        exit 2
    fi
    # A task that ends (a lost node) leaves the others running: they go on with fewer nodes.
    SRUN=(srun --kill-on-bad-exit=0 --no-kill)
    rm -f "$FIRST_TASK_RC"
fi
# srun of SLURM 22.05 and 23.02 does not take --cpus-per-task from the job: pass it on.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
CMD=("$PY" -m launcher run "$CONFIG" "${OVERRIDES[@]}")
if [ "$LAUNCH" = node ] && [ -n "$NODE_RANGE" ]; then
    SRUN+=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1)
    SHOW="$SLURM_JOB_NUM_NODES task(s), one per node (elastic, $MIN_NODES to $MAX_NODES nodes): ${CMD[*]}"
    SHOW+=" --nproc $NPROC_PER_NODE --nnodes $NODE_RANGE --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT"
elif [ "$LAUNCH" = node ]; then
    SRUN+=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1)
    SHOW="$SLURM_JOB_NUM_NODES task(s), one per node: ${CMD[*]} --nproc $NPROC_PER_NODE"
    SHOW+=" --nnodes $SLURM_JOB_NUM_NODES --node-rank \$SLURM_NODEID --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT"
else
    SHOW="${SLURM_NTASKS:-?} task(s), one per worker: ${CMD[*]} (rendezvous $MASTER_ADDR:$MASTER_PORT)"
fi
say "$(date '+%F %T') on $SLURM_JOB_NODELIST, restarts so far $RESTARTS; $SHOW"

TERMINATED=
on_usr1() {
    say "SIGUSR1 reached the batch shell: passing it to srun"
    kill -USR1 "$SRUN_PID" 2>/dev/null
}
on_term() {
    TERMINATED=1
    say "SIGTERM: SLURM is ending the job (cancelled, out of time or preempted); the workers save a checkpoint"
}
trap on_usr1 USR1
trap on_term TERM
"${SRUN[@]}" bash -c "$TASK" launcher-task "${CMD[@]}" &
SRUN_PID=$!
# A trapped signal interrupts `wait`: wait again until srun has really exited.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"
SRUN_RC=$?
if [ -n "$NODE_RANGE" ]; then
    FIRST_RC=$(cat "$FIRST_TASK_RC" 2>/dev/null)
    rm -f "$FIRST_TASK_RC"
    if [ -n "$FIRST_RC" ] && [ "$FIRST_RC" != "$SRUN_RC" ]; then
        say "srun exit $SRUN_RC: a task ended otherwise (a lost node is 137); the first node's, which hosts the" \
            "rendezvous, reported $FIRST_RC: going by it"
        SRUN_RC=$FIRST_RC
    fi
fi
case $SRUN_RC in
    0) RC=0 ;;
    21 | 22 | 23) RC=$((SRUN_RC - 20)) ;;
    10) RC=143 ;;                  # every task was ended by SIGTERM
    *) RC=$SRUN_RC ;;              # srun itself failed (no step, a node lost): a failure
esac

requeue() {
    say "$1: requeueing the job (scontrol requeue $JOB_REF)"
    if ! scontrol requeue "$JOB_REF"; then
        say "scontrol requeue failed (a job submitted with --no-requeue, or JobRequeue=0 without --requeue):" \
            "submit the same job again to resume"
    fi
    exit "$RC"
}
if [ "$RC" -eq 0 ]; then
    say "finished"
    exit 0
elif [ -n "$TERMINATED" ]; then
    say "ended by SLURM (exit $RC): not requeued by this script; submit the job again to resume from its latest checkpoint"
    exit "$RC"
elif [ "$RC" -eq 2 ]; then
    say "bad input (exit 2): not requeued; fix the config or command and submit again"
    exit 2
elif [ "$RC" -eq 3 ]; then
    requeue "stopped by a signal after saving a checkpoint (exit 3)"
elif [ "$RC" -eq 143 ]; then
    say "the tasks were ended by SIGTERM (exit 143): not requeued"
    exit "$RC"
elif [ "$RESTARTS" -lt "$MAX_FAILURES" ]; then
    requeue "failed (exit $RC); restart $((RESTARTS + 1)) of at most $MAX_FAILURES (LAUNCHER_MAX_FAILURES)"
else
    say "failed (exit $RC) after $RESTARTS restart(s), the most LAUNCHER_MAX_FAILURES=$MAX_FAILURES allows: not requeued"
    exit "$RC"
fi
""" + BODY_END + "\n"

NCCL_NOTES = """\
# The job sees the environment sbatch ran in (sbatch's default --export=ALL). On every node:
# export LAUNCHER_VENV=/shared/launcher/.venv  # a virtualenv to activate (on a filesystem every node sees)
# export LAUNCHER_PYTHON=python3               # the interpreter (conda: the env's python)
# export LAUNCHER_MAX_FAILURES=3               # requeues after a failed run (exit 1), counted by SLURM_RESTART_COUNT
# export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=170    # one task per node: how long torchrun lets its workers save after a
#                                             # signal (default here 170 s; keep it below the --signal warning)
# GPU clusters (NCCL):
# export NCCL_SOCKET_IFNAME=ib0                # the interface the nodes reach each other on (never lo or docker0)
# export NCCL_IB_HCA=mlx5                      # the InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                     # no InfiniBand: plain TCP sockets
# export NCCL_DEBUG=INFO                       # the transports NCCL chose; the first thing to turn on in a hang
# CPU-only clusters (gloo):
# export GLOO_SOCKET_IFNAME=eth0               # the interface for gloo, when the default one is wrong
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `launcher slurm` (CONFIG and the overrides are added by the CLI)."""
    p.add_argument("--nodes", required=True, metavar="N|MIN-MAX",
                   help="nodes to run on (N); MIN-MAX: an elastic job that starts on what SLURM gives it in that "
                   "range and goes on when a node (other than the first) is lost")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs to ask for on each node (G); leave out on a CPU-only cluster")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="workers per node (P): default G, or 1 without --gpus-per-node")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores for each node's task (its workers and their data loaders)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (SIGUSR1 comes "
                   f"{SIGNAL_WARNING_S} s before it: the job checkpoints and requeues itself)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    p.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job")
    p.add_argument("--job-name", default=None, help="default: the run dir's name")
    p.add_argument("--extra-sbatch", action="append", default=[], metavar="OPTIONS",
                   help='more #SBATCH options, e.g. --extra-sbatch="--reservation=big --mail-type=END" '
                        '(write it with = so that the value may start with --)')
    p.add_argument("--submit", action="store_true", help="submit the job with sbatch and print its id and log")
    p.add_argument("--test-only", action="store_true",
                   help="ask the scheduler (sbatch --test-only) when and where the job would start; submit nothing")


def cmd_slurm(args) -> int:
    from .preflight import check_inputs, check_node_range, parse_nodes, workers_per_node

    nproc = workers_per_node(args.gpus_per_node, args.nproc_per_node)
    min_nodes, nodes = parse_nodes(args.nodes, "--nodes", "-")  # nodes: the most the job may run on
    unlimited = (args.time or "").upper() in ("INFINITE", "UNLIMITED")
    limit = slurm_minutes(args.time) if args.time and not unlimited else None
    if args.time and not unlimited and limit is None:
        raise ConfigError(f"--time {args.time}: not a SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                          "D-HH:MM:SS)")
    if limit is not None and limit * 60 < MIN_TIME_S:
        raise ConfigError(f"--time {args.time} is too short: SIGUSR1 comes {SIGNAL_WARNING_S} s before the limit (SLURM "
                          f"may send it a minute earlier), so every attempt would stop and requeue before getting "
                          f"anywhere; ask for at least {MIN_TIME_S // 60} minutes")
    if (args.submit or args.test_only) and shutil.which("sbatch") is None:
        what = "--submit" if args.submit else "--test-only"
        raise ConfigError(f"{what} needs SLURM's sbatch, which is not on PATH: run this on a SLURM login node "
                          "(or leave out --submit/--test-only, copy RUN_DIR/slurm/ there and run sbatch on job.sbatch)")

    cfg = load_config(args.config, args.overrides)
    check_node_range(cfg, nproc, min_nodes, nodes)  # every world size an elastic job may take
    check_inputs(cfg, nodes * nproc, args.config, elsewhere=True)
    run_dir = Path(cfg.run_dir).resolve()
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    config_path = slurm_dir / "config.yaml"
    dump_config(cfg, config_path)
    job_name = args.job_name or re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name) or "launcher"
    script = render(args, config_path=config_path, job_name=job_name, nproc=nproc, slurm_dir=slurm_dir,
                    origin=" ".join([args.config, *args.overrides]), min_nodes=min_nodes, max_nodes=nodes)
    script_path = slurm_dir / "job.sbatch"
    with replaced_atomically(script_path) as tmp:
        tmp.write_text(script)
        tmp.chmod(0o755)

    print(script, end="")
    if min_nodes < nodes:
        shape = (f"elastic: {min_nodes} to {nodes} node(s) x {nproc} worker(s), world size {min_nodes * nproc} to "
                 f"{nodes * nproc}")
    else:
        shape = f"{nodes} node(s) x {nproc} worker(s), world size {nodes * nproc}"
    say(f"# wrote {script_path} ({shape}); it runs the config saved as {config_path}")
    if args.test_only:
        proc = subprocess.run(["sbatch", "--test-only", str(script_path)], capture_output=True, text=True)
        said = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise ConfigError(f"the scheduler refuses this job: {said or 'sbatch --test-only failed'}")
        print(f"sbatch --test-only (nothing submitted): {said}")
    if args.submit:
        proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"sbatch refused the job: {(proc.stdout + proc.stderr).strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        print(f"submitted job {job_id}\nlog: {slurm_dir / f'{job_name}-{job_id}.out'}\nrun dir: {run_dir}")
    elif not args.test_only:
        say(f"submit with: sbatch {script_path}")
    return 0


def slurm_minutes(text: str) -> float | None:
    """A SLURM time limit in minutes: "90", "30:00", "2:00:00", "1-12", "1-12:30", "1-12:30:00"; None if not one."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        return None
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    if c is not None:  # HH:MM:SS
        return a * 60 + b + c / 60
    if b is not None:  # MM:SS
        return a + b / 60
    return float(a)  # minutes


def sbatch_line(option: str, value=None) -> str:
    if value is None:
        return f"#SBATCH {option}"
    value = str(value)
    if re.search(r"\s", value):
        value = '"' + value.replace('"', '\\"') + '"'
    return f"#SBATCH {option}={value}"


def extra_lines(extras: list[str]) -> list[str]:
    """'--reservation=big --mail-type END' -> one #SBATCH line per option."""
    lines: list[list[str]] = []
    for text in extras:
        for token in shlex.split(text):
            if token.startswith("-") or not lines:
                lines.append([token])
            else:
                lines[-1].append(token)
    return ["#SBATCH " + " ".join(shlex.quote(t) for t in line) for line in lines]


def render(args, *, config_path: Path, job_name: str, nproc: int, slurm_dir: Path, origin: str,
           min_nodes: int, max_nodes: int) -> str:
    """The batch script: #SBATCH options, the job's settings, then JOB_BODY."""
    elastic = min_nodes < max_nodes
    options: list[tuple[str, str]] = [
        (sbatch_line("--job-name", job_name), ""),
        (sbatch_line("--nodes", f"{min_nodes}-{max_nodes}" if elastic else max_nodes),
         "elastic: SLURM starts it on MIN to MAX nodes" if elastic else ""),
    ]
    if elastic:
        # No --ntasks-per-node: with it, SLURM (22.05) sizes the job to MIN tasks and so MIN nodes even when
        # more are idle. srun starts one task per node all the same.
        options.append((sbatch_line("--no-kill"), "a failed node does not end the job: the others go on without it"))
    else:
        options.append((sbatch_line("--ntasks-per-node", 1), "one launcher per node; it starts the node's workers"))
    if args.gpus_per_node:
        options.append((sbatch_line("--gpus-per-node", args.gpus_per_node), "= workers per node"
                        if nproc == args.gpus_per_node else ""))
    for option, value in (("--cpus-per-task", args.cpus_per_task), ("--partition", args.partition),
                          ("--time", args.time), ("--account", args.account), ("--qos", args.qos),
                          ("--constraint", args.constraint), ("--mem", args.mem)):
        if value is not None:
            options.append((sbatch_line(option, value), ""))
    if args.exclusive:
        options.append((sbatch_line("--exclusive"), ""))
    options += [
        (sbatch_line("--requeue"), "the job may requeue itself (and SLURM may, after a node failure)"),
        (sbatch_line("--signal", f"USR1@{SIGNAL_WARNING_S}"),
         "before the time limit, to every task: checkpoint, exit 3, requeue"),
        (sbatch_line("--open-mode", "append"), "a requeued job appends to its log"),
        (sbatch_line("--output", f"{slurm_dir}/%x-%j.out"), ""),
        (sbatch_line("--chdir", Path.cwd()), "relative paths in the config mean what they meant here"),
        *((line, "") for line in extra_lines(args.extra_sbatch)),
    ]
    width = max(len(line) for line, comment in options if comment) + 2
    sbatch_lines = [f"{line:<{width}}# {comment}" if comment else line for line, comment in options]
    settings = [f"CONFIG={shlex.quote(str(config_path))}   # the resolved config, saved when the job was written",
                "OVERRIDES=()",
                "LAUNCH=node",
                f"NPROC_PER_NODE={nproc}"]
    settings.append(f"NODE_RANGE={min_nodes}:{max_nodes}   # elastic: launcher run --nnodes {min_nodes}:{max_nodes}"
                    if elastic else "NODE_RANGE=   # a fixed number of nodes (MIN:MAX: elastic)")
    if sys.prefix != sys.base_prefix:  # written from a virtualenv: the job uses the same one
        settings.append(f"LAUNCHER_VENV=${{LAUNCHER_VENV-{shlex.quote(sys.prefix)}}}")
    else:
        settings.append(f"LAUNCHER_PYTHON=${{LAUNCHER_PYTHON:-{shlex.quote(sys.executable)}}}")
    header = [
        "#!/bin/bash",
        f"# Written by `launcher slurm` on {time.strftime('%Y-%m-%d %H:%M:%S')} from: {origin}",
        f"# {f'{min_nodes} to {max_nodes} (elastic)' if elastic else max_nodes} node(s) x {nproc} worker(s) per node. "
        f"Submit: sbatch {slurm_dir / 'job.sbatch'}",
        "# (sbatch options on the command line override the #SBATCH lines below).",
        *sbatch_lines,
        "",
        *settings,
        "",
        NCCL_NOTES,
    ]
    return "\n".join(header) + JOB_BODY


def body_of(script: str) -> str:
    """The shared part of a batch script, from BODY_START to BODY_END (for the consistency test)."""
    start, end = script.find(BODY_START), script.find(BODY_END)
    if start < 0 or end < 0:
        raise ValueError("no launcher job body in this script")
    return script[start:end + len(BODY_END)] + "\n"
