"""Bad input to the CLI, one table (README: exit code 2 is bad input, found before any worker starts).

Every case ends the same way: exit code 2; stderr holds exactly one message (one
`error:` line, its key phrase once: not once per rank), which names what is wrong (the
key, value or file) and how to fix it; no traceback and never a frame of the
launcher's own code (where the recipe's own code fails, at import or in data(), the
message points at the recipe's own line); no worker started where the problem can be
known before spawning (those cases use --nproc 2, so a spawn would show); and nothing
left on disk: the case's working directory, run dir included, is exactly as it was.

Whether a worker started is seen two ways: torch.distributed.run's own output, and a
`sitecustomize.py` on PYTHONPATH that leaves a file for every process started with
TORCHELASTIC_RUN_ID set (torchrun sets it in each worker). The same sitecustomize
hides an installed optional dependency (deepspeed) by putting None in sys.modules,
which makes importlib.util.find_spec return None and `import` fail, as if it were
not installed.

Two kinds of case differ: the loss contract is only seen at the first step, inside the
workers (the message must still come once, from one rank); and `--nproc` inside a
real torchrun, whose exit code (1) and summary are torchrun's own.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from helpers import ROOT, TEST_RECIPES, check, digits_config, run, write_config

# What torch.distributed.run prints when it started workers (and they failed).
# torchrun's own words (its module is torch.distributed.elastic): the launcher's messages may say "elastic job"
WORKER_OUTPUT = ("torch.distributed", "torchelastic", "elastic.", "ChildFailedError", "local_rank", "exitcode")

SITECUSTOMIZE = textwrap.dedent("""\
    import os, sys
    for _name in filter(None, os.environ.get("BAD_INPUTS_HIDE", "").split(",")):
        sys.modules[_name] = None  # find_spec(name) is None and `import name` fails: as if not installed
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("BAD_INPUTS_WORKERS"):
        open(os.path.join(os.environ["BAD_INPUTS_WORKERS"], "worker_%d" % os.getpid()), "w").close()
""")


# ---------------------------------------------------------------- trained runs (module scope)


class TrainedRuns:
    """Tiny digits runs with checkpoints, each trained once, on first use, for the whole module."""

    def __init__(self, base: Path):
        self.base = base
        self._done: dict[str, Path] = {}

    def config(self, run_dir: Path, name: str) -> dict:
        if name == "dcp":  # one process (strategy single): .metadata + __0_0.distcp; steps 5 and 10
            return digits_config(run_dir, train={"max_steps": 10}, checkpoint={"every_steps": 5})
        # DeepSpeed ZeRO-2 on 2 ranks: zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt; steps 2 and 4
        return digits_config(run_dir, strategy="deepspeed", deepspeed={"zero_stage": 2},
                             train={"micro_batch_size": 32, "max_steps": 4}, checkpoint={"every_steps": 2})

    def get(self, name: str) -> Path:
        if name not in self._done:
            run_dir = self.base / name
            cfg = write_config(self.base / f"{name}.yaml", self.config(run_dir, name))
            check(run(["run", cfg] + (["--nproc", 2] if name == "ds" else []), cwd=self.base, timeout=240))
            self._done[name] = run_dir
        return self._done[name]

    def copy(self, name: str, dest: Path) -> Path:
        shutil.copytree(self.get(name), dest)
        return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return TrainedRuns(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


# ---------------------------------------------------------------- the table


@dataclass
class Ctx:
    tmp: Path  # the case's working directory: everything it makes lives here
    runs: TrainedRuns
    env: dict = field(default_factory=dict)
    prefix: list | None = None  # instead of `python -m launcher`
    data: dict = field(default_factory=dict)  # what a case's own check needs

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def config(self, name: str = "c.yaml", **sections) -> Path:
        """The quick digits config, valid on 1 and on 2 processes (global 64, micro 32), but for `sections`."""
        sections["train"] = {"micro_batch_size": 32, **sections.get("train", {})}
        return write_config(self.tmp / name, digits_config(self.run_dir, **sections))

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], list]  # the arguments after `python -m launcher`
    # Substrings stderr must hold (the case's directory shown as <tmp>); a tuple: any one of them.
    expect: tuple
    # A phrase the one message holds exactly once (a second copy = a second rank printed it);
    # default: the first of `expect`; None: only the count of `error:` lines.
    once: str | None = "default"
    workers_start: bool = False  # True only where a worker necessarily starts before the problem shows
    # The launcher runs as torchrun's worker: exit code and traceback are torchrun's (it exits 1 when its
    # worker exits 2); the launcher must be the one worker, spawning none of its own.
    under_torchrun: bool = False
    traceback: bool = False  # the recipe's own traceback is expected (its import failed)
    exit: int = 2
    more: Callable[[Ctx, str], None] | None = None  # the case's own extra assertions on (ctx, stderr)


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def recipe(name: str, **sections) -> Callable[[Ctx], list]:
    return lambda c: ["run", c.config(recipe={"name": f"toy_recipes.{name}"}, **sections), "--nproc", 2]


def in_file(**sections) -> Callable[[Ctx], list]:
    """`run CONFIG --nproc 2` with the bad value in the file (an override would echo it in the message)."""
    return lambda c: ["run", c.config(**sections), "--nproc", 2]


def nproc2(*overrides, **sections) -> Callable[[Ctx], list]:
    """`run CONFIG OVERRIDES --nproc 2`: a spawn would show."""
    return lambda c: ["run", c.config(**sections), *overrides, "--nproc", 2]


def tiny_gpt(*args, **recipe) -> Callable[[Ctx], list]:
    """`run CONFIG ARGS` of a tiny recipes.gpt (it has a TP plan) on the quick config's batch sizes."""
    return tiny({"name": "recipes.gpt", "n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16,
                 "max_chars": 20000, **recipe}, *args)


