"""The cluster the end-to-end tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture(scope="session")
def cluster(cache_dir: Path) -> Iterator[Cluster]:
    """A two-worker tiny cluster shared by the tests that do not break it."""
    running = Cluster(cache_dir, workers=2)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
