"""Process-level behaviour: shutdown, crash restart, components alone, joining workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import (
    HEARTBEAT,
    REPO,
    Cluster,
    OutputLog,
    alive,
    bound_broker_endpoints,
    bound_http_port,
    cluster_env,
    descendants,
    wait_until,
)

pytestmark = pytest.mark.slow


def ready_workers(url: str) -> list[dict]:
    try:
        status = httpx.get(f"{url}/v1/cluster", timeout=5).json()
    except httpx.HTTPError:
        return []
    return [w for w in status.get("workers", []) if w["state"] == "ready"]


def tiny_image(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations",
                      json={"prompt": "x", "size": "64x64", **body}, timeout=60)


def test_sigterm_stops_everything_and_leaves_no_process(cache_dir: Path) -> None:
    cluster = Cluster(cache_dir, workers=2)
    try:
        cluster.wait_ready()
        children = descendants(cluster.process.pid)
        assert len(children) >= 4  # broker, two workers, frontend
        started = time.monotonic()
        cluster.process.send_signal(signal.SIGTERM)
        assert cluster.process.wait(10) == 0
        assert time.monotonic() - started < 10
        wait_until(lambda: not any(alive(pid) for pid in children), 5, "children to exit")
    finally:
        if cluster.process.poll() is None:
            cluster.stop()


def test_crashed_worker_is_restarted_and_cluster_keeps_serving(cache_dir: Path) -> None:
    cluster = Cluster(cache_dir, workers=2)
    try:
        cluster.wait_ready()
        victim = ready_workers(cluster.url)[0]
        pid = int(victim["worker_id"].split("-")[-2])
        os.kill(pid, signal.SIGKILL)
        # The survivor serves meanwhile.
        resp = tiny_image(cluster.url)
        assert resp.status_code == 200, resp.text
        # The broker forgets the dead worker; launch.py starts a new one that registers.
        wait_until(lambda: len(ready_workers(cluster.url)) == 2 and
                   all(w["worker_id"] != victim["worker_id"]
                       for w in ready_workers(cluster.url)), 60, "a restarted worker")
        cluster.log.wait_for("restarting in", 10)
        assert tiny_image(cluster.url).status_code == 200
    finally:
        cluster.stop()


def test_components_run_on_their_own(cache_dir: Path) -> None:
    processes: list[subprocess.Popen] = []
    logs: list[OutputLog] = []

    def start(*argv: str) -> OutputLog:
        process = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO,
                                   env=cluster_env(cache_dir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        logs.append(OutputLog(process))
        return logs[-1]

    try:
        # Port 0 everywhere: each process binds what is free and logs what it got.
        clients, workers = bound_broker_endpoints(start(
            "broker", "--clients", "tcp://127.0.0.1:*", "--workers", "tcp://127.0.0.1:*",
            "--heartbeat", str(HEARTBEAT)))
        start("gpu_worker", "--broker", workers, "--model", "tiny", "--device", "cpu",
              "--threads", "1", "--heartbeat", str(HEARTBEAT))
        port = bound_http_port(start("http_frontend", "--broker", clients,
                                     "--host", "127.0.0.1", "--port", "0"))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(ready_workers(url)) == 1, 60, "the worker to register")
        resp = tiny_image(url, seed=9)
        assert resp.status_code == 200, resp.text
        assert resp.json()["data"][0]["seed"] == 9
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process, log in zip(processes, logs, strict=True):
            assert process.wait(10) == 0, log.text()


@pytest.mark.parametrize("module", ["broker", "gpu_worker", "http_frontend"])
def test_each_component_explains_its_flags(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in {"broker": ["--clients", "--workers"],
                 "gpu_worker": ["--broker", "--model", "--device"],
                 "http_frontend": ["--broker", "--host", "--port"]}[module]:
        assert flag in out.stdout


def test_launch_help_and_models() -> None:
    out = subprocess.run([sys.executable, "launch.py", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    for flag in ("--host", "--port", "--model", "--num-gpus", "--num-workers",
                 "--clients", "--workers"):
        assert flag in out.stdout
    models = subprocess.run([sys.executable, "launch.py", "models"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert "flux-schnell" in models.stdout and "tiny" in models.stdout


def test_worker_joins_a_running_cluster(solo_cluster: Cluster, cache_dir: Path) -> None:
    # The shared one-worker cluster (its tests leave it idle): the joiner leaves it again.
    cluster = solo_cluster
    assert len(ready_workers(cluster.url)) == 1
    joiner = None
    try:
        joiner = subprocess.Popen(
            [sys.executable, "launch.py", "worker", "--broker", cluster.workers_endpoint,
             "--model", "tiny", "--device", "cpu", "--heartbeat", str(HEARTBEAT)],
            cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        joiner_log = OutputLog(joiner)
        wait_until(lambda: len(ready_workers(cluster.url)) == 2, 60, "the joining worker")
        joiner_pids = descendants(joiner.pid)
        joined = next(w for w in ready_workers(cluster.url)
                      if int(w["worker_id"].split("-")[-2]) in joiner_pids)
        # Two jobs at once: the first worker is busy with one (a job of a second or so is
        # plenty: the broker leases the other at once, to the least loaded worker), so the
        # joiner must take the other.
        with httpx.Client(timeout=120) as http:
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(
                    lambda i: http.post(f"{cluster.url}/v1/images/generations",
                                        json={"prompt": f"p{i}", "size": "128x128",
                                              "steps": 10}), range(2)))
        assert all(a.status_code == 200 for a in answers)
        assert joined["worker_id"] in {a.json()["worker_id"] for a in answers}, \
            joiner_log.text()
    finally:
        if joiner is not None:
            joiner.send_signal(signal.SIGTERM)
            joiner.wait(15)
            # Gone (its BYE) before the next test that shares the cluster counts workers.
            wait_until(lambda: len(cluster.cluster_status()["workers"]) == 1, 30,
                       "the joiner to leave the cluster")


def test_a_child_that_dies_while_others_load_is_restarted(cache_dir: Path) -> None:
    # The broker dies while the workers are still loading; it is restarted and they join it.
    cluster = Cluster(cache_dir, workers=1)
    try:
        broker = wait_until(lambda: cluster.pid_of("broker"), 30, "the broker to start")[0]
        os.kill(broker, signal.SIGKILL)
        cluster.log.wait_for("broker exited with status", 30)
        cluster.wait_ready(120)
        assert tiny_image(cluster.url).status_code == 200
    finally:
        cluster.stop()
