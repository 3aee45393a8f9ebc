"""Code paths that only run on CUDA / NCCL, checked on the CPU: torch.cuda and torch.distributed are
patched to say what a GPU machine would say, and the calls the launcher makes are recorded."""
import collections
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig
from torch.utils.data import IterableDataset

from launcher import checkpoint, env as env_mod, rows, stream
from launcher.data import to_device
from launcher.env import DistEnv
from launcher.errors import ConfigError
from launcher.lightning import LightningRun
from launcher.step import StepRunner

CUDA0 = torch.device("cuda", 0)


def gpus(monkeypatch, count: int, current: int = 0):
    """torch.cuda as a machine with `count` visible GPUs says it, `current` being this process's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


# ---------------------------------------------------------------- the process group (env.py)


def test_a_cuda_group_has_a_cpu_backend_too():
    """FSDP's CPU-offloaded gradients and the fp16 scaler all-reduce CPU tensors: NCCL alone cannot."""
    assert env_mod.backend_for(CUDA0) == "cuda:nccl,cpu:gloo"
    assert env_mod.backend_for(torch.device("cpu")) == "gloo"
    # torch's own parser of the backend string (what init_process_group builds the group from)
    parsed = BackendConfig(Backend(env_mod.backend_for(CUDA0))).get_device_backend_map()
    assert parsed == {"cuda": "nccl", "cpu": "gloo"}


