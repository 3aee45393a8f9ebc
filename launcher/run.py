"""`launcher run`: check the input, then train in this process or start the workers (--nproc).

A bad input leaves no run dir behind: one this command created is removed when the run ends with
exit 2 before any checkpoint was written, whether the launching process or a worker found it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import errors
from .config import Config, load_config
from .errors import ConfigError
from .fs import error, is_main_process, say


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)  # before importing torch: config errors come at once
    run_dir = Path(cfg.run_dir)
    fresh = not run_dir.exists()
    try:
        code = check_and_run(cfg, args)
    except ConfigError:
        remove_if_untouched(run_dir, fresh)
        raise
    if code == errors.BAD_INPUT:
        remove_if_untouched(run_dir, fresh)
    return code


def remove_if_untouched(run_dir: Path, fresh: bool) -> None:
    if fresh and is_main_process() and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def check_and_run(cfg: Config, args) -> int:
    from .env import detect
    from .preflight import check_inputs, check_launch_variables, check_node_launch, finished

    check_launch_variables()
    env = detect()
    check_node_launch(args, env)
    world = args.nproc * args.nnodes if args.nproc else env.world_size
    checked = check_inputs(cfg, world, args.config)
    if cfg.checkpoint.resume == "auto" and checked.resume is not None and finished(checked.resume, cfg, checked.sizes):
        return errors.DONE  # rerunning a finished run (an explicit checkpoint.resume starts a new one)
    if args.nproc:
        from .spawn import spawn

        del checked  # and the data set built to check it: the workers build their own
        return spawn([args.config, *args.overrides], nproc=args.nproc, nnodes=args.nnodes,
                     node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts,
                     timeout_s=cfg.dist.timeout_s)
    return run_worker(cfg, env, checked.recipe)


def run_worker(cfg: Config, env, recipe) -> int:
    """Train in this process (one of the workers, or the only one). Returns the exit code once
    everything the run wrote is flushed and closed."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import record

    from . import env as env_mod
    from .trainer import train

    device = env_mod.device_for(env)
    try:
        env_mod.init_process_group(env, device, cfg.dist.timeout_s)
    except DistError as e:  # the others never came (or the address cannot be reached)
        error(f"rank {env.rank} could not meet the other {env.world_size - 1} process(es) of its job at "
              f"{env.master_addr}:{env.master_port} within dist.timeout_s={cfg.dist.timeout_s:g} s "
              f"({str(e).splitlines()[0]}). Start every process of the job (torchrun / srun / launcher run "
              "--nproc start them together), or check that the address is reachable from each")
        return errors.FAILED
    # Under torchrun: the failing rank's traceback goes into the launcher's summary.
    try:
        record(train)(cfg, env, device, recipe)
    except errors.TrainingError as e:
        error(str(e))
        return errors.FAILED
    except errors.Stopped:
        say(f"stopped by a signal; checkpoint saved in {cfg.run_dir}/checkpoints. Run the same command to resume.")
        return errors.STOPPED
    env_mod.destroy_process_group()
    return errors.DONE
