"""Every check of the user's input before any worker starts (docs/design.md, Exit codes).

Config, recipe contract, batch sizes, the strategy's own checks (`Strategy.check`), optional
dependencies, the speed switches, the checkpoint a run resumes from and the config it was trained
with, the run directory: cheapest first. The recipe's data() is built last, to check it and its
size. Each raises ConfigError (exit 2) with a message that says what is wrong and how to fix it.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import default_collate

from . import float8
from .batch import BatchSizes, batch_sizes, total_steps
from .checkpoint import checkpoint_dir, read_meta, resume_from
from .config import Config, config_changes
from .data import resolve_pin_memory
from .env import detect
from .errors import ConfigError
from .fs import check_writable, is_main_process, say, warn
from .optim import fused_refusal, fused_unavailable
from .recipe import Recipe, RecipeError, unwrap_lightning, user_traceback
from .strategies import resolve_name, strategy_class
from .strategies.base import check_checkpoint_units, default_shard_units, outermost
from .storage import check_reachable, is_url
from .stream import is_stream, train_length


@dataclass
class Checked:
    """What check_inputs found out: the loaded recipe, the batch sizes and where a run resumes."""

    recipe: Recipe
    sizes: BatchSizes
    resume: Path | None


def check_inputs(cfg: Config, world_size: int, origin: str, report_only: bool = False,
                 probe_step: bool = False, elsewhere: bool = False) -> Checked:
    """Everything about the input that can be wrong, checked once before any worker. report_only
    (launcher plan) changes nothing on disk: a damaged checkpoint is not set aside. probe_step (the
    process that starts workers, which trains nothing itself): run the loss on one micro-batch too.
    elsewhere (launcher slurm, k8s): the job runs on other machines, which may hold the credentials
    of a checkpoint.dir in object storage that this one lacks."""
    recipe = Recipe.load(cfg.recipe, origin)
    recipe.check_optimization()
    report_replaced_sections(cfg, recipe)
    here = detect()
    local_world_size = here.local_world_size if here.world_size == world_size else None  # a worker knows it
    data_world = check_tensor_parallel(cfg, recipe, world_size, local_world_size)
    sizes = batch_sizes(cfg, data_world)
    strategy = resolve_name(cfg.strategy, world_size, cfg.tp.size)
    strategy_class(strategy).check(
        cfg, sizes, data_world, local_world_size and local_world_size // cfg.tp.size)
    check_loggers(cfg)
    float8.check(cfg, strategy)
    check_switches(cfg, recipe)
    check_fused_optimizer(cfg, recipe, world_size)
    # Object storage is reached only where the job will run, and never to report.
    reach = not (is_url(cfg.checkpoint.dir or "") and (report_only or elsewhere))
    check_checkpoint_dir(cfg, strategy, reach)
    resume = None if not reach else resume_from(cfg.checkpoint, Path(cfg.run_dir), world_size,
                                                 may_move=is_main_process() and not report_only)
    if resume is not None:
        check_resume_config(resume, cfg)
    check_writable(Path(cfg.run_dir))
    train_set, val_set = recipe.build_data()
    check_monitors(cfg, val_set)
    length = train_length(cfg, train_set, say)
    sizes = batch_sizes(cfg, data_world, length)  # a train set smaller than G
    if length is None:
        check_unknown_length(cfg, recipe, train_set)
    check_first_batch(cfg, recipe, train_set, sizes, probe_step)
    return Checked(recipe, sizes, resume)


def monitored(cfg: Config) -> dict:
    """{config key: its section} of checkpoint.best and train.early_stop, where set."""
    return {key: section for key, section in (("checkpoint.best", cfg.checkpoint.best),
                                              ("train.early_stop", cfg.train.early_stop)) if section is not None}


def check_monitors(cfg: Config, val_set) -> None:
    """checkpoint.best and train.early_stop compare validations: there must be some."""
    for key, section in monitored(cfg).items():
        if val_set is None:
            raise ConfigError(f"{key} follows {section.monitor} from validation, and the recipe's data() returns no "
                              "validation set: return (train, val), or leave out " + key)
        if not cfg.train.eval_every_steps:
            raise ConfigError(f"{key} compares validations, and train.eval_every_steps is not set (one validation, at "
                              f"the end): set train.eval_every_steps, e.g. to checkpoint.every_steps")


def check_checkpoint_dir(cfg: Config, strategy: str, reach: bool = True) -> None:
    """checkpoint.dir: its fsspec package installed, no credentials in the URL, writable (a small probe,
    where `reach`)."""
    if not cfg.checkpoint.dir:
        return  # RUN_DIR/checkpoints: the run dir's own check covers it
    if strategy == "deepspeed" and is_url(cfg.checkpoint.dir):
        raise ConfigError(f"checkpoint.dir={cfg.checkpoint.dir} is object storage, and DeepSpeed writes its "
                          "checkpoints with its own code, to local files only: use strategy=fsdp (ZeRO-3's sharding) "
                          "or ddp, or a checkpoint.dir on a shared file system")
    where = checkpoint_dir(cfg.checkpoint, cfg.run_dir)  # the package and the URL's form, checked
    if reach:
        check_reachable(where, f"checkpoint.dir={cfg.checkpoint.dir}")


def check_tensor_parallel(cfg: Config, recipe: Recipe, world_size: int, local_world_size: int | None) -> int:
    """tp.size against the world and the model's TP plan; returns the data-parallel size, world / tp."""
    tp = cfg.tp.size
    if tp == 1:
        if cfg.tp.sequence_parallel:
            raise ConfigError("tp.sequence_parallel=true splits the activations over a TP group, and tp.size is 1: set "
                              "tp.size to 2 or more, or tp.sequence_parallel=false")
        return world_size
    if world_size % tp:
        raise ConfigError(f"tp.size={tp} does not divide the world size {world_size}: the ranks form groups of "
                          f"tp.size; use a tp.size that divides {world_size}, or --nproc a multiple of {tp}")
    if local_world_size is not None and local_world_size % tp:
        raise ConfigError(f"tp.size={tp} does not divide the {local_world_size} processes of a node: a TP group "
                          "stays inside one node (its all-reduces run every layer); use a tp.size that divides "
                          "the processes per node")
    if recipe.is_lightning():
        raise ConfigError("tp.size > 1 is not supported for a LightningModule yet: set tp.size=1")
    from .tensor_parallel import plan_of, resolve

    model = unwrap_lightning(recipe.check_model())
    resolve(plan_of(recipe, model), model, tp, cfg.tp.sequence_parallel)
    return world_size // tp


