"""Fixtures every test file may use."""
import pytest

from helpers import References


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> References:
    """Reference runs trained once per session (helpers.References)."""
    return References(tmp_path_factory.mktemp("references"))
