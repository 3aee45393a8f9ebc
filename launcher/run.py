"""`launcher run`: check the input, then train in this process or start the workers (--nproc).

A bad input leaves no run dir behind: one this command created is removed when the run ends with
exit 2 before any checkpoint or metric was written, whether the launching process or a worker found it.
The run dir is held while the command runs (launcher/hold.py): a second run on it exits 2.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from . import errors
from .config import Config, load_config
from .errors import ConfigError
from .fs import error, is_main_process, say
from .hold import hold, job_id


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)  # before importing torch: config errors come at once
    run_dir = Path(cfg.run_dir)
    fresh = not run_dir.exists()
    # One run per run dir: another job's live run there is exit 2 here, before anything is written.
    with hold(run_dir, job_id(args.nproc, args.rdzv_endpoint)):
        try:
            code = check_and_run(cfg, args)
        except ConfigError:
            remove_if_untouched(run_dir, fresh)
            raise
        if code == errors.BAD_INPUT:
            remove_if_untouched(run_dir, fresh)
    if fresh and is_main_process():  # made for the hold, and nothing written (the peers never came, say)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    return code


def remove_if_untouched(run_dir: Path, fresh: bool) -> None:
    # A metrics row too: with checkpoint.dir in object storage, nothing else here says training began.
    metrics = run_dir / "metrics.jsonl"
    if fresh and is_main_process() and not (run_dir / "checkpoints").exists() and not (
            metrics.exists() and metrics.stat().st_size):
        shutil.rmtree(run_dir, ignore_errors=True)


def check_and_run(cfg: Config, args) -> int:
    from .env import check_gpus, detect
    from .preflight import check_inputs, check_launch_variables, check_node_launch, check_node_range, finished

    check_launch_variables()
    env = detect()
    check_node_launch(args, env)
    if args.nproc:
        check_gpus(args.nproc)  # two ranks on one GPU: NCCL would fail later as a lost peer
        check_node_range(cfg, args.nproc, args.min_nodes, args.max_nodes)  # every size an elastic job may take
    world = args.nproc * args.max_nodes if args.nproc else env.world_size
    checked = check_inputs(cfg, world, args.config, probe_step=bool(args.nproc))
    if not os.environ.get("LAUNCHER_SPAWNED"):  # the workers of --nproc: the launching process said it
        say(f"run dir: {Path(cfg.run_dir).resolve()}")
    if cfg.checkpoint.resume == "auto" and checked.resume is not None and finished(checked.resume, cfg, checked.sizes):
        return errors.DONE  # rerunning a finished run (an explicit checkpoint.resume starts a new one)
    if args.nproc:
        from .checkpoint import checkpoint_dir
        from .spawn import Elastic, rdzv_id, spawn

        del checked  # and the data set built to check it: the workers build their own
        elastic = None
        if args.elastic:
            elastic = Elastic(args.min_nodes, args.max_nodes, args.rdzv_id or rdzv_id(args.rdzv_endpoint),
                              args.rdzv_conf)
        return spawn([args.config, *args.overrides], ckpt_dir=checkpoint_dir(cfg.checkpoint, cfg.run_dir),
                     nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                     rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts, timeout_s=cfg.dist.timeout_s,
                     elastic=elastic)
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
    except errors.TrainingError as e:  # before RuntimeError, which it is
        error(str(e))
        return errors.FAILED
    except (DistError, RuntimeError) as e:
        if not (restarting() and lost_a_peer(e)):
            raise
        # Another rank died: torchrun restarts the group, which resumes. One line, not a traceback.
        error(f"rank {env.rank} lost contact with another rank ({str(e).splitlines()[0][:160]}); torchrun restarts "
              "the worker group (--max-restarts), which resumes from the newest checkpoint")
        return errors.FAILED
    except errors.Stopped as e:
        from .checkpoint import checkpoint_dir, newest_note

        if not os.environ.get("LAUNCHER_SPAWNED"):  # else the launching process says it, once
            say(f"stopped by {e.signal_name}: {newest_note(checkpoint_dir(cfg.checkpoint, cfg.run_dir))}")
        return errors.STOPPED
    env_mod.destroy_process_group()
    return errors.DONE


def restarting() -> bool:
    """Under torchrun with restarts left (--max-restarts)."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return count < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another rank's process went away."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "Socket Timeout", "NCCL communicator was aborted"))