def check_unknown_length(cfg: Config, recipe: Recipe, train_set) -> None:
    """train.epochs of a stream without len(): what needs the run's length in advance is refused."""
    name = type(train_set).__name__
    if cfg.schedule.decay != "constant" and "schedule" not in recipe.replaces():
        raise ConfigError(f"schedule.decay={cfg.schedule.decay} needs the run's length in steps, and the training "
                          f"stream ({name}) has no __len__, so train.epochs={cfg.train.epochs} passes have no known "
                          "length: set train.max_steps, give the stream a __len__ (samples in one pass), or set "
                          "schedule.decay=constant")
    say(f"note: the training stream ({name}) has no __len__: {cfg.train.epochs} pass(es), each ending where the "
        "stream ends; progress shows no total and no ETA")


PROBE_MAX_PARAMETERS = 50_000_000  # a model this small is built for real and its loss run, on the CPU


def check_first_batch(cfg: Config, recipe: Recipe, train_set, sizes: BatchSizes, probe_step: bool) -> None:
    """What a worker would otherwise meet at its first step: a model with nothing to train, items that
    do not make a batch, and (probe_step, a plain recipe of a small model) a loss no gradient flows
    through or a model on the meta device."""
    model = recipe.check_model()
    recipe.check_trainable(model, built_on_meta=True)
    batch = first_micro_batch(recipe, train_set, sizes.micro_batch)
    small = sum(p.numel() for p in model.parameters()) <= PROBE_MAX_PARAMETERS
    if batch is None or not probe_step or not small or recipe.is_lightning():
        return
    torch.manual_seed(cfg.train.seed)
    model = recipe.build_model()
    recipe.check_trainable(model)
    with torch.enable_grad():
        recipe.check_loss_output(recipe.loss(model, batch), 0)
    if monitored(cfg):  # the names validation gives, from one training batch
        with torch.no_grad():
            names = set(recipe.validation_values(model, batch))
        for key, section in monitored(cfg).items():
            if section.monitor not in names:
                raise ConfigError(f"{key}.monitor={section.monitor} is not among the validation's values "
                                  f"({', '.join(sorted(names))}): monitor one of them")


