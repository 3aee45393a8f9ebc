"""launcher run | plan | ls | export | slurm | plot | new.

Every check of the user's input (config, overrides, recipe contract, batch sizes,
optional dependencies, the run directory) runs here, once, before any worker.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .config import Config, ConfigError, load_config

EPILOG = """\
commands:
  launcher run CONFIG [key=value ...]             train (one process, or the workers of torchrun / srun)
  launcher run CONFIG --nproc 2 strategy=ddp      spawn 2 local workers through torch.distributed.run
  torchrun --nproc_per_node 2 -m launcher run CONFIG
  launcher plan CONFIG --nproc 8 [--nnodes 2]     batch math and memory per rank for every strategy, no training
  launcher ls                                     the recipes and configs that ship
  launcher export RUN_DIR [--step N] OUT.safetensors
  launcher slurm CONFIG --nodes 4 --gpus-per-node 8 --submit   write RUN_DIR/slurm/job.sbatch and submit it
  launcher plot RUN_DIR [RUN_DIR ...] --out runs.png  loss, lr and throughput of runs, overlaid
  launcher new NAME [--dir DIR]                   write NAME.py and NAME.yaml, a recipe that trains as written

Overrides are dotted key=value pairs after the config, parsed as YAML scalars:
optim.lr=3e-4 recipe.hidden=256 train.max_steps=100.
Exit codes: 0 done, 1 training failed, 2 bad input, 3 stopped by SIGTERM/SIGUSR1
after saving a checkpoint (run the same command again to resume).
"""


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="launcher", description="Train a PyTorch recipe on one CPU, "
                                "a workstation's GPUs or a SLURM cluster.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,plan,ls,export,slurm,plot,new}")

    run = sub.add_parser("run", help="train a config",
                         description="Train CONFIG with optional key=value overrides.\nEvery config key, its type, "
                         "default and meaning: the config reference in README.md\n(generated from launcher/config.py).",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(run)
    run.add_argument("--nproc", type=int, default=None, help="spawn this many local workers (torch.distributed.run)")
    run.add_argument("--nnodes", type=int, default=None,
                     help="nodes taking part (with --nproc and --rdzv-endpoint; under srun: SLURM_NNODES)")
    run.add_argument("--node-rank", type=int, default=None, help="this node's rank among --nnodes (under srun: SLURM_NODEID)")
    run.add_argument("--rdzv-endpoint", default=None,
                     help="host:port every node meets at (multi-node; under srun: the job's first node)")
    run.add_argument("--max-restarts", type=int, default=0,
                     help="restart the worker group this often after a failure; it resumes from the latest checkpoint")

    from .plan import add_arguments as add_plan_arguments

    plan = sub.add_parser("plan", help="print the resolved config, batch math and memory per rank for every strategy",
                          description="Check CONFIG and print its batch math and, for its strategy and every other, "
                          "the parameters, gradients and optimizer state each rank holds. Nothing is trained.")
    add_config_args(plan)
    add_plan_arguments(plan)

    sub.add_parser("ls", help="list the recipes and configs that ship")

    export = sub.add_parser("export", help="write one consolidated safetensors file from a checkpoint")
    export.add_argument("run_dir")
    export.add_argument("out", help="the .safetensors file to write")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")

    from .slurm import add_arguments as add_slurm_arguments

    slurm = sub.add_parser("slurm", help="write a SLURM batch job for a config (submit it with --submit)",
                           description="Check CONFIG for N nodes x P workers, save it as RUN_DIR/slurm/config.yaml and "
                           "write RUN_DIR/slurm/job.sbatch: one srun task per node starting its workers, requeued "
                           "after a preemption (SIGUSR1) and, a bounded number of times, after a failure.")
    add_config_args(slurm)
    add_slurm_arguments(slurm)

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
    exit_now(code)


def first_on_node() -> bool:
    """False in the workers of a node other than the first (torchrun and srun number them)."""
    return os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"


def exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


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
        if args.command == "run":
            return cmd_run(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "ls":
            return cmd_ls()
        if args.command == "export":
            return cmd_export(args)
        if args.command == "slurm":
            from .slurm import cmd_slurm

            return cmd_slurm(args)
        if args.command == "plot":
            from .plot import cmd_plot

            return cmd_plot(args)
        if args.command == "new":
            from .new import cmd_new

            return cmd_new(args)
    except ConfigError as e:
        # Every worker finds the same bad input: one message per node, not one per rank.
        if first_on_node():
            print(f"error: {e}", file=sys.stderr)
        return errors.BAD_INPUT
    return errors.DONE


# ---------------------------------------------------------------- run


def check_inputs(cfg: Config, world_size: int, origin: str, report_only: bool = False):
    """Everything about the input that can be wrong, checked once in the launching process,
    cheapest first; the recipe's data() is built last, to check it and its size. report_only
    (launcher plan) changes nothing on disk: a damaged checkpoint is not set aside."""
    import torch

    from .checkpoint import resume_source
    from .recipe import Recipe
    from .strategies import resolve_name
    from .stream import train_length
    from .trainer import batch_plan

    recipe = Recipe.load(cfg.recipe, origin)
    recipe.check_optimization()
    report_replaced_sections(cfg, recipe)
    plan = batch_plan(cfg, world_size)
    strategy = resolve_name(cfg.strategy, world_size)
    if strategy == "single" and world_size > 1:
        raise ConfigError(f"strategy=single cannot run on {world_size} processes: use ddp, fsdp or deepspeed (or auto)")
    if strategy == "fsdp":
        from .env import detect
        from .strategies.fsdp import replica_groups

        here = detect()
        # `nodes` needs the node count: a worker knows it (W / its node's processes); the process that
        # starts the workers under --nproc does not, and leaves that check to them.
        if cfg.fsdp.replicate != "nodes" or here.world_size == world_size:
            replica_groups(cfg.fsdp.replicate, world_size, here.local_world_size)
    elif cfg.fsdp.replicate != 1:
        raise ConfigError(f"fsdp.replicate={cfg.fsdp.replicate} (HSDP) needs strategy=fsdp, and this run's strategy is "
                          f"{strategy}: set strategy=fsdp, or leave fsdp.replicate out")
    needs = {"deepspeed": strategy == "deepspeed", "wandb": bool(cfg.log.wandb.project),
             "tensorboard": cfg.log.tensorboard}
    for module, needed in needs.items():
        if needed and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{module} is not installed, but the config asks for it: "
                              f"pip install 'launcher[{module}]' (or pip install {module})")
    if strategy == "deepspeed":
        if cfg.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision=fp16 with strategy=deepspeed needs a GPU: DeepSpeed has no fp16 on the CPU. "
                              "Use precision=bf16 (or fp32), or another strategy")
        if cfg.checkpoint.async_save:
            raise ConfigError("checkpoint.async=true is not available with strategy=deepspeed: DeepSpeed writes its "
                              "checkpoints synchronously. Set checkpoint.async=false")
        if cfg.deepspeed.config and not Path(cfg.deepspeed.config).is_file():
            raise ConfigError(f"deepspeed.config={cfg.deepspeed.config}: no such file")
        from .strategies.deepspeed import ds_config

        ds_config(cfg, plan, cuda=False)  # raises for what DeepSpeed cannot run
    check_switches(cfg, recipe, plan, strategy)
    resume = resume_source(cfg.checkpoint, Path(cfg.run_dir), world_size, may_move=global_rank_zero() and not report_only)
    if resume is not None:
        check_resume_config(resume, cfg)
    check_writable(Path(cfg.run_dir))
    train_set, _ = recipe.build_data()
    say = (lambda m: print(m, file=sys.stderr)) if global_rank_zero() else None
    plan = batch_plan(cfg, world_size, train_length(cfg, train_set, say))  # a train set smaller than one global batch
    return Checked(recipe, plan, resume)


def check_switches(cfg: Config, recipe, plan, strategy: str) -> None:
    """The speed switches' combinations that cannot run, found before the workers (which check again)."""
    import torch

    from .data import resolve_pin_memory
    from .optim import implementation
    from .recipe import unwrap_lightning
    from .strategies.base import check_checkpoint_units, default_shard_units, outermost
    from .strategies.ddp import check_static_graph

    if strategy == "ddp":
        check_static_graph(cfg, plan)
    resolve_pin_memory(cfg.data.pin_memory)
    if cfg.optim.impl == "fused" and "optim" not in recipe.replaces():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        implementation("fused", [torch.empty(0, device=device)])  # raises where torch has no fused kernel
    if cfg.train.activation_checkpointing:
        model = unwrap_lightning(recipe.check_model())
        check_checkpoint_units(outermost([u for u in (recipe.shard_units or default_shard_units)(model)
                                          if u is not model]))


