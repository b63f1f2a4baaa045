"""A sick worker, whose every job fails at once, must not eat the queue."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cluster import REPO, Cluster, OutputLog, cluster_env, wait_until

pytestmark = pytest.mark.slow

REQUESTS = 20


def test_a_worker_that_fails_every_job_is_quarantined_and_the_queue_is_served(
        cache_dir: Path) -> None:
    cluster = Cluster(cache_dir, workers=1, heartbeat=1.0)
    sick = None
    try:
        cluster.wait_ready()
        # A second worker joins, whose device is broken: it is idle at once, every time.
        sick = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker", "--broker", cluster.workers_endpoint,
             "--model", "tiny", "--device", "cpu", "--threads", "1", "--worker-id", "sick"],
            cwd=REPO, env={**cluster_env(cache_dir), "DCTEST_FAULT_FAIL_EVERY_JOB": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sick_log = OutputLog(sick)
        wait_until(lambda: len(cluster.cluster_status()["workers"]) == 2, 60, "the sick worker")

        def generate(seed: int) -> httpx.Response:
            return httpx.post(f"{cluster.url}/v1/images/generations",
                              json={"prompt": "queue", "size": "64x64", "seed": seed},
                              timeout=120)

        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            results = list(pool.map(generate, range(REQUESTS)))
        # Before, the sick worker (always idle) took about half of them and failed each.
        # Now each job it fails runs again on the healthy worker, and it is quarantined.
        assert [r.status_code for r in results] == [200] * REQUESTS, \
            [(r.status_code, r.text[:120]) for r in results if r.status_code != 200]
        assert [r.json()["data"][0]["seed"] for r in results] == list(range(REQUESTS))
        workers = {w["worker_id"]: w for w in cluster.cluster_status()["workers"]}
        assert workers["sick"]["state"] == "quarantined", workers["sick"]
        assert workers["sick"]["consecutive_failures"] >= 3
        cluster.log.wait_for("worker sick failed 3 job(s) in a row", 5)
        assert "fault injection" in sick_log.text()
    finally:
        if sick is not None:
            sick.terminate()
            sick.wait(10)
        cluster.stop()
