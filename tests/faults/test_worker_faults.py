"""Worker faults injected for real: kill -9, SIGSTOP, a job that kills every worker, SIGTERM."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, wait_until
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2  # dead after 3 missed: 0.6 s
SLOW_JOB = {"prompt": "slow", "size": "512x512", "steps": 30}  # several seconds on one core


def worker_pid(worker: dict) -> int:
    return int(worker["worker_id"].split("-")[-2])


def running_worker(cluster: Cluster) -> dict | None:
    workers = cluster.cluster_status()["workers"]
    return next((w for w in workers if w["running"]), None)


def post_async(pool: concurrent.futures.Executor, cluster: Cluster, body: dict):
    return pool.submit(httpx.post, f"{cluster.url}/v1/images/generations", json=body,
                       timeout=120)


@pytest.fixture
def cluster(cache_dir: Path) -> Iterator[Cluster]:
    running = Cluster(cache_dir, workers=2, heartbeat=HEARTBEAT,
                      env={"DCTEST_FAULT_CRASH_ON_PROMPT": "crash-the-worker"})
    try:
        running.wait_ready()
        yield running
    finally:
        for pid in running.pid_of("gpu_worker"):
            try:
                os.kill(pid, signal.SIGCONT)  # a stopped child cannot act on SIGTERM
            except ProcessLookupError:
                pass
        running.stop()


def test_worker_killed_mid_job_the_job_completes_elsewhere(cluster: Cluster) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = post_async(pool, cluster, {**SLOW_JOB, "seed": 1})
        victim = wait_until(lambda: running_worker(cluster), 30, "the job to start")
        os.kill(worker_pid(victim), signal.SIGKILL)
        resp = answer.result()
    assert resp.status_code == 200, resp.text
    validate(resp.json(), "ImagesResponse")
    assert resp.json()["worker_id"] != victim["worker_id"]
    assert resp.json()["data"][0]["seed"] == 1
    cluster.log.wait_for("requeued after losing worker", 10)


def test_worker_frozen_mid_job_its_late_result_is_dropped(cluster: Cluster) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = post_async(pool, cluster, {**SLOW_JOB, "seed": 2})
        victim = wait_until(lambda: running_worker(cluster), 30, "the job to start")
        os.kill(worker_pid(victim), signal.SIGSTOP)
        resp = answer.result()
    assert resp.status_code == 200, resp.text
    assert resp.json()["worker_id"] != victim["worker_id"]
    os.kill(worker_pid(victim), signal.SIGCONT)
    # It wakes, finishes the job nobody waits for, and registers again: its RESULT is dropped
    # and the job is not counted twice.
    wait_until(lambda: len([w for w in cluster.cluster_status()["workers"]
                            if w["state"] == "ready"]) == 2, 30, "the frozen worker to rejoin")
    revived = next(w for w in cluster.cluster_status()["workers"]
                   if w["worker_id"] == victim["worker_id"])
    assert revived["jobs_done"] == 0
    follow_up = httpx.post(f"{cluster.url}/v1/images/generations",
                           json={"prompt": "after", "size": "64x64"}, timeout=60)
    assert follow_up.status_code == 200


def test_a_job_that_kills_every_worker_fails_after_three_attempts(cluster: Cluster) -> None:
    resp = httpx.post(f"{cluster.url}/v1/images/generations",
                      json={"prompt": "please crash-the-worker", "size": "64x64"}, timeout=120)
    assert resp.status_code == 500, resp.text
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["code"] == "worker_lost"
    assert "/" not in resp.json()["error"]["message"]
    # launch.py restarts the crashed workers and the cluster keeps serving other jobs.
    wait_until(lambda: len([w for w in cluster.cluster_status()["workers"]
                            if w["state"] == "ready"]) == 2, 60, "restarted workers")
    ok = httpx.post(f"{cluster.url}/v1/images/generations",
                    json={"prompt": "a calm lake", "size": "64x64"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_sigterm_to_a_worker_finishes_its_job_first(cluster: Cluster) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = post_async(pool, cluster, {**SLOW_JOB, "seed": 3})
        busy = wait_until(lambda: running_worker(cluster), 30, "the job to start")
        os.kill(worker_pid(busy), signal.SIGTERM)
        resp = answer.result()
    assert resp.status_code == 200, resp.text
    assert resp.json()["worker_id"] == busy["worker_id"]  # finished, not handed over
    cluster.log.wait_for(f"worker {busy['worker_id']} said goodbye", 10)


def test_a_long_job_never_gets_its_worker_declared_dead(cluster: Cluster) -> None:
    started = time.monotonic()
    # Four images: one took 3.9 s on an idle machine, too close to 20 heartbeats.
    resp = httpx.post(f"{cluster.url}/v1/images/generations",
                      json={**SLOW_JOB, "n": 4, "seed": 4}, timeout=120)
    elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    assert elapsed > 20 * HEARTBEAT, "the job was too short to show anything"
    assert "missed its heartbeats" not in cluster.log.text()
    assert "requeued" not in cluster.log.text()
