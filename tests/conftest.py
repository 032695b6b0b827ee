"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The default synthetic task (seed 0), generated once per test session (about 2 s)."""
    from data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "seed0", seed=0)
