"""launcher run | plan | ls | export | slurm | plot | new: the arguments, and which command runs.

Each command lives in its own module (run, plan, export, slurm, plot, new), imported only when
it runs; the checks of the input before any worker are launcher/preflight.py's.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

from . import errors
from .errors import ConfigError
from .fs import error

EPILOG = """\
commands:
  launcher run CONFIG [key=value ...]             train (one process, or the workers of torchrun / srun)
  launcher run CONFIG --nproc 2 strategy=ddp      spawn 2 local workers through torch.distributed.run
  launcher run CONFIG --nproc 8 --nnodes 2:4 --rdzv-endpoint HOST:PORT   elastic: 2 to 4 nodes, each runs this
  torchrun --nproc_per_node 2 -m launcher run CONFIG
  launcher plan CONFIG --nproc 8 [--nnodes 2]     batch math and memory per rank for every strategy, no training
  launcher plan CONFIG --nproc 8 --nnodes 2:4     ... and, a row per node count, what an elastic job meets
  launcher ls [RUN_DIR]                           the recipes and configs that ship, or a run's checkpoints
  launcher export RUN_DIR [--step N | --best] OUT.safetensors
  launcher slurm CONFIG --nodes 4 --gpus-per-node 8 --submit   write RUN_DIR/slurm/job.sbatch and submit it
  launcher k8s CONFIG --nodes 2:4 --image IMAGE --pvc CLAIM    write RUN_DIR/k8s/job.yaml, an elastic PyTorchJob
  launcher plot RUN_DIR [RUN_DIR ...] --out runs.png  loss, lr and throughput of runs, overlaid
  launcher new NAME [--dir DIR]                   write NAME.py and NAME.yaml, a recipe that trains as written