def first_micro_batch(recipe: Recipe, train_set, size: int):
    """The first micro-batch of a map-style set as the loader would collate it. None for a stream:
    reading one is not free of effects (a stateful reader, a log of what was read) and is the
    workers' to do."""
    if is_stream(train_set):
        return None
    items = [train_set[i] for i in range(min(size, len(train_set)))]
    collate = recipe.collate or default_collate
    try:
        return collate(items)
    except Exception as e:  # noqa: BLE001 - the recipe's data or its collate
        if recipe.collate is not None:
            raise RecipeError(f"recipe `{recipe.name}`: collate() raised {user_traceback(e)}") from None
        raise RecipeError(
            f"recipe `{recipe.name}`: torch's default collate cannot make one batch of {len(items)} training items "
            f"({str(e).splitlines()[0]}): add `collate(items)` to the recipe, a function that makes one batch from "
            "a list of items (padding them to one length, say)") from None


def check_loggers(cfg: Config) -> None:
    needs = {"wandb": bool(cfg.log.wandb.project), "tensorboard": cfg.log.tensorboard}
    for module, needed in needs.items():
        if needed and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{module} is not installed, but the config asks for it: "
                              f"pip install 'launcher[{module}]' (or pip install {module})")


def check_switches(cfg: Config, recipe: Recipe) -> None:
    """The speed switches' settings that cannot run here."""
    resolve_pin_memory(cfg.data.pin_memory)
    if cfg.train.sync_batchnorm and not torch.cuda.is_available():
        raise ConfigError("train.sync_batchnorm=true needs CUDA: torch's SyncBatchNorm runs on GPUs only (NCCL). On the "
                          "CPU each process normalises over its own micro-batch: set train.sync_batchnorm=false")
    if cfg.train.activation_checkpointing:
        model = unwrap_lightning(recipe.check_model())
        check_checkpoint_units(outermost([u for u in (recipe.shard_units or default_shard_units)(model)
                                          if u is not model]))


def check_fused_optimizer(cfg: Config, recipe: Recipe, world_size: int) -> None:
    """optim.impl=fused where torch's fused kernel of optim.name cannot step the parameters the strategy
    will hand the optimizer: their device (the host's with offload), and under FSDP DTensors, which
    need a DTensor sharding rule for the kernel (torch 2.13 has none for SGD's). A worker would meet
    it building the optimizer (optim.implementation); optim.impl=auto takes foreach there instead."""
    if cfg.optim.impl != "fused" or "optim" in recipe.replaces():
        return
    strategy = resolve_name(cfg.strategy, world_size, cfg.tp.size)
    offloaded = ((strategy == "fsdp" and cfg.fsdp.cpu_offload)
                 or (strategy == "deepspeed" and cfg.deepspeed.offload_optimizer))
    device = "cuda" if torch.cuda.is_available() and not offloaded else "cpu"
    # fp32 whatever the precision: FSDP and ZeRO keep fp32 master weights, and autocast leaves the
    # parameters as they are.
    reason = fused_unavailable(cfg.optim.name, device, torch.float32, dtensor=strategy == "fsdp")
    if reason:
        where = f" with optim.name={cfg.optim.name} and strategy={strategy}" if strategy == "fsdp" else ""
        raise ConfigError(fused_refusal(reason, where))


def report_replaced_sections(cfg: Config, recipe: Recipe) -> None:
    """A config section a recipe hook replaces is not silently ignored: say so, once."""
    for section, instead in recipe.replaces().items():
        if getattr(cfg, section).model_fields_set:
            warn(f"the config's {section}: section is not used: {instead} takes its place")


def check_resume_config(path: Path, cfg: Config) -> None:
    """A checkpoint records its run's config: resuming under one that changes the math is refused."""
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
    if math:
        warn(f"resuming {path.name} with a config that changes the training math "
             f"(checkpoint.resume_changed=allow):\n  {diff}")
    if other:
        say(f"note: resuming {path.name} with changed settings: {'; '.join(other)}")


