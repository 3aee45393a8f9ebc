"""scripts/gpu_check.py --smoke: the GPU check's code paths on the CPU, so the script is known to
run before a GPU lease starts. About a minute on 2 cores; the first run on a machine
adds DeepSpeed's build of its CPU communication op (~1 min, cached after)."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from helpers import ROOT, worker_env

CHECKS = ["bf16", "compile", "fp16", "activation_ckpt", "plan_memory", "async_ckpt", "export", "ddp", "fsdp",
          "fsdp_offload", "zero2", "sync_debug", "offload_nan", "setup_memory", "float8", "tp_mesh"]
NEED_CUDA = {"plan_memory", "setup_memory"}  # compare CUDA's allocator with the plan: nothing to compare on the CPU


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=worker_env(), capture_output=True, text=True, timeout=480)
    return proc, (json.loads(out.read_text()) if out.is_file() else None)


@pytest.mark.slow
def test_smoke_runs_every_check_and_none_fails(smoke):
    proc, report = smoke
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    assert report["mode"] == "smoke" and list(report["checks"]) == CHECKS
    lines = proc.stdout.splitlines()
    for name, result in report["checks"].items():
        assert result["status"] != "failed", (name, result)
        assert any(line.startswith(f"{name}: {result['status']}") for line in lines), (name, proc.stdout)
    optional = {"zero2": "deepspeed", "float8": "torchao"}
    can_run = [n for n in CHECKS if n not in NEED_CUDA and (n not in optional or importlib.util.find_spec(optional[n]))]
    assert [n for n in can_run if report["checks"][n]["status"] != "ok"] == []
    for name in NEED_CUDA:
        assert report["checks"][name]["status"] == "skipped" and report["checks"][name]["why"]


@pytest.mark.slow
def test_smoke_figures_are_sane(smoke):
    _, report = smoke
    checks = {name: r["figures"] for name, r in report["checks"].items() if r["status"] == "ok"}
    for name, figures in checks.items():
        if "loss_first" in figures:  # every run trained: finite losses that fell
            assert math.isfinite(figures["loss_last"]) and figures["loss_last"] < figures["loss_first"], name
    for name in ("bf16", "compile"):  # launcher and the hand-written loop: the same math on the CPU
        figures = checks[name]
        assert figures["loss_vs_loop"] <= 1e-6, figures
        assert figures["tokens_per_s"] > 0 and figures["loop_tokens_per_s"] > 0 and figures["ratio"] > 0
    assert checks["activation_ckpt"]["loss_vs_off"] == 0  # recomputation changes no value
    resume = checks["async_ckpt"]
    assert resume["resume_first_loss_diff"] == 0 and resume["resume_loss_diff"] == 0  # an exact resume
    assert resume["sync_blocks_s"] > 0
    assert checks["tp_mesh"]["loss_diff"] == 0 and checks["tp_mesh"]["grad_max_abs_diff"] == 0  # the same kernels
    assert checks["export"]["tensors"] > 0 and checks["export"]["file_mb"] > 0  # strict load passed
    assert {checks[n]["backend"] for n in ("ddp", "fsdp", "fsdp_offload")} == {"gloo"}
    assert report["checks"]["plan_memory"]["figures"]["plan_total_gib"] > 0
    assert report["checks"]["setup_memory"]["figures"]["plan_setup_gib"] > 0
    nan = checks["offload_nan"]  # the poisoned step skipped exactly, the run went on
    assert nan["skipped_steps"] == 1 and nan["weights_kept"] and nan["optim_state_kept"], nan
    assert {k for k in checks["sync_debug"] if k.endswith("_syncs")} >= {"single_syncs", "ddp_syncs", "fsdp_syncs"}
