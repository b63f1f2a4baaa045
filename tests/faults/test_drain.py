"""SIGTERM to launch.py drains: the job in progress finishes and its client gets the image."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, alive, descendants
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow


def test_sigterm_to_launch_finishes_the_running_job_then_stops(cache_dir: Path) -> None:
    # launch.py gives the frontend grace - 2 s to drain: 7 s here.
    cluster = Cluster(cache_dir, workers=1, heartbeat=0.2, extra=["--grace", "9"])
    try:
        cluster.wait_ready()
        children = descendants(cluster.process.pid)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, f"{cluster.url}/v1/images/generations",
                                  json={"prompt": "slow", "size": "512x512", "steps": 8,
                                        "seed": 8}, timeout=60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if any(w["running"] for w in cluster.cluster_status()["workers"]):
                    break
                time.sleep(0.05)
            queued = pool.submit(httpx.post, f"{cluster.url}/v1/images/generations",
                                 json={"prompt": "queued", "size": "512x512", "steps": 8},
                                 timeout=60)
            time.sleep(0.3)  # let the second request reach the queue
            stopped_at = time.monotonic()
            cluster.process.send_signal(signal.SIGTERM)
            first, second = running.result(), queued.result()
        assert cluster.process.wait(10) == 0
        assert time.monotonic() - stopped_at < 10
        # The job in progress finished and reached its client.
        assert first.status_code == 200, first.text
        assert first.json()["data"][0]["seed"] == 8
        # The one still queued when its worker left got a retryable 503, not a cut connection.
        assert second.status_code == 503, second.text
        validate(second.json(), "ErrorResponse")
        assert second.json()["error"]["code"] == "shutting_down"
        assert int(second.headers["retry-after"]) > 0
        assert not any(alive(pid) for pid in children)
    finally:
        if cluster.process.poll() is None:
            cluster.stop()