Overrides are dotted key=value pairs after the config, parsed as YAML scalars:
optim.lr=3e-4 recipe.hidden=256 train.max_steps=100.
Exit codes: 0 done, 1 training failed, 2 bad input, 3 stopped by SIGTERM/SIGUSR1 or
Ctrl-C after saving a checkpoint (run the same command again to resume), 130 a second
Ctrl-C stopped it at once (the message says where a rerun resumes).
"""


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="launcher", description="Train a PyTorch recipe on one CPU, "
                                "a workstation's GPUs or a SLURM cluster.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,plan,ls,export,slurm,k8s,plot,new}")

    run = sub.add_parser("run", help="train a config",
                         description="Train CONFIG with optional key=value overrides.\nEvery config key, its type, "
                         "default and meaning: the config reference in README.md\n(generated from launcher/config.py).",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(run)
    run.add_argument("--nproc", type=int, default=None, help="spawn this many local workers (torch.distributed.run)")
    run.add_argument("--nnodes", default=None, metavar="N|MIN:MAX",
                     help="nodes taking part (with --nproc and --rdzv-endpoint; under srun: SLURM_NNODES). MIN:MAX: "
                     "elastic, nodes may leave and join while the job runs (torchrun's c10d rendezvous)")
    run.add_argument("--node-rank", type=int, default=None,
                     help="this node's rank among N nodes (under srun: SLURM_NODEID); none with MIN:MAX")
    run.add_argument("--rdzv-endpoint", default=None,
                     help="host:port every node meets at (multi-node; under srun: the job's first node)")
    run.add_argument("--rdzv-id", default=None,
                     help="MIN:MAX: the job's id, the same on every node (default: the SLURM job id, else one "
                     "derived from the endpoint)")
    run.add_argument("--rdzv-conf", default=None, metavar="KEY=VALUE,...",
                     help="MIN:MAX: settings of torchrun's c10d rendezvous, e.g. last_call_timeout=30,"
                     "keep_alive_interval=5,keep_alive_max_attempt=3 (join_timeout defaults to dist.timeout_s)")
    run.add_argument("--max-restarts", type=int, default=None,
                     help="restart the worker group this often after a failure (a lost node is one); it resumes "
                     "from the newest checkpoint. Default 0, or 3 with MIN:MAX")

    from .plan import add_arguments as add_plan_arguments

    plan = sub.add_parser("plan", help="print the resolved config, batch math and memory per rank for every strategy",
                          description="Check CONFIG and print its batch math and, for its strategy and every other, "
                          "the parameters, gradients and optimizer state each rank holds. Nothing is trained.")
    add_config_args(plan)
    add_plan_arguments(plan)

    ls = sub.add_parser("ls", help="list the recipes and configs that ship, or (RUN_DIR) a run's checkpoints")
    ls.add_argument("run_dir", nargs="?", default=None, help="a run dir: its checkpoints, the latest and the best")

    export = sub.add_parser("export", help="write one consolidated safetensors file from a checkpoint")
    export.add_argument("run_dir")
    export.add_argument("out", help="the .safetensors file to write")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    which.add_argument("--best", action="store_true", help="the checkpoint of the best validation (checkpoint.best)")

    from .slurm import add_arguments as add_slurm_arguments

    slurm = sub.add_parser("slurm", help="write a SLURM batch job for a config (submit it with --submit)",
                           description="Check CONFIG for N nodes x P workers, save it as RUN_DIR/slurm/config.yaml and "
                           "write RUN_DIR/slurm/job.sbatch: one srun task per node starting its workers, requeued "
                           "after a preemption (SIGUSR1) and, a bounded number of times, after a failure.")
    add_config_args(slurm)
    add_slurm_arguments(slurm)

    from .k8s import add_arguments as add_k8s_arguments

    k8s = sub.add_parser("k8s", help="write a Kubernetes manifest (a Kubeflow PyTorchJob) for an elastic job",
                         description="Check CONFIG for MIN to MAX nodes x P workers and write RUN_DIR/k8s/job.yaml: "
                         "a ConfigMap with the resolved config and a Kubeflow PyTorchJob whose pods run `launcher run "
                         "--nnodes MIN:MAX` with the c10d rendezvous. Apply it with kubectl apply -f.")
    add_config_args(k8s)
    add_k8s_arguments(k8s)

    from .plot import add_arguments as add_plot_arguments

    plot = sub.add_parser("plot", help="plot loss, learning rate and throughput of one or more runs",
                          description="Plot train and validation loss, learning rate and throughput against step "
                          "from each RUN_DIR's metrics.jsonl, several runs overlaid (needs the `plot` extra).")
    add_plot_arguments(plot)

    from .new import add_arguments as add_new_arguments

    new = sub.add_parser("new", help="write a new recipe NAME.py and its config NAME.yaml that train as written",
                         description="Write NAME.py (a commented recipe: Config, model, data, loss, eval_step) and "
                         "NAME.yaml beside it; `launcher run NAME.yaml` trains it. Refuses to overwrite.")
    add_new_arguments(new)
    return p, sub.choices


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")


def entry() -> None:
    """The process entry point (the `launcher` script and `python -m launcher`).

    Whatever happened, everything the command wrote is flushed and closed by the time
    main() returns; the process then leaves with os._exit, skipping interpreter
    finalization, where library threads still running (gloo's) could abort a run that
    had finished (docs/design.md, Process exit).
    """
    try:
        code = main()
    except SystemExit as e:  # argparse's usage errors (2) and --help (0)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # a real failure: its traceback, then exit 1
        traceback.print_exc()
        code = 1
    errors.exit_now(code)


def main(argv: list[str] | None = None) -> int:
    top, commands = parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in commands:
        # Options may come after the overrides (`run cfg.yaml a=1 --nproc 2`), which
        # argparse's intermixed parsing allows only on the sub-parser itself.
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = top.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        # Every worker finds the same bad input: one message per node, not one per rank.
        error(str(e))
        return errors.BAD_INPUT


def command(module: str, name: str):
    """The command `name` of launcher/<module>.py, imported when it runs (torch only where needed)."""

    def run(args) -> int:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(args)

    return run


def cmd_ls(args=None) -> int:
    import ast

    if args is not None and args.run_dir:
        from .export import list_checkpoints

        return list_checkpoints(Path(args.run_dir))

    root = Path(__file__).resolve().parent.parent
    recipes = sorted((root / "recipes").glob("*.py"))
    print("recipes:")
    for path in recipes:
        if path.name != "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            print(f"  recipes.{path.stem:<20} {doc.splitlines()[0] if doc else ''}")
    print("configs:")
    for base in dict.fromkeys([Path.cwd() / "configs", root / "configs"]):
        for path in sorted(base.glob("*.yaml")):
            first = path.read_text().splitlines()[:1]
            desc = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
            print(f"  {os.path.relpath(path):<30} {desc}")
    return 0


COMMANDS = {
    "run": command("run", "cmd_run"),
    "plan": command("plan", "cmd_plan"),
    "ls": cmd_ls,
    "export": command("export", "cmd_export"),
    "slurm": command("slurm", "cmd_slurm"),
    "k8s": command("k8s", "cmd_k8s"),
    "plot": command("plot", "cmd_plot"),
    "new": command("new", "cmd_new"),
}