def finished(resume: Path, cfg: Config, sizes: BatchSizes) -> bool:
    """Rerunning a finished run: say so, and do nothing (no second validation row)."""
    meta = read_meta(resume)
    total = total_steps(cfg, sizes)
    if total is None:  # passes of a stream of unknown length: the passes finished count
        done = meta.get("stream", {}).get("epoch", 0) >= cfg.train.epochs
    else:
        done = meta["step"] >= total
    stop, early = meta.get("monitors", {}).get("early_stop"), cfg.train.early_stop
    stopped = bool(stop and early and stop["key"] == early.monitor and stop["bad"] >= early.patience)
    if not meta.get("finished") or not (done or stopped):
        return False
    if stopped and not done:
        say(f"{cfg.run_dir} stopped early at step {meta['step']} ({early.monitor} did not improve for {stop['bad']} "
            "validations): nothing to do. Raise train.early_stop.patience to train on, or set "
            "checkpoint.resume=never to start afresh")
        return True
    say(f"{cfg.run_dir} finished at step {meta['step']}: nothing to do. Raise train.max_steps (or "
        "train.epochs) to train on, or set checkpoint.resume=never to start afresh")
    return True


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def check_launch_variables(environ=None) -> None:
    """Rank variables (torchrun's, or set by another launcher) must come with a way to meet: a
    worker would otherwise wait for peers that never come. Checked before anything waits."""
    env = os.environ if environ is None else environ
    present = [v for v in RANK_VARIABLES if v in env]
    if not present:
        return
    fix = ("unset them (`unset RANK WORLD_SIZE LOCAL_RANK`) to train in one process, or start the workers with "
           "`launcher run --nproc N` or torchrun, which set all of them")
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        have = " ".join(f"{v}={env[v]}" for v in present)
        raise ConfigError(f"the launch variables {have} are set, but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not, so this process cannot meet the others of its "
                          f"job: {fix}")
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"RANK={env['RANK']} and WORLD_SIZE={env['WORLD_SIZE']} must be whole numbers: {fix}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks run from 0 to WORLD_SIZE - 1): {fix}")


def check_node_launch(args, env) -> None:
    """--nproc: this process starts the workers of one node. Sets args.min_nodes and args.max_nodes
    from --nnodes (N, or MIN:MAX for an elastic job), and fills --nnodes, --node-rank and
    --rdzv-endpoint from SLURM when it runs as one srun task per node."""
    if args.nproc is None:
        given = [flag for flag, value in (("--nnodes", args.nnodes), ("--node-rank", args.node_rank),
                                          ("--rdzv-endpoint", args.rdzv_endpoint), ("--rdzv-id", args.rdzv_id),
                                          ("--rdzv-conf", args.rdzv_conf), ("--max-restarts", args.max_restarts))
                 if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} need --nproc N (the workers this launcher starts on this node); "
                              "without --nproc the process trains by itself")
        return
    if env.launcher == "torchrun":
        raise ConfigError("--nproc inside a worker that torchrun (or accelerate launch) already started: drop "
                          "--nproc, the outer launcher starts the workers")
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: it must be at least 1 (the workers to start on this node)")
    if args.max_restarts is not None and args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: it must be 0 or more")
    args.min_nodes = args.max_nodes = None
    if args.nnodes is not None:
        args.min_nodes, args.max_nodes = parse_nodes(args.nnodes, "--nnodes", ":")
        args.nnodes = args.max_nodes
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
    if args.min_nodes is None:  # a plain N, or the srun tasks
        args.min_nodes = args.max_nodes = args.nnodes
    if args.rdzv_endpoint is not None:
        check_endpoint(args.rdzv_endpoint)
    args.elastic = args.min_nodes < args.max_nodes
    if args.max_restarts is None:
        args.max_restarts = ELASTIC_RESTARTS if args.elastic else 0
    if args.elastic:
        check_elastic_launch(args)
        return
    for flag, value in (("--rdzv-id", args.rdzv_id), ("--rdzv-conf", args.rdzv_conf)):
        if value is not None:
            raise ConfigError(f"{flag} is for an elastic job (--nnodes MIN:MAX with MIN < MAX): the static rendezvous "
                              "of a fixed number of nodes has no id and no settings")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} is outside --nnodes {args.nnodes}: the nodes are numbered "
                          f"0 to {args.nnodes - 1}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node) and "
                          "--node-rank on each node")


ELASTIC_RESTARTS = 3  # the failures (a lost node is one) an elastic job survives unless --max-restarts says


def check_elastic_launch(args) -> None:
    nodes = f"--nnodes {args.min_nodes}:{args.max_nodes}"
    if args.node_rank is not None:
        raise ConfigError(f"--node-rank with {nodes}: an elastic job numbers its nodes itself at each rendezvous; "
                          "drop --node-rank (every node runs the same command)")
    if not args.rdzv_endpoint:
        raise ConfigError(f"{nodes} needs --rdzv-endpoint HOST:PORT, the same on every node: the node at that "
                          "address hosts the rendezvous and must stay up for the whole job")
    if args.rdzv_conf is not None:
        check_rdzv_conf(args.rdzv_conf)


