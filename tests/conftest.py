"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real servers the storage tests start themselves (session-wide, started on first use).
from tests.postgres import postgres_server  # noqa: F401
from tests.s3 import s3_server  # noqa: F401


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model cache for every cluster of the run."""
    return tmp_path_factory.mktemp("dc-cache")


@pytest.fixture(scope="session", autouse=True)
def _data_dir_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Frontends the tests start keep job records and images under the run's temp dir,
    never in the user's data dir (tests.cluster.cluster_env gives each cluster its own)."""
    os.environ["DC_DATA_DIR"] = str(tmp_path_factory.mktemp("dc-data"))