def tiny(recipe: dict, *args) -> Callable[[Ctx], list]:
    """`run CONFIG ARGS` of `recipe` on the quick config's batch sizes."""
    def make(c: Ctx):
        config = digits_config(c.run_dir, train={"micro_batch_size": 32})
        config["recipe"] = recipe
        return ["run", write_config(c.tmp / "c.yaml", config), *args]
    return make


def config_text(text: str | bytes, name: str = "c.yaml") -> Callable[[Ctx], list]:
    return lambda c: ["run", c.write(name, text), "--nproc", 2]


def hidden(module: str, *overrides, **sections) -> Callable[[Ctx], list]:
    def make(c: Ctx):
        c.env["BAD_INPUTS_HIDE"] = module
        return ["run", c.config(**sections), *overrides, "--nproc", 2]
    return make


def aws(make: Callable[[Ctx], list], **variables) -> Callable[[Ctx], list]:
    """`make` with these AWS variables ("": none), never the user's own credentials, files or instance role."""
    def with_env(c: Ctx):
        c.env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                      "AWS_CONFIG_FILE": str(c.tmp / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(c.tmp / "none"),
                      "AWS_EC2_METADATA_DISABLED": "true", **variables})
        return make(c)
    return with_env


def no_secret(err: str, secret: str) -> None:
    assert secret not in err, err


def make_afile(c: Ctx) -> Path:
    return c.write("afile", "a regular file, not a directory\n")


def run_dir_under_a_file(c: Ctx):
    make_afile(c)
    config = digits_config(c.tmp / "afile" / "run", train={"micro_batch_size": 32})
    return ["run", write_config(c.tmp / "c.yaml", config), "--nproc", 2]


def deepspeed_json(text: str, *overrides) -> Callable[[Ctx], list]:
    def make(c: Ctx):
        path = c.write("ds.json", text)
        return ["run", c.config(strategy="deepspeed", deepspeed={"config": str(path)}), *overrides, "--nproc", 2]
    return make


def resume_from_missing(c: Ctx):
    return ["run", c.config(checkpoint={"resume": str(c.tmp / "nowhere")}), "--nproc", 2]


def damaged_checkpoint(step: int, remove: str) -> Callable[[Ctx], list]:
    """A copy of a complete checkpoint of the one-process run, less one file, given as checkpoint.resume."""
    def make(c: Ctx):
        ckpt = c.tmp / "ckpt" / f"step_{step:06d}"
        shutil.copytree(c.runs.get("dcp") / "checkpoints" / ckpt.name, ckpt)
        assert (ckpt / remove).is_file(), sorted(p.name for p in ckpt.iterdir())  # the layout this case assumes
        (ckpt / remove).unlink()
        return ["run", c.config(checkpoint={"resume": str(ckpt)}), "--nproc", 2]
    return make


def deepspeed_at_another_world_size(c: Ctx):
    """The 2-rank ZeRO-2 run, resumed (resume: auto) in its own run dir with 1 process."""
    c.runs.copy("ds", c.run_dir)
    cfg = write_config(c.tmp / "c.yaml", c.runs.config(c.run_dir, "ds"))
    return ["run", cfg, "--nproc", 1]


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def tampered_rng(c: Ctx):
    c.runs.copy("dcp", c.run_dir)
    marker = c.data["marker"] = c.tmp / "MARKER"
    rng = c.run_dir / "checkpoints" / "step_000010" / "rng_0.pt"
    assert rng.is_file()
    import torch

    torch.save({"torch": Payload(f"touch {marker}")}, rng)
    # Resumed on 2 processes (a one-process DCP checkpoint reshards): the file is on disk, so the
    # refusal comes before any worker starts.
    return ["run", c.config(train={"max_steps": 12}, checkpoint={"every_steps": 5}), "--nproc", 2]