def report_replaced_sections(cfg: Config, recipe) -> None:
    """A config section a recipe hook replaces is not silently ignored: say so, once."""
    for section, instead in recipe.replaces().items():
        if getattr(cfg, section).model_fields_set and global_rank_zero():
            print(f"warning: the config's {section}: section is not used: {instead} takes its place",
                  file=sys.stderr)


@dataclass
class Checked:
    """What check_inputs found out: the loaded recipe, the batch plan and where a run resumes."""

    recipe: object
    plan: object
    resume: Path | None


def check_resume_config(path: Path, cfg: Config) -> None:
    """A checkpoint records its run's config: resuming under one that changes the math is refused."""
    from .checkpoint import read_meta
    from .config import config_changes

    saved = read_meta(path).get("config")
    if saved is None:
        return
    math, other = config_changes(saved, cfg)
    diff = "\n  ".join(math)
    if math and cfg.checkpoint.resume_changed != "allow":
        raise ConfigError(
            f"{path} was trained with another config, and these changes alter the training math:\n  {diff}\n"
            "Resuming would mix two runs. Use a fresh run_dir, or checkpoint.resume=never to start afresh here "
            "(the earlier checkpoints are set aside, not deleted), or checkpoint.resume_changed=allow to resume anyway")
    if not global_rank_zero():
        return
    if math:
        print(f"warning: resuming {path.name} with a config that changes the training math "
              f"(checkpoint.resume_changed=allow):\n  {diff}", file=sys.stderr)
    if other:
        print(f"note: resuming {path.name} with changed settings: {'; '.join(other)}", file=sys.stderr)


