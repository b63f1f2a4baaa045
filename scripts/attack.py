"""Attack a real single-node cluster as a hostile client and a flaky network would.

    python scripts/attack.py restart     # kill -9 the broker with 20 requests in flight
    python scripts/attack.py unicode     # lone surrogates in every string field, then a
                                         #   broker pause that makes the frontend resubmit
    python scripts/attack.py flood       # 200 idle sockets and a slowloris client, then
                                         #   /healthz while every waiting slot is taken
    python scripts/attack.py cancel      # cancel jobs a worker has already prefetched

Each starts `launch.py` on free ports (tiny model, CPU workers, the default 1 s heartbeat),
attacks it, and prints `RESULT` lines: requests sent, answered by status, and how long the
slowest took (one unanswered within its timeout shows as ReadTimeout: hung). The regression
tests (tests/faults, tests/e2e/test_hostile_http.py) assert the same outcomes; this prints
the numbers. Run it from a checkout whose .venv is set up (`make test` makes one).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster import Cluster, wait_until  # noqa: E402

Outcome = tuple[Any, float]  # (status code, or the exception's name), seconds


def timed(call: Callable[[], httpx.Response]) -> Outcome:
    started = time.monotonic()
    try:
        return call().status_code, time.monotonic() - started
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.monotonic() - started


def report(name: str, outcomes: list[Outcome]) -> None:
    counts = collections.Counter(code for code, _ in outcomes)
    slowest = max((seconds for _, seconds in outcomes), default=0.0)
    print(f"RESULT {name}: sent={len(outcomes)} answered={dict(counts)} "
          f"slowest={slowest:.2f}s", flush=True)


def generate(url: str, body: dict[str, Any], timeout: float = 120.0) -> Outcome:
    return timed(lambda: httpx.post(f"{url}/v1/images/generations", json=body,
                                    timeout=timeout))


def running_jobs(url: str) -> int:
    try:
        return sum(len(w["running"]) for w in
                   httpx.get(f"{url}/v1/cluster", timeout=5).json()["workers"])
    except (httpx.HTTPError, KeyError, ValueError):
        return 0


def attack_restart(cluster: Cluster) -> None:
    [broker] = cluster.pid_of("broker")
    job = {"prompt": "restart", "size": "128x128", "steps": 12}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = [pool.submit(generate, cluster.url, {**job, "seed": seed})
                   for seed in range(20)]
        wait_until(lambda: running_jobs(cluster.url) >= 2, 30, "jobs on the workers")
        os.kill(broker, signal.SIGKILL)
        report("kill -9 broker, 20 in flight", [a.result() for a in answers])


def attack_unicode(cluster: Cluster) -> None:
    hostile = []
    for field in ("prompt", "negative_prompt", "user", "model", "size", "output_format"):
        # JSON can say "\ud800"; Python's json.dumps would not write it.
        body = json.dumps({"prompt": "ok", "size": "64x64", field: "bad SURROGATE text"}
                          ).replace("SURROGATE", "\\ud800")
        hostile.append(timed(lambda body=body: httpx.post(
            f"{cluster.url}/v1/images/generations", content=body, timeout=60,
            headers={"content-type": "application/json"})))
    report("lone surrogates, one field each", hostile)
    [broker] = cluster.pid_of("broker")
    os.kill(broker, signal.SIGSTOP)  # long enough to be missed: the frontend resubmits
    time.sleep(4.5)
    os.kill(broker, signal.SIGCONT)
    time.sleep(2.0)
    report("normal requests after the broker came back",
           [generate(cluster.url, {"prompt": "fine", "size": "64x64"}, 40) for _ in range(10)])


def attack_flood(cluster: Cluster) -> None:
    host, port = "127.0.0.1", cluster.port
    idle = [socket.create_connection((host, port)) for _ in range(200)]
    slow = socket.create_connection((host, port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    try:
        checks = []
        for _ in range(3):
            slow.sendall(b"X")  # a byte of a header, now and then: never idle
            checks.append(timed(lambda: httpx.get(f"{cluster.url}/healthz", timeout=10)))
            checks.append(timed(lambda: httpx.get(f"{cluster.url}/v1/models", timeout=10)))
        report("200 idle sockets + slowloris: /healthz and /v1/models", checks)
    finally:
        for sock in [*idle, slow]:
            sock.close()
    slow_job = {"prompt": "hold", "size": "512x512", "steps": 50}
    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        held = [pool.submit(generate, cluster.url, slow_job, 15) for _ in range(80)]
        time.sleep(3)
        report("/healthz with 80 slow generations waiting",
               [timed(lambda: httpx.get(f"{cluster.url}/healthz", timeout=10))
                for _ in range(3)])
        report("the 80 slow generations (cut at 15 s)", [h.result() for h in held])


def attack_cancel(cluster: Cluster) -> None:
    ran, outcomes = 0, []
    for _ in range(5):
        long = httpx.post(f"{cluster.url}/v1/jobs", json={
            "prompt": "long", "size": "256x256", "steps": 30}).json()["id"]
        short = httpx.post(f"{cluster.url}/v1/jobs", json={
            "prompt": "prefetched", "size": "64x64", "steps": 2}).json()["id"]
        wait_until(lambda short=short: any(
            short in w["running"] for w in
            httpx.get(f"{cluster.url}/v1/cluster").json()["workers"]), 10, "a prefetch")
        httpx.delete(f"{cluster.url}/v1/jobs/{short}")
        wait_until(lambda long=long: httpx.get(f"{cluster.url}/v1/jobs/{long}").json()
                   ["status"] == "succeeded", 60, "the long job")
        time.sleep(1.0)
        ran += any(f"job {short}:" in line for line in cluster.log.lines)
    outcomes = [generate(cluster.url, {"prompt": "after", "size": "64x64"}, 30)
                for _ in range(4)]
    print(f"RESULT cancelled prefetched jobs: 5, still run on the device: {ran}", flush=True)
    report("requests after the cancels", outcomes)


ATTACKS = {"restart": (attack_restart, 2), "unicode": (attack_unicode, 1),
           "flood": (attack_flood, 1), "cancel": (attack_cancel, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attack", choices=sorted(ATTACKS))
    args = parser.parse_args()
    attack, workers = ATTACKS[args.attack]
    with tempfile.TemporaryDirectory() as cache:
        cluster = Cluster(Path(os.environ.get("DC_CACHE_DIR", cache)), workers=workers,
                          heartbeat=1.0)
        try:
            cluster.wait_ready()
            attack(cluster)
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