def no_payload_ran(c: Ctx, err: str) -> None:
    assert not c.data["marker"].exists(), "the tampered rng file's payload ran"


def export_args(step: int | None, out: str, damage: str | None = None) -> Callable[[Ctx], list]:
    def make(c: Ctx):
        c.runs.copy("dcp", c.run_dir)
        make_afile(c)
        if damage:  # a shard that cannot load: an export that loaded before checking OUT would fail on it
            (c.run_dir / "checkpoints" / "step_000010" / damage).write_bytes(b"not a checkpoint shard")
        return ["export", c.run_dir, c.tmp / out] + ([] if step is None else ["--step", step])
    return make


def nproc_inside_torchrun_env(c: Ctx):
    """--nproc in a process that torchrun (simulated: its variables, world size 1) started."""
    c.env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    return ["run", c.config(), "--nproc", 2]


def nproc_inside_torchrun(c: Ctx):
    """The real nested case: torchrun (world size 1) starting `launcher run CFG --nproc 2`."""
    # `-m -- launcher`: without the `--`, torchrun's own parser rejects the worker's `--nproc` as an
    # ambiguous abbreviation of its --nproc-per-node.
    c.prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "-m", "--", "launcher"]
    return ["run", c.config(), "--nproc", 2]


def names_line(err: str, recipe: str, text: str) -> None:
    """The message points at the recipe's own line holding `text` (traceback or file:line style)."""
    n = line_of(TEST_RECIPES / f"{recipe}.py", text)
    assert f'{recipe}.py", line {n}' in err or f"{recipe}.py:{n}" in err, f"no {recipe}.py line {n} in\n{err}"


def import_error_lines(c: Ctx, err: str) -> None:
    names_line(err, "bad_import_error", "return CLASSES[name]")


def data_error_line(c: Ctx, err: str) -> None:
    names_line(err, "bad_data_raises", "open(")


RECIPE_IMPORT_LINE = "KeyError: 'two'"

