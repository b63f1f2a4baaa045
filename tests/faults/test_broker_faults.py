"""Broker faults: killed and restarted, absent; clients that hang up mid-job."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import (
    REPO,
    Cluster,
    OutputLog,
    bound_broker_endpoints,
    bound_http_port,
    cluster_env,
    wait_until,
)
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2
SLOW_JOB = {"prompt": "slow", "size": "512x512", "steps": 30}


def status(url: str) -> dict:
    try:
        resp = httpx.get(f"{url}/v1/cluster", timeout=5)
    except httpx.HTTPError:
        return {}
    return resp.json() if resp.status_code == 200 else {}


def ready_count(url: str) -> int:
    return len([w for w in status(url).get("workers", []) if w["state"] == "ready"])


def start(cache_dir: Path, *argv: str) -> tuple[subprocess.Popen, OutputLog]:
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=cluster_env(cache_dir),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, OutputLog(process)


def stop(*maybe: subprocess.Popen | None) -> None:
    """Stop the processes that were started (None: one never was)."""
    processes = [process for process in maybe if process is not None]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_broker_killed_mid_job_is_restarted_and_the_job_completes(cache_dir: Path) -> None:
    cluster = Cluster(cache_dir, workers=1, heartbeat=HEARTBEAT)
    try:
        cluster.wait_ready()
        [broker_pid] = cluster.pid_of("broker")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{cluster.url}/v1/images/generations",
                                 json={**SLOW_JOB, "seed": 21}, timeout=120)
            wait_until(lambda: any(w["running"] for w in status(cluster.url).get("workers", [])),
                       30, "the job to start")
            os.kill(broker_pid, signal.SIGKILL)
            resp = answer.result()
        assert resp.status_code == 200, resp.text
        validate(resp.json(), "ImagesResponse")
        assert resp.json()["data"][0]["seed"] == 21
        [new_pid] = cluster.pid_of("broker")
        assert new_pid != broker_pid
        cluster.log.wait_for("resubmitted", 10)
        # New requests need nothing else restarted.
        again = httpx.post(f"{cluster.url}/v1/images/generations",
                           json={"prompt": "after", "size": "64x64"}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        cluster.stop()


def test_a_standalone_broker_can_simply_be_started_again(cache_dir: Path) -> None:
    broker, broker_log = start(cache_dir, "-m", "broker", "--clients", "tcp://127.0.0.1:*",
                               "--workers", "tcp://127.0.0.1:*", "--heartbeat", str(HEARTBEAT))
    worker = frontend = None
    try:
        clients, workers = bound_broker_endpoints(broker_log)
        # The restarted broker binds the same ports: its peers reconnect to what they know.
        broker_argv = ["-m", "broker", "--clients", clients, "--workers", workers,
                       "--heartbeat", str(HEARTBEAT)]
        worker, worker_log = start(cache_dir, "-m", "gpu_worker", "--broker", workers,
                                   "--model", "tiny", "--device", "cpu", "--threads", "1",
                                   "--heartbeat", str(HEARTBEAT))
        frontend, frontend_log = start(cache_dir, "-m", "http_frontend", "--broker", clients,
                                       "--port", "0", "--heartbeat", str(HEARTBEAT))
        url = f"http://127.0.0.1:{bound_http_port(frontend_log)}"
        wait_until(lambda: ready_count(url) == 1, 60, "the worker")
        broker.kill()
        broker.wait()
        # Without a broker: a fast, retryable 503 and /readyz says so.
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 503, 5, "not ready")
        down = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, timeout=5)
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "broker_unavailable"
        broker, _ = start(cache_dir, *broker_argv)
        wait_until(lambda: ready_count(url) == 1, 15, "the worker to register again")
        resp = httpx.post(f"{url}/v1/images/generations",
                          json={"prompt": "x", "size": "64x64"}, timeout=30)
        assert resp.status_code == 200, resp.text
        assert "registe" in worker_log.text() or "reconnect" in worker_log.text().lower()
    finally:
        stop(frontend, worker, broker)


def test_no_broker_503_within_2_s_even_past_the_thread_count(cache_dir: Path,
                                                             tmp_path: Path) -> None:
    # An ipc path in a fresh directory: no process can be listening there.
    frontend, log = start(cache_dir, "-m", "http_frontend", "--broker",
                          f"ipc://{tmp_path / 'no-broker'}", "--port", "0",
                          "--threads", "4", "--heartbeat", str(HEARTBEAT))
    try:
        url = f"http://127.0.0.1:{bound_http_port(log)}"
        wait_until(lambda: _answers(f"{url}/healthz"), 30, "the frontend")

        def one(_: int) -> tuple[int, float]:
            started = time.monotonic()
            resp = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, timeout=10)
            return resp.status_code, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        assert [code for code, _ in results] == [503] * 16
        assert max(seconds for _, seconds in results) < 2.0
        assert httpx.get(f"{url}/readyz").status_code == 503
    finally:
        stop(frontend)


def test_no_worker_is_a_fast_503(cache_dir: Path) -> None:
    broker, broker_log = start(cache_dir, "-m", "broker", "--clients", "tcp://127.0.0.1:*",
                               "--workers", "tcp://127.0.0.1:*", "--heartbeat", str(HEARTBEAT))
    frontend = None
    try:
        clients, _ = bound_broker_endpoints(broker_log)
        frontend, frontend_log = start(cache_dir, "-m", "http_frontend", "--broker", clients,
                                       "--port", "0", "--heartbeat", str(HEARTBEAT))
        url = f"http://127.0.0.1:{bound_http_port(frontend_log)}"
        wait_until(lambda: _answers(f"{url}/readyz", 503), 30, "the frontend")
        time.sleep(6 * HEARTBEAT)  # past the broker's start-up grace for re-registration
        started = time.monotonic()
        resp = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "model": "tiny"},
                          timeout=10)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "no_worker"
        assert time.monotonic() - started < 2.0
        assert int(resp.headers["retry-after"]) > 0
    finally:
        stop(frontend, broker)


def test_a_client_that_hangs_up_frees_the_worker(cache_dir: Path) -> None:
    cluster = Cluster(cache_dir, workers=1, heartbeat=HEARTBEAT)
    try:
        cluster.wait_ready()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{cluster.url}/v1/images/generations",
                       json={"prompt": "slow", "size": "512x512", "steps": 50}, timeout=1.5)
        assert "client went away" in cluster.log.wait_for("client went away", 5)
        # The worker stops at its next step (a 50-step job would take several seconds more).
        cluster.log.wait_for("interrupted", 5)
        workers = wait_until(lambda: [w for w in status(cluster.url).get("workers", [])
                                      if not w["running"]], 2, "an idle worker")
        assert len(workers) == 1, cluster.log.text()
        resp = httpx.post(f"{cluster.url}/v1/images/generations",
                          json={"prompt": "next", "size": "64x64"}, timeout=30)
        assert resp.status_code == 200
    finally:
        cluster.stop()


def _answers(url: str, status_code: int = 200) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == status_code
    except httpx.HTTPError:
        return False