# torchrun's c10d rendezvous settings (--rdzv-conf), and what each takes
RDZV_KEYS = {"join_timeout": int, "last_call_timeout": int, "close_timeout": int, "heartbeat_timeout": int,
             "keep_alive_interval": int, "keep_alive_max_attempt": int, "read_timeout": int, "is_host": bool}
BOOLS = ("1", "0", "true", "false", "t", "f", "yes", "no", "y", "n")


def check_rdzv_conf(text: str) -> None:
    """torch reads --rdzv-conf's values only when it needs them (a wrong one is a traceback then) and
    ignores keys it does not know: both are found here."""
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise ConfigError(f"--rdzv-conf {text}: write KEY=VALUE pairs separated by commas, e.g. "
                              "last_call_timeout=30,keep_alive_interval=5")
        kind = RDZV_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"--rdzv-conf {text}: {key} is not a setting of the c10d rendezvous; the settings are "
                              f"{', '.join(RDZV_KEYS)}")
        if kind is int and not (value.isdigit() and int(value) > 0):
            raise ConfigError(f"--rdzv-conf {text}: {key}={value} must be a whole number of seconds (or attempts), "
                              "at least 1")
        if kind is bool and value.lower() not in BOOLS:
            raise ConfigError(f"--rdzv-conf {text}: {key}={value} must be true or false (1 or 0)")


def check_endpoint(endpoint: str) -> None:
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv-endpoint {endpoint}: give HOST:PORT, e.g. node0:29500 (the same on every node; "
                          "the port must be free on that host)")


def parse_nodes(text: str, flag: str, sep: str) -> tuple[int, int]:
    """N or MIN<sep>MAX (`--nnodes 2:4`, sbatch's `--nodes 2-4`; the other separator is taken too)
    -> (MIN, MAX)."""
    parts = str(text).replace("-" if sep == ":" else ":", sep).split(sep)
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        low, high = 0, -1
    if low < 1 or high < low:
        raise ConfigError(f"{flag} {text}: give a number of nodes N (at least 1), or MIN{sep}MAX with 1 <= MIN <= MAX (an elastic "
                          f"job that runs on MIN to MAX nodes, e.g. {flag} 2{sep}4)")
    return low, high


def workers_per_node(gpus: int | None, nproc: int | None) -> int:
    """--gpus-per-node G and --nproc-per-node P of a job script or manifest -> P (default G, or 1)."""
    nproc = nproc if nproc is not None else (gpus or 1)
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus-per-node {gpus}: it must be at least 1 (leave it out where there are no GPUs)")
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc}: it must be at least 1")
    if gpus is not None and nproc > gpus:
        raise ConfigError(f"--nproc-per-node {nproc} is more than --gpus-per-node {gpus}: two workers cannot share a "
                          "GPU under NCCL; use at most one worker per GPU")
    return nproc


def check_node_range(cfg: Config, nproc: int, min_nodes: int, max_nodes: int) -> None:
    """An elastic job may run at every world size from MIN x P to MAX x P: its batch math and its
    strategy must hold at each (docs/design.md, Elastic jobs)."""
    if min_nodes == max_nodes:
        return
    worlds = [n * nproc for n in range(min_nodes, max_nodes + 1)]
    nodes = f"{min_nodes} to {max_nodes} nodes x {nproc} worker(s)"
    name = resolve_name(cfg.strategy, worlds[-1])
    if cfg.tp.size > 1:
        raise ConfigError(f"tp.size={cfg.tp.size} cannot run elastic ({nodes}) yet: use a fixed number of nodes, "
                          "or tp.size=1")
    if name == "deepspeed":
        raise ConfigError(f"strategy=deepspeed cannot run elastic ({nodes}): a DeepSpeed checkpoint resumes only at "
                          "the world size that wrote it. Use strategy=ddp or fsdp, or a fixed number of nodes")
    G = cfg.train.global_batch_size
    uneven = [w for w in worlds if G % w]
    if uneven:
        step = math.lcm(*worlds)
        fits = sorted({max(step, G // step * step), -(-G // step) * step})
        raise ConfigError(
            f"train.global_batch_size={G} cannot be split evenly at world size {', '.join(map(str, uneven))}, which "
            f"this elastic job ({nodes}) may take: the accumulation would not be whole. Set it to a multiple of "
            f"{step} that fits every size, such as {' or '.join(map(str, fits))}, or narrow --nnodes")
    for world in worlds:
        strategy_class(resolve_name(cfg.strategy, world)).check(cfg, batch_sizes(cfg, world), world, nproc)