CASES = [
    # ------------------------------------------------------------ the config file and overrides
    Case("unknown-key", lambda c: ["run", c.config(train={"global_bach_size": 32}), "--nproc", 2],
         ("train.global_bach_size", "<tmp>/c.yaml", "train.global_batch_size")),
    Case("unknown-key-override", nproc2("optim.nmae=sgd"), ("optim.name", "optim.nmae", "override")),
    Case("unknown-section", lambda c: ["run", c.config(optimizer={"lr": 0.1}), "--nproc", 2],
         ("optimizer", "<tmp>/c.yaml", "`optim`")),
    Case("wrong-type", nproc2("train.epochs=many"), ("'many'", "train.epochs", "int")),
    Case("wrong-type-in-file", lambda c: ["run", c.config(train={"max_steps": 1.5}), "--nproc", 2],
         ("train.max_steps", "1.5", "int")),
    Case("negative-lr", in_file(optim={"lr": -0.1}), ("-0.1", "optim.lr", "greater than 0")),
    Case("zero-global-batch", in_file(train={"global_batch_size": 0}), ("train.global_batch_size", "greater than 0")),
    Case("missing-config", lambda c: ["run", c.tmp / "missing.yaml", "--nproc", 2],
         ("<tmp>/missing.yaml", "does not exist", "launcher ls")),
    Case("config-is-a-directory", lambda c: (c.tmp / "cfgdir").mkdir() or ["run", c.tmp / "cfgdir", "--nproc", 2],
         ("<tmp>/cfgdir", "directory")),
    Case("config-not-utf8", config_text(b"recipe: {name: recipes.digits}\n# caf\xe9 \xff\xfe\n", "latin1.yaml"),
         ("<tmp>/latin1.yaml", ("UTF-8", "utf-8"))),
    Case("malformed-yaml", config_text("recipe: {name: recipes.digits\ntrain: [1, 2\n"),
         ("<tmp>/c.yaml", "YAML", "line"), once="is not valid YAML"),
    Case("config-not-a-mapping", config_text("- recipes.digits\n- train\n"), ("<tmp>/c.yaml", "mapping")),
    Case("duplicate-key", config_text("recipe: {name: recipes.digits}\noptim:\n  name: sgd\ntrain: {max_steps: 2}\n"
                                      "optim:\n  lr: 0.01\n"),
         ("<tmp>/c.yaml", "`optim` appears twice", "line 2", "line 5")),
    Case("duplicate-nested-key", config_text("recipe: {name: recipes.digits}\ntrain:\n  max_steps: 2\n  max_steps: 3\n"),
         ("`max_steps` appears twice", "line 3", "line 4")),
    Case("override-without-equals", nproc2("optim.lr"), ("key=value", "optim.lr")),
    Case("missing-recipe-name", lambda c: ["run", c.write("c.yaml", f"recipe: {{hidden: 32}}\nrun_dir: {c.run_dir}\n"),
                                           "--nproc", 2],
         ("recipe.name", "recipes.digits")),
    # ------------------------------------------------------------ choices
    Case("unknown-strategy", nproc2("strategy=horovod"), ("'horovod'", "strategy", "deepspeed")),
    Case("unknown-precision", nproc2("precision=fp8"), ("'fp8'", "precision", "bf16")),
    Case("unknown-optimizer", nproc2("optim.name=lion"), ("'lion'", "optim.name", "adamw")),
    Case("unknown-schedule", nproc2("schedule.decay=exponential"), ("'exponential'", "schedule.decay", "cosine")),
    # ------------------------------------------------------------ the recipe
    Case("recipe-not-found", nproc2("recipe.name=no_such_recipe"), ("no_such_recipe", "launcher ls")),
    Case("recipe-file-not-found", lambda c: ["run", c.config(), f"recipe.name={c.tmp / 'my_recipe.py'}", "--nproc", 2],
         ("<tmp>/my_recipe.py", "does not exist")),
    Case("recipe-import-raises", recipe("bad_import_error"), (RECIPE_IMPORT_LINE, "toy_recipes.bad_import_error"),
         traceback=True, more=import_error_lines),
    Case("recipe-without-loss", recipe("bad_no_loss"), ("toy_recipes.bad_no_loss", "loss(model, batch)")),
    Case("recipe-without-data", recipe("bad_no_data"), ("toy_recipes.bad_no_data", "data(cfg)")),
    Case("recipe-config-not-a-dataclass", recipe("bad_config_not_dataclass"),
         ("toy_recipes.bad_config_not_dataclass", "@dataclass")),
    Case("recipe-field-unknown", nproc2("recipe.hiden=3"), ("recipe.hidden", "recipe.hiden")),
    Case("recipe-field-wrong-type", nproc2("recipe.hidden=wide"), ("'wide'", "recipe.hidden", "int")),
    Case("model-not-a-module", recipe("bad_model_not_module"), ("nn.Module", "model()", "dict")),
    Case("ragged-items-without-collate", recipe("bad_ragged_items"),
         ("toy_recipes.bad_ragged_items", "default collate", "add `collate(items)` to the recipe")),
    Case("loss-under-no-grad", recipe("bad_loss_no_grad"), ("toy_recipes.bad_loss_no_grad", "does not require grad",
                                                           "torch.no_grad()")),
    Case("loss-under-no-grad-one-process", lambda c: ["run", c.config(recipe={"name": "toy_recipes.bad_loss_no_grad"})],
         ("does not require grad", "toy_recipes.bad_loss_no_grad")),  # found at the first step, after the start-up line
    Case("model-on-meta", recipe("bad_model_on_meta"), ("toy_recipes.bad_model_on_meta", "meta device", "to_empty")),
    Case("model-on-meta-one-process", lambda c: ["run", c.config(recipe={"name": "toy_recipes.bad_model_on_meta"})],
         ("toy_recipes.bad_model_on_meta", "meta device")),
    Case("model-without-parameters", recipe("bad_no_parameters"), ("toy_recipes.bad_no_parameters", "no parameters")),
    Case("model-without-parameters-one-process",
         lambda c: ["run", c.config(recipe={"name": "toy_recipes.bad_no_parameters"})], ("no parameters",)),
    Case("data-raises", recipe("bad_data_raises"),
         ("/nonexistent/bad_data_raises/train.bin", "FileNotFoundError", "data()"), more=data_error_line),
    Case("data-not-a-pair", recipe("bad_data_not_pair"), ("toy_recipes.bad_data_not_pair", "data()", "pair")),
    # ------------------------------------------------------------ batch sizes
    # digits: 1797 samples, 20% validation: 1438 to train on.
    Case("train-set-smaller-than-global-batch", in_file(train={"global_batch_size": 2048, "micro_batch_size": None}),
         ("1438", "2048", "data.tail=wrap")),
    # 3 samples cannot split over 2 ranks whatever the micro batch: 2 or 4 can.
    Case("global-batch-not-divisible", in_file(train={"global_batch_size": 3, "micro_batch_size": None}),
         ("global_batch_size=3", ("2 or 4", "[2, 4]", "2, 4"))),
    Case("strategy-single-on-2-processes", in_file(strategy="single"), ("strategy=single", "ddp")),
    # ------------------------------------------------------------ launching
    Case("nproc-zero", lambda c: ["run", c.config(), "--nproc", 0], ("at least 1", "--nproc")),
    Case("nnodes-zero", lambda c: ["run", c.config(), "--nproc", 2, "--nnodes", 0], ("--nnodes 0", "at least 1")),
    Case("node-rank-outside-nnodes", lambda c: ["run", c.config(), "--nproc", 2, "--nnodes", 2, "--node-rank", 2,
                                                "--rdzv-endpoint", "127.0.0.1:29555"], ("--node-rank 2", "0 to 1")),
    Case("negative-max-restarts", lambda c: ["run", c.config(), "--nproc", 2, "--max-restarts", -1],
         ("--max-restarts -1", "0 or more")),
    Case("nnodes-without-nproc", lambda c: ["run", c.config(), "--nnodes", 2], ("--nnodes", "need --nproc")),
    Case("rank-variables-left-in-the-shell", lambda c: c.env.update(RANK="0", WORLD_SIZE="2") or ["run", c.config()],
         ("RANK=0 WORLD_SIZE=2", "MASTER_ADDR", "unset")),
    Case("rank-outside-world-size", lambda c: c.env.update(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                            MASTER_PORT="29556") or ["run", c.config()],
         ("RANK=2 is outside WORLD_SIZE=2",)),
    Case("nproc-inside-torchrun-env", nproc_inside_torchrun_env, ("--nproc", "torchrun"), once=None),
    # torchrun itself exits 1 when its worker exits 2 (and prints its own summary): the worker's
    # message must still be there, once, and the spawn it asked for must not have happened.
    Case("nproc-inside-torchrun", nproc_inside_torchrun, ("--nproc", "torchrun"), once=None,
         under_torchrun=True, exit=1),
    Case("nnodes-without-rdzv-endpoint", lambda c: ["run", c.config(), "--nproc", 2, "--nnodes", 2],
         ("--nnodes 2", "--rdzv-endpoint")),
    # an elastic job (--nnodes MIN:MAX): every world size it may take is checked before any worker
    Case("nnodes-range-reversed", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "3:2",
                                             "--rdzv-endpoint", "127.0.0.1:29555"], ("--nnodes 3:2", "MIN:MAX")),
    Case("nnodes-not-a-number", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "two"],
         ("--nnodes two", "MIN:MAX")),
    Case("elastic-with-node-rank", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "1:2", "--node-rank", 0,
                                              "--rdzv-endpoint", "127.0.0.1:29555"], ("--node-rank", "drop"),
         once="numbers its nodes itself"),
    Case("elastic-without-rdzv-endpoint", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "1:2"],
         ("--nnodes 1:2", "--rdzv-endpoint")),
    Case("rdzv-id-for-a-static-job", lambda c: ["run", c.config(), "--nproc", 2, "--rdzv-id", "job7"],
         ("--rdzv-id", "MIN:MAX")),
    Case("elastic-rdzv-conf-not-pairs", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "1:2",
                                                   "--rdzv-endpoint", "127.0.0.1:29555", "--rdzv-conf", "fast"],
         ("--rdzv-conf fast", "KEY=VALUE")),
    Case("elastic-rdzv-conf-unknown-key", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "1:2",
                                                     "--rdzv-endpoint", "127.0.0.1:29555", "--rdzv-conf",
                                                     "last_call=3"],
         ("last_call is not a setting", "last_call_timeout")),
    Case("rdzv-endpoint-without-a-port", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", 2, "--node-rank", 0,
                                                    "--rdzv-endpoint", "node0"], ("--rdzv-endpoint node0", "HOST:PORT")),
    # digits' 64 splits over 1, 2 and 4 processes, not over 3
    Case("elastic-batch-not-whole-at-one-size", lambda c: ["run", c.config(), "--nproc", 1, "--nnodes", "1:4",
                                                           "--rdzv-endpoint", "127.0.0.1:29555"],
         ("global_batch_size=64", "world size 3", "multiple of 12", "60 or 72")),
    Case("elastic-deepspeed", lambda c: ["run", c.config(strategy="deepspeed"), "--nproc", 1, "--nnodes", "1:2",
                                         "--rdzv-endpoint", "127.0.0.1:29555"],
         ("strategy=deepspeed cannot run elastic", "world size that wrote it")),
    # ------------------------------------------------------------ optional dependencies and backends
    # ------------------------------------------------------------ speed switches that cannot run
    Case("ddp-static-graph-with-accumulation", nproc2("strategy=ddp", "ddp.static_graph=true",
                                                      "train.micro_batch_size=16"),
         ("ddp.static_graph", "accumulation", "ddp.static_graph=false"), once="cannot be combined"),
    Case("pin-memory-without-cuda", nproc2("data.pin_memory=true"), ("data.pin_memory=true", "CUDA", "auto")),
    Case("sync-batchnorm-without-cuda", nproc2("train.sync_batchnorm=true"), ("train.sync_batchnorm=true", "CUDA")),
    Case("activation-checkpointing-without-units", nproc2("train.activation_checkpointing=true"),
         ("train.activation_checkpointing", "shard_units", "false"), once="needs shard units"),
    Case("deepspeed-compile", nproc2("strategy=deepspeed", "train.compile=true"),
         ("train.compile", "deepspeed", "train.compile=false"), once="is not supported"),
    Case("fsdp-replicate-not-a-divisor", nproc2("strategy=fsdp", "fsdp.replicate=3"),
         ("fsdp.replicate=3", "world size 2", "1, 2, or nodes")),
    # ------------------------------------------------------------ tensor parallelism
    Case("tp-without-a-plan", nproc2("tp.size=2"), ("tp.size > 1 needs a tensor-parallel plan", "tp_plan(model)",
                                                    "recipes.digits")),
    Case("tp-not-a-divisor-of-the-world", tiny_gpt("tp.size=3", "--nproc", 2), ("tp.size=3", "world size 2")),
    Case("tp-under-ddp", tiny_gpt("strategy=ddp", "tp.size=2", "--nproc", 2), ("tp.size=2", "strategy=fsdp")),
    Case("tp-heads-do-not-split", tiny_gpt("tp.size=2", "--nproc", 2, n_head=3, d_model=24),
         ("n_head=3", "tp.size=2")),
    Case("tp-width-does-not-split", tiny_gpt("tp.size=2", "--nproc", 2, n_head=1, d_model=15),
         ("`blocks.0.attn.q` has 15 output features", "tp.size=2")),
    Case("tp-sequence-parallel-without-a-plan-for-it",
         tiny({"name": "toy_recipes.wild_hf", "arch": "llama", "n_head": 2, "d_model": 16}, "tp.size=2",
              "tp.sequence_parallel=true", "--nproc", 2),
         ("tp.sequence_parallel=true needs the TP plan to name", "'sequence_parallel'")),
    Case("tp-sequence-parallel-without-tp", nproc2("tp.sequence_parallel=true"),
         ("tp.sequence_parallel=true", "tp.size is 1")),
    Case("tp-elastic", tiny_gpt("tp.size=2", "--nproc", 2, "--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:29555"),
         ("tp.size=2 cannot run elastic",)),
    # ------------------------------------------------------------ float8
    Case("float8-not-installed", hidden("torchao", "precision=float8"), ("precision=float8 needs torchao",
                                                                          "pip install 'launcher[float8]'")),
    Case("float8-under-deepspeed", nproc2("strategy=deepspeed", "precision=float8"),
         ("precision=float8 with strategy=deepspeed", "strategy=fsdp")),
    Case("float8-settings-without-float8", nproc2("float8.recipe=rowwise"), ("float8 settings", "precision=float8")),
    # ------------------------------------------------------------ checkpoints in object storage
    Case("s3-not-installed", hidden("s3fs", "checkpoint.dir=s3://bucket/run"),
         ("checkpoint.dir=s3://bucket/run cannot be used", "pip install 'launcher[s3]'")),
    Case("s3-credentials-in-url", nproc2("checkpoint.dir=s3://AKIAEXAMPLE:hunter2@bucket/run"),
         ("checkpoint.dir has credentials in its URL", "AWS_ACCESS_KEY_ID"),
         more=lambda c, err: no_secret(err, "hunter2")),
    Case("s3-whole-bucket", nproc2("checkpoint.dir=s3://bucket/"), ("checkpoint.dir=s3://bucket/ is a whole bucket",
                                                                   "s3://bucket/my-run")),
    Case("s3-under-deepspeed", nproc2("strategy=deepspeed", "checkpoint.dir=s3://bucket/run"),
         ("checkpoint.dir=s3://bucket/run is object storage", "DeepSpeed", "strategy=fsdp")),
    Case("s3-endpoint-unreachable", aws(nproc2("checkpoint.dir=s3://bucket/run"), AWS_ENDPOINT_URL="http://127.0.0.1:9",
                                        AWS_MAX_ATTEMPTS="1"),
         ("checkpoint.dir=s3://bucket/run cannot be written", "EndpointConnectionError", "AWS_ENDPOINT_URL")),
    Case("s3-no-credentials", aws(nproc2("checkpoint.dir=s3://bucket/run"), AWS_ENDPOINT_URL="http://127.0.0.1:9",
                                  AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY=""),
         ("checkpoint.dir=s3://bucket/run cannot be written", "NoCredentialsError", "AWS_ACCESS_KEY_ID")),
    Case("deepspeed-not-installed", hidden("deepspeed", "strategy=deepspeed"), ("pip install 'launcher[deepspeed]'",)),
    Case("wandb-not-installed", hidden("wandb", "log.wandb.project=demo"), ("pip install 'launcher[wandb]'",)),
    Case("tensorboard-not-installed", hidden("tensorboard", "log.tensorboard=true"),
         ("pip install 'launcher[tensorboard]'",)),
    Case("deepspeed-fp16-on-cpu", nproc2("strategy=deepspeed", "precision=fp16"),
         ("fp16", "CPU", ("bf16", "fp32", "strategy=ddp")), once=None),
    Case("deepspeed-offload-params-without-stage-3", in_file(strategy="deepspeed", deepspeed={"offload_params": True}),
         ("deepspeed.offload_params", "zero_stage=3")),
    Case("deepspeed-config-missing",
         lambda c: ["run", c.config(strategy="deepspeed", deepspeed={"config": str(c.tmp / "ds.json")}), "--nproc", 2],
         ("<tmp>/ds.json", "deepspeed.config")),
    Case("deepspeed-config-not-json", deepspeed_json("{zero_optimization: stage 2"), ("<tmp>/ds.json", "JSON")),
    Case("deepspeed-config-contradicts-batch", deepspeed_json('{"train_batch_size": 128}'),
         ("train_batch_size=128", "train.global_batch_size")),
    # ------------------------------------------------------------ the run dir and checkpoints
    Case("run-dir-under-a-file", run_dir_under_a_file, ("<tmp>/afile/run", "run_dir")),
    Case("resume-from-nothing", resume_from_missing, ("<tmp>/nowhere", "checkpoint.resume", "auto")),
    Case("resume-without-meta-json", damaged_checkpoint(5, "meta.json"), ("<tmp>/ckpt/step_000005", "meta.json")),
    Case("resume-without-dcp-metadata", damaged_checkpoint(10, ".metadata"),
         (".metadata", "<tmp>/ckpt/step_000010")),
    Case("resume-without-dcp-shard", damaged_checkpoint(10, "__0_0.distcp"),
         ("__0_0.distcp", "<tmp>/ckpt/step_000010")),
    Case("resume-deepspeed-at-another-world-size", deepspeed_at_another_world_size, ("--nproc 2",)),
    Case("resume-tampered-rng-file", tampered_rng, ("rng_0.pt", ("refuse", "refusing")), once=None,
         more=no_payload_ran),
    # ------------------------------------------------------------ export
    Case("export-missing-step", export_args(7, "w.safetensors"), ("step 7", "5, 10")),
    Case("export-into-unwritable-path", export_args(10, "afile/w.safetensors", damage="__0_0.distcp"),
         ("<tmp>/afile/w.safetensors", "cannot be written", "is not a directory"), once="cannot be written"),
    Case("export-not-a-run-dir", lambda c: ["export", c.tmp / "nothing", c.tmp / "w.safetensors"],
         ("<tmp>/nothing", "config.yaml")),
    Case("export-best-without-checkpoint-best", lambda c: export_args(None, "w.safetensors")(c) + ["--best"],
         ("has no best checkpoint", "checkpoint.best", "--step N")),
    Case("ls-not-a-run-dir", lambda c: ["ls", c.tmp / "nothing"], ("<tmp>/nothing", "config.yaml")),
    Case("best-without-validation-cadence", in_file(checkpoint={"best": {"monitor": "val_loss"}},
                                                    train={"eval_every_steps": None}),
         ("checkpoint.best compares validations", "train.eval_every_steps")),
    Case("early-stop-monitor-unknown", in_file(train={"eval_every_steps": 5, "early_stop": {"monitor": "acc"}}),
         ("train.early_stop.monitor=acc is not among the validation's values", "accuracy, val_loss")),
    # ------------------------------------------------------------ the loss contract (found at the first step)
    Case("loss-per-sample", recipe("bad_loss_per_sample", train={"global_batch_size": 48, "micro_batch_size": 24}),
         ("(total, count)", ("[24]", "(24,)"), "scalar"), workers_start=True),
    Case("loss-nanogpt-logits-and-loss", recipe("bad_loss_nanogpt"), ("(logits, loss)", "(total, count)", "scalar"),
         workers_start=True),
]


