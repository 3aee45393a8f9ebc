"""Fixtures every test file may use, and the order the files run in."""
import pytest

from helpers import References

# The files that take a minute or more (`--durations`), started first: two workers (pyproject's addopts,
# whole files each) then end together instead of one running the longest file alone at the end.
LONGEST_FIRST = ["test_slurm.py", "test_elastic.py", "test_tensor_parallel.py", "test_distributed.py",
                 "test_checkpoint.py", "test_sharded.py", "test_memory.py", "test_float8.py", "test_wild.py",
                 "test_faults.py", "test_object_storage.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> References:
    """Reference runs trained once per session (helpers.References)."""
    return References(tmp_path_factory.mktemp("references"))
