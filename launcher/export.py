"""`launcher export`: one consolidated safetensors file of full weights from any checkpoint.

Runs in one process, offline: DCP checkpoints (single, ddp, fsdp) are read into
a full state dict (DCP reshards on load); DeepSpeed ones are consolidated with
DeepSpeed's own zero_to_fp32. The file loads into the recipe's model() with
load_state_dict(strict=True).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import (best_checkpoint, checkpoint_dir, complete_checkpoints, latest_checkpoint, read_meta,
                         step_dir_name, step_of)
from .config import ConfigError, load_config
from .fs import check_writable, replaced_atomically
from .recipe import LightningAdapter, Recipe
from .storage import dcp_reader
from .strategies.base import single_process_quiet


def find_checkpoint(ckpt_dir: Path, step: int | None, best: bool = False) -> Path:
    if best:
        path = best_checkpoint(ckpt_dir)
        if path is None:
            raise ConfigError(f"{ckpt_dir} has no best checkpoint: it is kept for runs with checkpoint.best "
                              "{monitor: ..., mode: ...} once they have validated. Export the latest (no --best) "
                              "or a step (--step N)")
        return path
    if step is None:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise ConfigError(f"{ckpt_dir} has no complete checkpoint to export")
        return path
    path = ckpt_dir / step_dir_name(step)
    if path not in complete_checkpoints(ckpt_dir):
        have = ", ".join(str(step_of(p)) for p in complete_checkpoints(ckpt_dir)) or "none"
        raise ConfigError(f"{ckpt_dir} has no complete checkpoint at step {step} (steps saved: {have})")
    return path


def cmd_export(args) -> int:
    path, step = export(Path(args.run_dir), Path(args.out), args.step, args.best)
    print(f"wrote {path} (the weights of step {step}{', the best checkpoint' if args.best else ''})")
    return 0


def list_checkpoints(run_dir: Path) -> int:
    """`launcher ls RUN_DIR`: each complete checkpoint, its validation value if monitored, and which
    ones `latest` and `best` name."""
    cfg = run_config(run_dir)
    ckpt_dir = checkpoint_dir(cfg.checkpoint, run_dir)
    found = complete_checkpoints(ckpt_dir)
    latest, best = latest_checkpoint(ckpt_dir), best_checkpoint(ckpt_dir)
    print(f"checkpoints in {ckpt_dir}:" if found else f"no complete checkpoint in {ckpt_dir}")
    for path in found:
        val = ", ".join(f"{k}={v:.4g}" for k, v in read_meta(path).get("val", {}).items())
        marks = ", ".join(name for name, p in (("latest", latest), ("best", best)) if p == path)
        print(f"  {path.name}  {val:<40} {marks}".rstrip())
    return 0


def run_config(run_dir: Path):
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml in it)")
    return load_config(run_dir / "config.yaml")


def export(run_dir: Path, out: Path, step: int | None = None, best: bool = False) -> tuple[Path, int]:
    """Write the weights of the checkpoint of `step` (default: the latest; best: the best); returns (file, step)."""
    if out.is_dir():
        raise ConfigError(f"{out} is a directory: give the file to write, e.g. {out / 'model.safetensors'}")
    check_writable(out.parent, f"{out} (its folder, {out.parent})",  # before the (long) load, not after
                   "give another output path, or fix the folder's permissions")
    cfg = run_config(run_dir)
    ckpt = find_checkpoint(checkpoint_dir(cfg.checkpoint, run_dir), step, best)
    recipe = Recipe.load(cfg.recipe, str(run_dir / "config.yaml"))
    model = recipe.build_model()
    meta = read_meta(ckpt)
    if meta["strategy"] == "deepspeed":
        state = deepspeed_full_state(ckpt)
    else:
        state = dcp_full_state(ckpt, model)
    if isinstance(model, LightningAdapter):  # the file loads into the user's module itself
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model = model.module if isinstance(model, LightningAdapter) else model
    model.load_state_dict(state, strict=True)  # fail here, not in the user's hands
    return write_safetensors(model.state_dict(), out), meta["step"]


def dcp_full_state(ckpt: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {"model": dict(model.state_dict())}
    with single_process_quiet():
        dcp.load(state, storage_reader=dcp_reader(ckpt))
    return state["model"]


def deepspeed_full_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The module's state as DeepSpeed saved it (buffers, and under ZeRO 0-2 the full
    parameters), overridden by the fp32 master weights zero_to_fp32 gathers from
    the ZeRO partitions (stages 1-3; stage 0 has none)."""
    from .strategies.deepspeed import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # mp_rank_00_model_states.pt, or under ZeRO-3 one per rank (zero_pp_rank_0_mp_rank_00_...)
    states_file = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))[0]
    state = torch.load(states_file, map_location="cpu", weights_only=False)["module"]
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):
        state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def write_safetensors(state: dict[str, torch.Tensor], out: Path) -> Path:
    from safetensors.torch import save_file

    # Tied weights are one tensor under two names; safetensors wants separate storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out) as tmp:  # never a half-written file under the final name
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return out
