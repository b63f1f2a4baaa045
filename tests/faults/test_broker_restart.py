"""A broker killed and restarted by launch.py under load, at the default heartbeat (1 s).

launch.py restarts a dead broker in under a second: faster than three missed heartbeats, so
only the new broker's incarnation can tell the frontend and workers that it restarted.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow

REQUESTS = 20
JOB = {"prompt": "restart", "size": "128x128", "steps": 12}


def generate(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={**JOB, "seed": seed}, timeout=120)


def image_digest(resp: httpx.Response) -> str:
    return hashlib.sha256(base64.b64decode(resp.json()["data"][0]["b64_json"])).hexdigest()


def running_jobs(url: str) -> int:
    try:
        workers = httpx.get(f"{url}/v1/cluster", timeout=5).json()["workers"]
    except (httpx.HTTPError, KeyError, ValueError):
        return 0
    return sum(len(w["running"]) for w in workers)


def test_kill_9_of_the_broker_with_20_requests_in_flight_loses_none(cache_dir: Path) -> None:
    cluster = Cluster(cache_dir, workers=2, heartbeat=1.0)
    try:
        cluster.wait_ready()
        [broker_pid] = cluster.pid_of("broker")
        jobs_api = [httpx.post(f"{cluster.url}/v1/jobs", json={**JOB, "seed": 1000 + i},
                               timeout=30).json()["id"] for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            answers = [pool.submit(generate, cluster.url, seed) for seed in range(REQUESTS)]
            wait_until(lambda: running_jobs(cluster.url) >= 2, 30, "jobs on both workers")
            os.kill(broker_pid, signal.SIGKILL)
            started = time.monotonic()
            results = [answer.result() for answer in answers]
        elapsed = time.monotonic() - started
        codes = [resp.status_code for resp in results]
        assert codes == [200] * REQUESTS, [(r.status_code, r.text[:200]) for r in results
                                           if r.status_code != 200]
        # Each request got its own job's images: the seed asked for, one job each.
        assert [resp.json()["data"][0]["seed"] for resp in results] == list(range(REQUESTS))
        assert len({resp.json()["job_id"] for resp in results}) == REQUESTS
        assert elapsed < 60, f"answers took {elapsed:.0f} s after the kill"
        [new_pid] = cluster.pid_of("broker")
        assert new_pid != broker_pid
        cluster.log.wait_for("restarted (incarnation", 5)
        # Correct images: the same seed made again on the restarted cluster gives the same
        # bytes (a worker that ran a job across the restart answered it right).
        for seed in (0, REQUESTS // 2, REQUESTS - 1):
            assert image_digest(generate(cluster.url, seed)) == image_digest(results[seed])
        # Jobs-API records all end, none stays "running" for good.
        for job_id in jobs_api:
            status = wait_until(
                lambda job_id=job_id: _finished(cluster.url, job_id), 60, f"job {job_id}")
            assert status == "succeeded", status
    finally:
        cluster.stop()


def _finished(url: str, job_id: str) -> str | None:
    status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()["status"]
    return status if status not in ("queued", "running") else None