def record_init(monkeypatch) -> list[dict]:
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append({"set_device": device}))
    monkeypatch.setattr(env_mod, "rendezvous_store", lambda env, timeout_s: "store")
    monkeypatch.setattr(env_mod, "_store", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LAUNCHER_LOCAL_RANK"):  # restored after the test
        monkeypatch.setenv(key, "unset")
    return calls


def test_init_process_group_joins_with_both_backends(monkeypatch):
    calls = record_init(monkeypatch)
    env_mod.init_process_group(DistEnv("torchrun", rank=1, world_size=2, local_rank=1), torch.device("cuda", 1), 60)
    assert calls[0] == {"set_device": torch.device("cuda", 1)}
    assert calls[1]["backend"] == "cuda:nccl,cpu:gloo" and calls[1]["device_id"] == torch.device("cuda", 1)


def test_the_private_group_of_one_has_both_backends(monkeypatch):
    calls = record_init(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE")
    env_mod.ensure_process_group(CUDA0)
    assert calls[0]["backend"] == "cuda:nccl,cpu:gloo" and calls[0]["device_id"] == CUDA0
    env_mod.ensure_process_group(torch.device("cpu"))
    assert calls[1]["backend"] == "gloo" and calls[1]["device_id"] is None


# ---------------------------------------------------------------- one GPU per process (env.py)


def test_more_processes_than_gpus_is_bad_input(monkeypatch):
    gpus(monkeypatch, 2)
    with pytest.raises(ConfigError) as e:
        env_mod.check_gpus(4)
    message = str(e.value)
    assert "4 processes" in message and "2 GPU" in message
    assert "--nproc" in message and "CUDA_VISIBLE_DEVICES" in message
    env_mod.check_gpus(2)
    env_mod.check_gpus(1)


def test_check_gpus_is_a_no_op_without_cuda(monkeypatch):
    gpus(monkeypatch, 0)
    env_mod.check_gpus(8)


def test_device_for_refuses_a_gpu_another_rank_has(monkeypatch):
    gpus(monkeypatch, 2)
    assert env_mod.device_for(DistEnv("torchrun", rank=1, world_size=2, local_rank=1, local_world_size=2)) == \
        torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):  # not local_rank % 2 = GPU 0, rank 0's
        env_mod.device_for(DistEnv("torchrun", rank=2, world_size=3, local_rank=2, local_world_size=3))
    with pytest.raises(ConfigError, match="3 processes"):  # rank 0 of that node too: none waits for the others
        env_mod.device_for(DistEnv("torchrun", rank=0, world_size=3, local_rank=0, local_world_size=3))
    with pytest.raises(ConfigError):  # srun with 2 GPUs visible to each task: still one each, or refused
        env_mod.device_for(DistEnv("slurm", rank=2, world_size=3, local_rank=2, local_world_size=3))
    gpus(monkeypatch, 0)
    assert env_mod.device_for(DistEnv("torchrun", rank=2, world_size=3, local_rank=2)) == torch.device("cpu")


def test_srun_with_one_gpu_bound_per_task(monkeypatch):
    """srun --gpus-per-task=1: each task sees its own GPU as device 0, whatever its SLURM_LOCALID."""
    gpus(monkeypatch, 1)
    task = DistEnv("slurm", rank=3, world_size=4, local_rank=3, local_world_size=4)
    assert env_mod.device_for(task) == CUDA0
    with pytest.raises(ConfigError):  # torchrun's local ranks share the node's GPUs: 1 is not enough for 4
        env_mod.device_for(DistEnv("torchrun", rank=3, world_size=4, local_rank=3, local_world_size=4))


def test_local_rank_names_the_device_the_process_uses(monkeypatch):
    """DeepSpeed's engine calls set_device(int(os.environ["LOCAL_RANK"])): it must be the task's device (0),
    not its SLURM_LOCALID (3), which is no device of a task that sees one GPU."""
    calls = record_init(monkeypatch)
    task = DistEnv("slurm", rank=3, world_size=4, local_rank=3, local_world_size=4)
    env_mod.init_process_group(task, CUDA0, 60)
    assert os.environ["LOCAL_RANK"] == "0"
    assert os.environ["LAUNCHER_LOCAL_RANK"] == "3"  # the node-local rank, for fs.first_on_node
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")
    assert calls[1]["device_id"] == CUDA0


# ---------------------------------------------------------------- RNG states (checkpoint.py)


class FakeGenerators:
    """torch.cuda's RNG calls over `count` devices; a device beyond them is an IndexError, as
    torch.cuda.default_generators[idx] is."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.count, self.current, self.set = count, current, []
        gpus(monkeypatch, count, current)
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "device_count", lambda: count)
            monkeypatch.setattr(module, "current_device", lambda: current)
            monkeypatch.setattr(module, "get_rng_state", self.get_rng_state)
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)

    def index(self, device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def get_rng_state(self, device="cuda"):
        idx = self.index(device)
        if idx >= self.count:
            raise IndexError(idx)
        return torch.full((8,), idx, dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        idx = self.index(device)
        if idx >= self.count:
            raise IndexError(idx)
        self.set.append((int(state[0]), idx))


def test_rng_state_saves_this_process_device_only(monkeypatch):
    FakeGenerators(monkeypatch, count=4, current=2)
    saved = checkpoint.rng_state()["cuda"]
    assert torch.is_tensor(saved) and torch.equal(saved, torch.full((8,), 2, dtype=torch.uint8))


def test_rng_state_restores_on_fewer_gpus(monkeypatch):
    """A checkpoint written where 4 GPUs were visible, resumed where 2 are."""
    cpu_state = checkpoint.rng_state()
    cuda = FakeGenerators(monkeypatch, count=2, current=1)
    old = {**cpu_state, "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]}  # an older checkpoint's list
    checkpoint.set_rng_state(old)
    assert cuda.set == [(1, 1)]  # this device's entry, on this device
    checkpoint.set_rng_state({**cpu_state, "cuda": torch.full((8,), 7, dtype=torch.uint8)})
    assert cuda.set[-1] == (7, 1)


def test_an_old_list_without_this_device_is_skipped(monkeypatch):
    cpu_state = checkpoint.rng_state()
    cuda = FakeGenerators(monkeypatch, count=4, current=3)
    checkpoint.set_rng_state({**cpu_state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 2})
    assert cuda.set == []


# ---------------------------------------------------------------- batches to the device (data.py)


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    name: str = "b"
    total: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        self.total = self.x.sum()


Pair = collections.namedtuple("Pair", "x y")


class Tagged(collections.UserDict):
    def __init__(self, data, tag):
        super().__init__(data)
        self.tag = tag


def all_tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, collections.abc.Mapping):
        for v in value.values():
            yield from all_tensors(v)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from all_tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from all_tensors(v)


@pytest.mark.parametrize("make", [
    lambda: {"x": torch.ones(2), "y": [torch.ones(1), (torch.zeros(3), "s")]},
    lambda: collections.OrderedDict(x=torch.ones(2), y=torch.zeros(1)),
    lambda: collections.defaultdict(list, x=torch.ones(2)),
    lambda: Tagged({"x": torch.ones(2), "nested": {"y": torch.ones(1)}}, tag="t"),
    lambda: Batch(torch.ones(2), torch.zeros(2)),
    lambda: Pair(torch.ones(2), torch.zeros(2)),
    lambda: [torch.ones(2), (torch.ones(1),)],
], ids=["dict", "ordereddict", "defaultdict", "userdict", "dataclass", "namedtuple", "list"])
def test_to_device_moves_every_tensor_and_keeps_the_type(make):
    batch = make()
    moved = to_device(batch, torch.device("meta"))
    assert type(moved) is type(batch)
    tensors = list(all_tensors(moved))
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.device.type == "cpu" for t in all_tensors(batch))  # the batch itself is left as it was
    if isinstance(batch, Tagged):
        assert moved.tag == "t"
    if isinstance(batch, collections.defaultdict):
        assert moved.default_factory is list
    if isinstance(batch, Batch):
        assert moved.name == "b"


def test_to_device_moves_a_batch_encoding():
    transformers = pytest.importorskip("transformers")
    batch = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long),
                                        "attention_mask": torch.ones(2, 3, dtype=torch.long)})
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved, transformers.BatchEncoding)
    assert moved["input_ids"].device.type == "meta" and moved.attention_mask.device.type == "meta"
    assert batch["input_ids"].device.type == "cpu"


# ---------------------------------------------------------------- a step's count (step.py)


def test_a_step_count_is_summed_without_a_copy_to_the_device():
    runner = SimpleNamespace(device=torch.device("cpu"), whole_step_local=True, one=torch.ones(()))
    nums = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    for dens, expected in (([3, 4, 5], 12.0), ([torch.tensor(2), torch.tensor(3, dtype=torch.int32), 4.0], 9.0),
                           ([torch.tensor(2.5, dtype=torch.float64)] * 3, 7.5)):
        num, den = StepRunner.normalise(runner, nums, dens, pair=True)
        assert float(num) == 6.0 and float(den) == expected and den.dtype == torch.float32 and den.dim() == 0
    num, den = StepRunner.normalise(runner, nums[:1], [7], pair=True)
    assert float(den) == 7.0 and den.dtype == torch.float32


# ---------------------------------------------------------------- what a LightningModule logs (lightning.py)


def lightning_run(device: torch.device) -> LightningRun:
    state = SimpleNamespace(cfg=None, env=DistEnv("torchrun", rank=0, world_size=2, local_rank=0, local_world_size=2),
                            sizes=SimpleNamespace(micro_batch=4), device=device, step=0, epoch=0, total_steps=10)
    return LightningRun(torch.nn.Linear(2, 2), state)


class Reduced(Exception):
    pass


@pytest.mark.parametrize("value, reduce_fx", [(3.0, "mean"), (torch.tensor(3.0), "mean"), (torch.tensor(3.0), "sum"),
                                              (torch.tensor(3.0), "max"), (2, "min")],
                         ids=["number-mean", "cpu-mean", "cpu-sum", "cpu-max", "number-min"])
def test_logged_values_are_reduced_on_the_run_device(monkeypatch, value, reduce_fx):
    """NCCL reduces device tensors only: a value logged as a Python number or a CPU tensor is moved to
    the run's device (here the meta device stands for the GPU) before its all-reduce."""
    run = lightning_run(torch.device("meta"))
    run.log("x", value, reduce_fx=reduce_fx, sync_dist=True, on_step=False, on_epoch=True)
    seen = []

    def all_reduce(t, op=None):
        seen.append(t)
        raise Reduced  # a meta tensor cannot be read back: the device is what this test asks about

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        run.end_epoch()
    assert [t.device for t in seen] == [torch.device("meta")]
    assert seen[0] is not run.epoch_logs["x"].total  # reduced in place: a copy, not what the run keeps


# ---------------------------------------------------------------- pinned memory for streams (stream.py)


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(10)


def stream_cfg(pin_memory):
    return SimpleNamespace(data=SimpleNamespace(num_workers=0, pin_memory=pin_memory, prefetch_factor=None),
                           train=SimpleNamespace(seed=0))


@pytest.mark.parametrize("pin_memory, cuda, expected", [(False, True, False), ("auto", True, True),
                                                        ("auto", False, False), (True, True, True)])
def test_a_stream_pins_memory_as_data_pin_memory_says(monkeypatch, pin_memory, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device = CUDA0 if cuda else torch.device("cpu")
    data = stream.train_data(Stream(), SimpleNamespace(), 0, stream_cfg(pin_memory), None, device)
    assert data.pin_memory is expected


def test_a_stream_refuses_pin_memory_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="pin_memory"):
        stream.train_data(Stream(), SimpleNamespace(), 0, stream_cfg(True), None, torch.device("cpu"))


# ---------------------------------------------------------------- MFU's peak (rows.py)


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12),     # SXM
    ("NVIDIA H100 PCIe", 756e12, 51e12),
    ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA H200", 989e12, 67e12),
    ("NVIDIA H200 NVL", 835e12, 60e12),
    ("NVIDIA GH200 480GB", 989e12, 67e12),
    ("NVIDIA H800", 989e12, 67e12),
    ("NVIDIA H800 PCIe", 756e12, 51e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 19.5e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 19.5e12),
    ("NVIDIA A800-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA L40", 181e12, 90.5e12),
    ("NVIDIA L4", 121e12, 30.3e12),
    ("NVIDIA A10", 125e12, 31.2e12),
    ("NVIDIA GeForce RTX 4090", 165e12, 82.6e12),
    ("NVIDIA A10G", None, None),   # not the A10: no figure rather than a wrong one
    ("NVIDIA H20", None, None),    # not an H200
    ("Tesla V100-SXM2-16GB", None, None),
])
def test_peak_flops_by_device_name(monkeypatch, name, bf16, fp32):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert rows.peak_flops(CUDA0, "bf16") == bf16
    assert rows.peak_flops(CUDA0, "fp16") == bf16
    assert rows.peak_flops(CUDA0, "fp32") == fp32
    assert rows.peak_flops(torch.device("cpu"), "bf16") is None


