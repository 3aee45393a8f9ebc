"""Fixtures every test file may use, and the order the files run in."""
import pytest

from helpers import References

# The files that take half a minute or more (`--durations`), longest first, started first: the two
# workers (pyproject's addopts, whole files each) then end together instead of one running the longest
# file alone at the end.
LONGEST_FIRST = ["test_slurm.py", "test_elastic.py", "test_distributed.py", "test_checkpoint.py", "test_sharded.py",
                 "test_memory.py", "test_wild.py", "test_gpu_check.py", "test_tensor_parallel.py", "test_hsdp.py",
                 "test_lightning.py", "test_faults.py", "test_matrix.py", "test_object_storage.py", "test_switches.py",
                 "test_sharded_checkpoint.py", "test_build.py", "test_soak.py", "test_float8.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> References:
    """Reference runs trained once per session (helpers.References)."""
    return References(tmp_path_factory.mktemp("references"))
