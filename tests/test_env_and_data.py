"""Launch-environment detection and the sharded sampler, in one process."""
import pytest
import torch

from launcher.batch import BatchSizes
from launcher.data import ShardedSampler, eval_batches
from launcher.env import detect, first_host, slurm_port
from launcher.spawn import rdzv_id

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[003-006]", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "4"}


def test_torchrun_and_accelerate_variables():
    env = detect(TORCHRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == \
        ("torchrun", 3, 8, 1, 2, 1)
    assert (env.master_addr, env.master_port) == ("node7", 29400)


def test_srun_variables():
    env = detect(SRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.node_rank, env.local_world_size) == \
        ("slurm", 5, 8, 1, 2, 2)
    assert env.master_addr == "gpu003"
    assert env.master_port == slurm_port("4242") == detect({**SRUN, "SLURM_PROCID": "0"}).master_port
    assert detect({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).master_addr == "10.0.0.1"
    assert detect({**SRUN, "MASTER_PORT": "1234"}).master_port == 1234


def test_srun_tasks_per_node_of_uneven_nodes():
    uneven = {**SRUN, "SLURM_NTASKS": "11", "SLURM_TASKS_PER_NODE": "4(x2),3"}
    assert [detect({**uneven, "SLURM_NODEID": str(n)}).local_world_size for n in range(3)] == [4, 4, 3]


def test_torchrun_inside_slurm_is_torchrun():
    env = detect({**SRUN, **TORCHRUN})
    assert env.launcher == "torchrun" and env.rank == 3


def test_single_process():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[003-005,9],cpu1", "gpu003"), ("a-b[10,12]", "a-b10"), ("x1,x2", "x1"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_an_elastic_jobs_default_rdzv_id_is_the_same_on_every_node(monkeypatch):
    """Nodes that derive different ids never meet: the id may depend only on what they share."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert rdzv_id("host0:29500") == rdzv_id("host0:29500") != rdzv_id("host0:29501")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert rdzv_id("host0:29500") == "slurm-4242"


def rank_indices(plan, rank, epoch=0, start_step=0, shuffle=True, seed=0):
    sampler = ShardedSampler(plan, rank, seed, shuffle)
    sampler.set_epoch(epoch, start_step)
    return list(sampler)


@pytest.mark.parametrize("world, micro", [(1, 8), (2, 4), (4, 2), (2, 1)])
def test_shards_are_disjoint_cover_and_give_each_step_the_same_global_batch(world, micro):
    n, G = 103, 16
    plan = BatchSizes(G, micro, world, n, "drop")
    shards = [rank_indices(plan, r) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == plan.steps_per_epoch * G  # disjoint; the tail of 103 % 16 = 7 dropped
    # Step k covers the same samples whatever the world size and micro batch.
    reference = rank_indices(BatchSizes(G, G, 1, n), 0)
    per_rank = plan.per_rank_step
    for k in range(plan.steps_per_epoch):
        step_samples = {i for s in shards for i in s[k * per_rank:(k + 1) * per_rank]}
        assert step_samples == set(reference[k * G:(k + 1) * G])


def test_tail_wrap_sees_every_sample():
    plan = BatchSizes(16, 8, 2, 103, "wrap")
    flat = rank_indices(plan, 0) + rank_indices(plan, 1)
    assert plan.steps_per_epoch == 7 and len(flat) == 112 and set(flat) == set(range(103))
    tiny = BatchSizes(64, 32, 1, 10, "wrap")  # a global batch of more than twice the data set
    assert len(rank_indices(tiny, 0)) == len(ShardedSampler(tiny, 0, 0, True)) == 64


def test_reshuffled_each_epoch_and_seeded():
    plan = BatchSizes(8, 4, 2, 64)
    assert rank_indices(plan, 0, epoch=0) != rank_indices(plan, 0, epoch=1)
    assert rank_indices(plan, 0, epoch=1) == rank_indices(plan, 0, epoch=1)
    assert rank_indices(plan, 0, seed=1) != rank_indices(plan, 0, seed=0)
    assert rank_indices(plan, 0, shuffle=False)[:4] == [0, 2, 4, 6]


def test_start_step_resumes_mid_epoch():
    plan = BatchSizes(8, 2, 2, 64)
    full = rank_indices(plan, 1, epoch=3)
    assert rank_indices(plan, 1, epoch=3, start_step=5) == full[5 * plan.per_rank_step:]


def test_same_order_with_dataloader_workers():
    from torch.utils.data import TensorDataset

    from launcher.data import train_loader

    data = TensorDataset(torch.arange(64))
    plan = BatchSizes(8, 4, 2, 64)
    orders = []
    for workers in (0, 2):
        loader = train_loader(data, plan, 1, 0, True, workers, None, False)
        loader.sampler.set_epoch(2)
        orders.append([b[0].tolist() for b in loader])
    assert orders[0] == orders[1]


@pytest.mark.parametrize("n, world, batch", [(10, 2, 3), (7, 4, 2), (3, 4, 5), (100, 2, 10)])
def test_eval_batches_count_each_sample_once_and_keep_ranks_in_step(n, world, batch):
    plans = [eval_batches(n, batch, r, world) for r in range(world)]
    counted = [i for plan in plans for b, counts in plan if counts for i in b]
    assert sorted(counted) == list(range(n))
    assert len({len(plan) for plan in plans}) == 1  # every rank runs the same number of forwards