def check_writable(path: Path, what: str | None = None, fix: str = "choose another run_dir or fix its permissions") -> None:
    """Can `path` (a directory, perhaps not there yet) be written? Creates nothing: the probe
    file goes in `path` or, if it is not there yet, in its nearest existing parent, so that
    the nodes of a job checking one shared run dir at once cannot trip over each other."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a directory")
        probe = existing / f".launcher_write_test_{socket.gethostname()}_{os.getpid()}_{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what or f'run_dir={path}'} cannot be written ({e.strerror or e}): {fix}") from None


def global_rank_zero() -> bool:
    """True in the launching process, and in the worker of rank 0 under torchrun or srun."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)  # before importing torch: config errors come at once
    from . import env as env_mod

    env = env_mod.detect()
    if args.nproc is not None:
        check_node_launch(args, env)
    world = args.nproc * args.nnodes if args.nproc else env.world_size
    checked = check_inputs(cfg, world, args.config)
    if cfg.checkpoint.resume == "auto" and checked.resume is not None and finished(checked.resume, cfg, checked.plan):
        return errors.DONE  # rerunning a finished run (an explicit checkpoint.resume starts a new one)
    if args.nproc:
        from .spawn import spawn

        del checked  # and the data set built to check it: the workers build their own
        run_dir = Path(cfg.run_dir)
        fresh = not run_dir.exists()
        code = spawn([args.config, *args.overrides], nproc=args.nproc, nnodes=args.nnodes,
                     node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts,
                     timeout_s=cfg.dist.timeout_s)
        if code == errors.BAD_INPUT and fresh and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # found at the first step: a bad input leaves no run dir
        return code
    return run_worker(cfg, env, checked.recipe)


def finished(resume: Path, cfg: Config, plan) -> bool:
    """Rerunning a finished run: say so, and do nothing (no second validation row)."""
    from .checkpoint import read_meta
    from .trainer import total_steps

    meta = read_meta(resume)
    if not meta.get("finished") or meta["step"] < total_steps(cfg, plan):
        return False
    if global_rank_zero():
        print(f"{cfg.run_dir} finished at step {meta['step']}: nothing to do. Raise train.max_steps (or "
              "train.epochs) to train on, or set checkpoint.resume=never to start afresh", file=sys.stderr)
    return True


def check_node_launch(args, env) -> None:
    """--nproc: this process starts the workers of one node. Fills --nnodes, --node-rank and
    --rdzv-endpoint from SLURM when it runs as one srun task per node."""
    if env.launcher == "torchrun":
        raise ConfigError("--nproc inside a worker that torchrun (or accelerate launch) already started: drop "
                          "--nproc, the outer launcher starts the workers")
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: it must be at least 1 (the workers to start on this node)")
    if env.launcher == "slurm":
        if env.local_world_size > 1:
            raise ConfigError(
                f"--nproc under srun starts a node's workers, but this node runs {env.local_world_size} srun tasks: "
                "use one task per node (--ntasks-per-node=1) with --nproc, or one task per worker without --nproc")
        if args.nnodes is None:
            args.nnodes = env.world_size  # one task per node: the tasks are the nodes
            args.node_rank = env.node_rank if args.node_rank is None else args.node_rank
            if args.nnodes > 1 and not args.rdzv_endpoint:
                args.rdzv_endpoint = f"{env.master_addr}:{env.master_port}"
    args.nnodes = args.nnodes or 1
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node) and "
                          "--node-rank on each node")


def run_worker(cfg: Config, env, recipe) -> int:
    """Train in this process (one of the workers, or the only one). Returns the exit code once
    everything the run wrote is flushed and closed."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from . import env as env_mod
    from .errors import TrainingError
    from .trainer import train

    device = env_mod.device_for(env)
    env_mod.init_process_group(env, device, cfg.dist.timeout_s)
    # Under torchrun: the failing rank's traceback goes into the launcher's summary.
    try:
        record(train)(cfg, env, device, recipe)
    except TrainingError as e:
        if first_on_node():
            print(f"error: {e}", file=sys.stderr)
        return errors.FAILED
    except errors.Stopped:
        if env.is_main:
            print(f"stopped by a signal; checkpoint saved in {cfg.run_dir}/checkpoints. Run the same command to resume.",
                  file=sys.stderr)
        return errors.STOPPED
    env_mod.destroy_process_group()
    return errors.DONE


# ---------------------------------------------------------------- plan, ls, export


def cmd_plan(args) -> int:
    from .plan import cmd_plan as plan

    return plan(args)


def cmd_ls() -> int:
    import ast

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


def cmd_export(args) -> int:
    from .export import export

    path = export(Path(args.run_dir), Path(args.out), args.step)
    print(f"wrote {path}")
    return 0
