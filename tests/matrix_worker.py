"""One rank of tests/test_matrix.py's 2-process tier: every pair of a spec trained in this process.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/matrix_worker.py SPEC.json OUT.json

The two ranks join one gloo group once, then build and fit a `launcher.trainer.Trainer` for each pair of
SPEC.json ({"pairs": {name: config dict}}, each with its own run_dir) in order, as `launcher run` does in
a worker after preflight (`run.run_worker` -> `trainer.train`): Trainer(...).fit(), then strategy.close().
Rank 0 writes OUT.json after every pair: {"fused_on_dtensor": {optimizer: steps DTensors},
"pairs": {name: {"steps", "losses", "flags", "seconds"}}, "failed": {"pair", "traceback"}}. A pair that
raises ends the worker (exit 1) after its traceback is written: a rank that failed inside a collective
leaves the other waiting in it, so nothing after it could be trusted. The process leaves as the CLI does
(docs/design.md, Process exit): flush, then os._exit.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path


def fused_on_dtensor() -> dict[str, bool]:
    """What torch really does: one fused step of each optimizer on a parameter sharded over the group,
    True where it ran, False where the fused op has no DTensor sharding rule (NotImplementedError).
    test_matrix compares it with launcher.optim.dtensor_runs_fused, which reads torch's registries."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        try:
            cls([p], lr=0.1, fused=True).step()
            out[name] = True
        except NotImplementedError:
            out[name] = False
    return out


def main() -> int:
    import torch

    from launcher.config import validate
    from launcher.env import destroy_process_group, detect, init_process_group
    from helpers import monitoring
    from launcher.trainer import Trainer

    spec, out_path = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    env = detect()
    device = torch.device("cpu")
    init_process_group(env, device, 120)
    result: dict = {"fused_on_dtensor": fused_on_dtensor(), "pairs": {}}

    def write() -> None:
        if env.rank == 0:
            out_path.write_text(json.dumps(result, indent=1))

    write()
    for name, raw in spec["pairs"].items():
        started = time.perf_counter()
        try:
            cfg = validate(raw, name)
            trainer = Trainer(cfg, env, device)
            groups = trainer.strategy.optimizer.param_groups
            flags = sorted({(bool(g["foreach"]), bool(g["fused"])) for g in groups})
            trainer.fit()
            trainer.strategy.close()
        except BaseException:  # noqa: BLE001 - reported by the test, pair by pair
            result["failed"] = {"pair": name, "rank": env.rank, "traceback": traceback.format_exc()}
            if env.rank == 0:
                write()
            else:  # rank 0 may still be inside a collective: say it here, the test shows this rank's stderr
                print(f"matrix_worker rank {env.rank} failed at {name}:\n{result['failed']['traceback']}",
                      file=sys.stderr)
            return 1
        del trainer
        if env.rank == 0:
            rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "split" not in r]
            result["pairs"][name] = {"steps": [r["step"] for r in rows],
                                     "losses": [r["loss"] for r in rows],  # NaN and inf survive json
                                     "flags": [list(f) for f in flags],
                                     "monitoring": monitoring(Path(cfg.run_dir)),
                                     "seconds": round(time.perf_counter() - started, 3)}
            write()
        # ZeRO-3's set-up calls gc.collect() (deepspeed's defragment), which walks every object the
        # process holds: torch, dynamo and deepspeed's modules, 0.4 s a pair on 2 shared cores. This
        # pair's garbage is collected here, and what is left (imports, mostly) is frozen: later
        # collections skip it.
        gc.collect()
        gc.freeze()
    destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: `launcher`, `recipes`
    code = 1
    try:
        code = main()
    except BaseException:  # noqa: BLE001 - the group could not form: shown by the test
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