# A stack frame in the launcher's own code, traceback style or file:line style.
LAUNCHER_FRAME = re.compile(r'File "[^"]*[/\\]launcher[/\\][\w/\\]+\.py"|[/\\]launcher[/\\][\w/\\]+\.py:\d+')


def tree(root: Path) -> dict:
    """Every path under root: files with their size and mtime, directories as present."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() and not path.is_symlink() else (path.stat().st_size, path.stat().st_mtime_ns)
    return out


def has(text: str, want) -> bool:
    return any(w in text for w in want) if isinstance(want, tuple) else want in text


def test_case_ids_are_distinct():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids) >= 28


# Cases that train a run first or start workers: the full suite; the rest are the fast tier.
SLOW = {"resume-without-dcp-metadata", "resume-without-dcp-shard", "resume-deepspeed-at-another-world-size",
        "resume-tampered-rng-file", "export-missing-step", "export-into-unwritable-path", "loss-per-sample",
        "loss-nanogpt-logits-and-loss", "nproc-inside-torchrun",
        # found by a model built for real, or at the first step: one of each kind stays in the fast tier
        "loss-under-no-grad-one-process", "model-on-meta-one-process", "model-without-parameters-one-process",
        "model-on-meta", "rank-outside-world-size", "duplicate-nested-key", "negative-max-restarts",
        "nnodes-without-nproc",
        # launch flags of an elastic job: the reversed range and the batch at one size stay in the fast tier
        "nnodes-not-a-number", "elastic-with-node-rank", "elastic-without-rdzv-endpoint", "rdzv-id-for-a-static-job",
        "elastic-rdzv-conf-not-pairs", "elastic-deepspeed", "elastic-rdzv-conf-unknown-key",
        "rdzv-endpoint-without-a-port"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW else c for c in CASES],
                         ids=lambda case: case.id)
def test_bad_input(case: Case, tmp_path, trained, site_dir):
    ctx = Ctx(tmp=tmp_path / "case", runs=trained)
    ctx.tmp.mkdir()
    workers = tmp_path / "workers"
    workers.mkdir()
    args = case.make(ctx)
    before = tree(ctx.tmp)
    run_dir_existed = ctx.run_dir.exists()
    path = [str(site_dir), str(ROOT), str(TEST_RECIPES.parent), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(path),
           "BAD_INPUTS_WORKERS": str(workers), "PYTHONDONTWRITEBYTECODE": "1", **ctx.env}

    proc = run(args, cwd=ctx.tmp, env=env, timeout=180, prefix=ctx.prefix)

    err, out = proc.stderr.replace(str(ctx.tmp), "<tmp>"), proc.stdout.replace(str(ctx.tmp), "<tmp>")
    both = out + err
    shown = f"exit {proc.returncode}\n--- stdout:\n{out[-3000:]}\n--- stderr:\n{err[-5000:]}"
    print(shown)  # shown by pytest -rP, for reading the messages
    assert proc.returncode == case.exit, shown

    # One message, naming the problem and the fix.
    for want in case.expect:
        assert has(err, want), f"{want!r} missing\n{shown}"
    assert len(re.findall(r"(?m)^error:", err)) == 1, f"not exactly one `error:` message\n{shown}"
    once = case.expect[0] if case.once == "default" else case.once
    if once is not None:
        assert both.count(once) == 1, f"{once!r} {both.count(once)} times\n{shown}"

    # No traceback, and never a frame of the launcher's own code (the recipe's own errors show the recipe's lines).
    if not case.under_torchrun:  # torchrun's own ChildFailedError traceback is torchrun's
        assert not LAUNCHER_FRAME.search(both), f"a launcher frame in the output\n{shown}"
        if not case.traceback:
            assert "Traceback" not in both, shown

    # No worker where the problem is knowable before spawning.
    started = list(workers.iterdir())
    if case.under_torchrun:
        assert len(started) == 1, f"{len(started)} workers: the nested --nproc spawned its own\n{shown}"
    elif not case.workers_start:
        assert not started, f"a worker started\n{shown}"
        for marker in WORKER_OUTPUT:
            assert marker not in both, f"{marker!r}: a worker started\n{shown}"

    # Nothing left behind: no run dir, and whatever existed (an earlier run dir) untouched.
    if not run_dir_existed:
        assert not ctx.run_dir.exists(), f"the bad input left {ctx.run_dir} behind: {sorted(tree(ctx.run_dir))}"
    after = tree(ctx.tmp)
    assert after == before, f"the case's directory changed: added {sorted(set(after) - set(before))}, " \
                            f"removed {sorted(set(before) - set(after))}, " \
                            f"changed {sorted(k for k in set(before) & set(after) if before[k] != after[k])}"
    if case.more:
        case.more(ctx, err)