# ---------------------------------------------------------------- fsdp.cpu_offload with a fused optimizer


def test_a_fused_step_on_the_host_gets_the_gpu_flag_by_a_blocking_copy():
    """Under FSDP's cpu_offload the fused optimizer steps on the host while the non-finite flag lives on
    the GPU; torch's fused step copies it with non_blocking=True and reads it at once. The strategy hands
    it a host copy made by a blocking copy instead, and leaves a flag already where the kernels run."""
    from launcher.strategies.base import flag_where

    copies = []

    class GpuFlag:
        device = torch.device("cuda", 0)

        def to(self, device, non_blocking=False):
            copies.append((torch.device(device), non_blocking))
            return torch.zeros(())

    assert flag_where(GpuFlag(), torch.device("cpu")).device.type == "cpu"
    assert copies == [(torch.device("cpu"), False)]
    same = torch.zeros(())
    assert flag_where(same, torch.device("cpu")) is same


def test_the_optimizer_gets_its_flag_on_the_parameters_device(monkeypatch):
    from launcher.precision import Precision
    from launcher.strategies import base
    from launcher.strategies.single import SingleStrategy

    seen = []
    monkeypatch.setattr(base, "flag_where", lambda flag, device: seen.append(device) or flag)
    strategy = SingleStrategy(None, DistEnv("single"), torch.device("cpu"), Precision("fp32", torch.device("cpu")))
    strategy.model = torch.nn.Linear(2, 2)
    strategy.optimizer = torch.optim.Adam(strategy.model.parameters(), fused=True)
    strategy.model(torch.ones(1, 2)).sum().backward()
    strategy.step(torch.zeros(()))
    assert seen == [torch.device("cpu")]
