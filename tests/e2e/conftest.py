"""The cluster the end-to-end tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture(scope="session")
def cluster(cache_dir: Path) -> Iterator[Cluster]:
    """A two-worker tiny cluster shared by the tests that do not break it."""
    yield from running_cluster(cache_dir, workers=2)


@pytest.fixture(scope="session")
def solo_cluster(cache_dir: Path) -> Iterator[Cluster]:
    """A one-worker tiny cluster, where a slow job makes the next ones queue; shared by the
    tests that leave its worker idle."""
    yield from running_cluster(cache_dir, workers=1)


def running_cluster(cache_dir: Path, *, workers: int) -> Iterator[Cluster]:
    running = Cluster(cache_dir, workers=workers)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
