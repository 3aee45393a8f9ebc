"""The training row: what the steps since the last row add up to (docs/design.md, Host syncs and
what a row measures).

The window keeps each step's loss on the device; the row is the one host read of the steps it
covers, and its one all-reduce also carries the stop signals of every rank. Rates are wall time
over the window: the row's read has drained the device's queue, so no step needs a sync.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from .env import all_reduce_sum


@dataclass
class StepOutput:
    loss_num: torch.Tensor  # this rank's loss numerator for the logged loss (on the device)
    loss_den: torch.Tensor
    grad_norm: torch.Tensor | None  # on the device: read only when a row is logged (None when not computed)
    lr: float  # the rate this step used (the schedule moves on after it)


class Window:
    """What the steps since the last logged row add up to, kept on the device until it is logged."""

    def __init__(self):
        self.nums: list[torch.Tensor] = []  # each step's loss numerator and denominator, on the device
        self.dens: list[torch.Tensor] = []
        self.start = self.started = time.perf_counter()
        self.data_wait = 0.0  # seconds the loop waited for the data loader
        self.untimed = 0  # a compiling first step: in the loss, not in the rates (when others follow)
        self.last: StepOutput | None = None

    def add(self, out: StepOutput) -> None:
        self.nums.append(out.loss_num)
        self.dens.append(out.loss_den)
        self.last = out

    def sums(self) -> torch.Tensor:
        return torch.stack([torch.stack(self.nums).sum(), torch.stack(self.dens).sum()])

    @property
    def steps(self) -> int:
        return len(self.nums)

    def timing(self, now: float) -> tuple[int, float]:
        """(steps, seconds) to measure rates over."""
        if self.untimed and self.steps > self.untimed:
            return self.steps - self.untimed, now - self.start
        return self.steps, now - self.started

    def leave_out_of_timing(self) -> None:
        self.untimed, self.started, self.start, self.data_wait = self.steps, self.start, time.perf_counter(), 0.0


class RowMaker:
    """Builds a window's training row: loss, rate, gradient norm, throughput, MFU, memory."""

    def __init__(self, sizes, world_size: int, device: torch.device, precision: str, tokens_per_sample: float | None,
                 flops_per_sample: float | None):
        self.sizes, self.world_size, self.device = sizes, world_size, device
        self.tokens_per_sample, self.flops_per_sample = tokens_per_sample, flops_per_sample
        self.peak_flops = peak_flops(device, precision)

    def row(self, step: int, epoch: int, window: Window, elapsed: float, stop_requested: bool) -> tuple[dict, bool]:
        """(the row, whether a stop signal reached any rank): the loss sums and the stop flags in one
        all-reduce."""
        stop = torch.tensor([float(stop_requested)], device=self.device)
        num, den, stopping = all_reduce_sum(torch.cat([window.sums(), stop])).tolist()
        steps, seconds = window.timing(time.perf_counter())
        last = window.last
        # A mean loss contributes one local mean per step and rank; a pair, its totals and counts.
        samples_per_s = steps * self.sizes.global_batch / max(seconds, 1e-9)
        row = {
            "step": step, "epoch": epoch, "loss": num / den if den else float("nan"),
            "lr": last.lr, "grad_norm": last.grad_norm.item() if last.grad_norm is not None else float("nan"),
            "step_time": seconds / steps, "data_wait": min(1.0, window.data_wait / max(seconds, 1e-9)),
            "samples_per_s": samples_per_s, "time": round(elapsed, 3),
            "world_size": self.world_size,  # an elastic job's changes: `launcher plot` marks them
        }
        if self.tokens_per_sample:
            row["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_sample and self.peak_flops:
            row["mfu"] = samples_per_s * self.flops_per_sample / (self.world_size * self.peak_flops)
        row.update(memory_figures(self.device))
        return row, stopping > 0


def memory_figures(device: torch.device) -> dict:
    """Peak memory so far, read without waiting for the device: the CUDA caching allocator's
    high-water marks and its retries (a retry means it freed its cache to satisfy a request:
    memory is tight), or on the CPU the process's peak resident set size."""
    gib = 1024**3
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem_max_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / gib,
                "mem_max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
                "alloc_retries": stats.get("num_alloc_retries", 0)}
    import resource

    return {"mem_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}  # KiB on Linux


# (name, bf16/fp16, fp32) peak FLOP/s of one GPU: NVIDIA's datasheet figures, dense (the datasheets'
# headline tensor figures are "with sparsity", twice these); bf16/fp16 on tensor cores, fp32 without
# TF32 (torch leaves it off for matmuls). The PCIe and NVL cards are slower than the SXM parts, whose
# names carry no form factor ("NVIDIA H100 80GB HBM3"). Matched as whole words of the device name,
# first match first: "H100 PCIe" before "H100"; "L4" is not "L40", "A10" neither "A100" nor "A10G"
# (not listed: no MFU rather than a wrong one).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 51e12), ("H100 NVL", 835e12, 60e12), ("H100", 989e12, 67e12),
    ("H200 NVL", 835e12, 60e12), ("H200", 989e12, 67e12), ("GH200", 989e12, 67e12),
    ("H800 PCIe", 756e12, 51e12), ("H800", 989e12, 67e12),
    ("A100", 312e12, 19.5e12), ("A800", 312e12, 19.5e12),  # SXM and PCIe alike
    ("L40S", 362e12, 91.6e12), ("L40", 181e12, 90.5e12), ("L4", 121e12, 30.3e12), ("A10", 125e12, 31.2e12),
    ("4090", 165e12, 82.6e12),
)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one device, for MFU; None where unknown (CPU, a GPU not in PEAK_FLOPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, half, fp32 in PEAK_FLOPS:
        if re.search(rf"\b{part}\b", name):
            return fp32 if precision == "fp32" else half
    return None


def peak_memory_per_rank(device: torch.device, world_size: int) -> list[float]:
    """Each rank's peak memory so far in GiB (the device's allocator on CUDA, the resident set on the CPU),
    gathered on every rank."""
    figures = memory_figures(device)
    mine = figures.get("mem_max_allocated_gib", figures.get("mem_rss_gib", 0.0))
    if world_size == 1 or not torch.distributed.is_initialized():
        return [mine]
    every: list = [None] * world_size
    torch.distributed.all_gather_object(every, mine)
    return every


def setup_memory_line(device: torch.device, world_size: int) -> str:
    """What building and sharding the model cost each rank (launcher plan states what to expect)."""
    peaks = peak_memory_per_rank(device, world_size)
    where = "CUDA allocated" if device.type == "cuda" else "resident set"
    return f"set-up peak memory per rank (GiB): {' '.join(f'{p:.2f}' for p in peaks)} ({where})"
