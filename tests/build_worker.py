"""One rank of tests/test_build.py's 2-process cases: how each rank built the model, and what it started from.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/build_worker.py SPEC.json OUT_DIR

The two ranks join one gloo group once, then for each case of SPEC.json ({"cases": {name: config dict}})
build a `launcher.trainer.Trainer` as a worker of `launcher run` does, and record, before any step:
every call of the recipe's model() with the default device it ran under, whether this rank held a whole
host copy (build.ModelSource.host_copy), a hash of the torch RNG state, and (rank 0) the full initial
weights and buffers, gathered. Then the case trains its steps (fit), so that a later case of the same run
dir resumes from its checkpoint. Each rank writes OUT_DIR/rank<r>.json after every case, rank 0 also
OUT_DIR/<case>.pt. The process leaves as the CLI does (docs/design.md, Process exit).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path


def gathered_state(strategy, model) -> dict:
    """Every parameter and buffer whole, under the module's own names (a collective)."""
    from helpers import full_state_dict

    state = full_state_dict(strategy)
    for name, buffer in model.named_buffers():  # non-persistent ones too: they are in no state dict
        state[name] = buffer.detach().cpu().clone()
    return state


def main() -> int:
    import torch

    from launcher import build
    from launcher.config import validate
    from launcher.env import destroy_process_group, detect, init_process_group
    from launcher.recipe import Recipe, unwrap
    from launcher.trainer import Trainer

    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    env = detect()
    device = torch.device("cpu")
    init_process_group(env, device, 120)
    record: dict = {"builds": [], "copies": 0}
    original_build, original_copy = Recipe.build_model, build.ModelSource.host_copy

    def build_model(self):
        record["builds"].append(torch.get_default_device().type)
        return original_build(self)

    def host_copy(self):
        whole = original_copy(self)
        record["copies"] += whole is not None
        return whole

    Recipe.build_model, build.ModelSource.host_copy = build_model, host_copy
    result: dict = {}
    for name, raw in spec["cases"].items():
        record.update(builds=[], copies=0)
        try:
            cfg = validate(raw, name)
            trainer = Trainer(cfg, env, device)
            model = unwrap(trainer.strategy.model)
            result[name] = {"builds": record["builds"], "copies": record["copies"],
                            "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
                            "resumed": trainer.resumed_from is not None}
            state = gathered_state(trainer.strategy, model)
            if env.rank == 0:
                torch.save(state, out / f"{name}.pt")
            trainer.fit()
            trainer.strategy.close()
            del trainer, model, state
        except BaseException:  # noqa: BLE001 - reported by the test, case by case
            result[name] = {"failed": traceback.format_exc()}
            (out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
            return 1
        (out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
        gc.collect()
    destroy_process_group()
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]  # the repository (`launcher`, `recipes`), and tests/ (helpers)
    code = 1
    try:
        code = main()
    except BaseException:  # noqa: BLE001 - the group could not form: shown by the test
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
