"""Several frontends on one broker, as behind a load balancer: whichever frontend a request
lands on, streams, the jobs API and cancels work.

One broker, two tiny CPU workers and two frontends, each a real process, the way a deployment
with frontends on other hosts runs them: the broker's client endpoint listens beyond loopback,
so it requires CURVE, and each frontend has a key pair of its own (`launch.py keys DIR
--frontend NAME`). The frontends share one PostgreSQL database (the job records) and one image
directory (as they would share a bucket). Each scenario runs both ways round: made on A, seen
or cancelled on B, and made on B, seen or cancelled on A.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.cluster import (
    REPO,
    OutputLog,
    bound_broker_endpoints,
    bound_http_port,
    cluster_env,
    wait_until,
)
from tests.e2e.test_streaming import sse_events

pytestmark = pytest.mark.slow

HEARTBEAT = 0.5
# Seconds of work even on a fast CPU (256x256 at 50 steps can take 1.5 s): long enough to be
# seen running, and cancelled long before it would end.
BUSY = {"prompt": "keeps a worker busy", "size": "768x768", "steps": 50}


@dataclass
class Frontend:
    name: str
    url: str
    log: OutputLog
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def submit(self, **body) -> str:
        resp = self.http.post("/v1/jobs", json={"size": "64x64", "steps": 2, **body})
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def job(self, job_id: str) -> dict:
        resp = self.http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def events(self, job_id: str) -> list[tuple[str, dict]]:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            assert resp.status_code == 200
            return list(sse_events(resp.iter_lines()))

    def idle(self) -> bool:
        workers = self.http.get("/v1/cluster").json()["workers"]
        return len(workers) == 2 and not any(w["running"] for w in workers)


class Site:
    """The processes of the test cluster; ``a`` and ``b`` are its two frontends."""

    def __init__(self, cache_dir: Path, root: Path, database: str) -> None:
        self.cache_dir = cache_dir
        self.processes: list[subprocess.Popen] = []
        self.keys = root / "keys"
        made = subprocess.run([sys.executable, "launch.py", "keys", str(self.keys), "--worker",
                               "gpu-1", "--frontend", "web-a", "--frontend", "web-b"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        # Beyond loopback, as for frontends on other hosts: CURVE on both endpoints.
        _, self.broker_log = self.start("-m", "broker", "--clients", "tcp://0.0.0.0:*",
                                        "--workers", "tcp://127.0.0.1:*", "--curve",
                                        str(self.keys), "--heartbeat", str(HEARTBEAT))
        clients, workers = bound_broker_endpoints(self.broker_log)
        self.clients = clients.replace("0.0.0.0", "127.0.0.1")
        for _ in range(2):
            self.start("-m", "gpu_worker", "--broker", workers, "--model", "tiny", "--device",
                       "cpu", "--threads", "1", "--heartbeat", str(HEARTBEAT),
                       *self.curve("workers", "gpu-1"))
        shared = ["--db", database, "--image-store", str(root / "images")]
        self.a = self.frontend("web-a", *shared, "--data-dir", str(root / "a"))
        self.b = self.frontend("web-b", *shared, "--data-dir", str(root / "b"))

    def curve(self, kind: str, name: str) -> list[str]:
        return ["--broker-key", str(self.keys / "broker.key"),
                "--key", str(self.keys / kind / f"{name}.key_secret")]

    def start(self, *argv: str) -> tuple[subprocess.Popen, OutputLog]:
        process = subprocess.Popen([sys.executable, *argv], cwd=REPO,
                                   env=cluster_env(self.cache_dir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process, OutputLog(process)

    def frontend(self, name: str, *options: str) -> Frontend:
        _, log = self.start("-m", "http_frontend", "--broker", self.clients, "--port", "0",
                            "--frontend-id", name, "--heartbeat", str(HEARTBEAT),
                            *self.curve("frontends", name), *options)
        front = Frontend(name, f"http://127.0.0.1:{bound_http_port(log)}", log)
        wait_until(lambda: ready(front.url, workers=2), 120,
                   f"frontend {name} to see both workers", log.text)
        return front

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def ready(url: str, *, workers: int) -> bool:
    try:
        resp = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and resp.json().get("workers", 0) >= workers


@pytest.fixture(scope="module")
def site(cache_dir: Path, postgres_server, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Site]:
    running = Site(cache_dir, tmp_path_factory.mktemp("several"),
                   postgres_server.make_database())
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(params=["made on A, used on B", "made on B, used on A"])
def pair(request: pytest.FixtureRequest, site: Site) -> Iterator[tuple[Frontend, Frontend]]:
    """(where a request is made, where the next one lands), both ways round; the workers
    are idle before and after."""
    first, second = (site.a, site.b) if request.param.startswith("made on A") else \
        (site.b, site.a)
    wait_until(first.idle, 60, "idle workers")
    yield first, second
    wait_until(first.idle, 60, "idle workers after the test")


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_a_stream_on_one_frontend_gives_the_bytes_the_other_makes(pair) -> None:
    first, second = pair
    stream = first.openai().images.generate(model="tiny", prompt="a lighthouse", size="96x64",
                                            stream=True, partial_images=1,
                                            extra_body={"steps": 4, "seed": 31})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image",
                                        "image_generation.completed"]
    final = events[-1]
    assert final.model_extra["seed"] == 31
    assert png(base64.b64decode(final.b64_json)).size == (96, 64)
    # The same request on the other frontend: the same seed makes the same bytes.
    plain = second.openai().images.generate(model="tiny", prompt="a lighthouse", size="96x64",
                                            extra_body={"steps": 4, "seed": 31})
    assert plain.data[0].b64_json == final.b64_json


def test_a_job_made_on_one_frontend_is_read_followed_and_fetched_on_the_other(pair) -> None:
    first, second = pair
    job_id = first.submit(prompt=f"made on {first.name}", seed=11, n=2, size="128x96",
                          steps=20, partial_images=2)
    # Read on the other at once: the record is written before the job is sent.
    seen = second.job(job_id)
    assert seen["prompt"] == f"made on {first.name}" and seen["seeds"] == [11, 12]
    assert seen["status"] in ("queued", "running")

    # The other frontend streams it too: the broker relays its steps and previews there...
    watched = second.events(job_id)
    names = [name for name, _ in watched]
    assert names[0] == "queued" and names[-1] == "completed", names
    steps = [data["step"] for name, data in watched if name == "progress"]
    assert len(steps) >= 5 and steps == sorted(steps) and steps[-1] == 20, steps
    previews = [data for name, data in watched if name == "preview"]
    assert previews and all(png(base64.b64decode(p["b64_json"])).size == (128, 96)
                            for p in previews)
    done = watched[-1][1]
    assert [image["seed"] for image in done["data"]] == [11, 12]
    # ...as the one that made it does, to the same end.
    live = first.events(job_id)
    assert live[-1] == ("completed", {**done, "data": live[-1][1]["data"]})

    # Both answer the same job (image URLs start with the address asked), with images
    # either one serves, byte for byte.
    here, there = second.job(job_id), first.job(job_id)
    assert here["status"] == there["status"] == "succeeded"
    assert json.dumps(here).replace(second.url, "BASE") == \
        json.dumps(there).replace(first.url, "BASE")
    images = here["images"]
    assert [image["seed"] for image in images] == [11, 12]
    for image in images:
        name = image["url"].rsplit("/", 1)[1]
        here = second.http.get(f"/v1/images/files/{name}")
        there = first.http.get(f"/v1/images/files/{name}")
        assert here.status_code == there.status_code == 200
        assert here.content == there.content and png(here.content).size == (128, 96)
    assert images[0]["url"] != images[1]["url"]
    listed = second.http.get("/v1/jobs", params={"limit": 20}).json()["data"]
    assert job_id in [job["id"] for job in listed]


def test_a_cancel_on_one_frontend_stops_a_job_made_on_the_other(pair) -> None:
    first, second = pair
    job_id = first.submit(**BUSY, seed=5)
    wait_until(lambda: second.job(job_id)["status"] == "running", 60,
               "the long job to run", first.log.text)
    answer = second.http.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    # The frontend that made it hears the broker's cancel and settles the record once.
    ended = wait_until(lambda: first.job(job_id)["status"] == "cancelled" and first.job(job_id),
                       30, "the cancel to reach the frontend that made the job")
    assert ended["images"] == []
    assert first.events(job_id)[-1][0] == "cancelled"
    # The worker was told to stop, and said so: its slot is free (it stays taken until the
    # worker answers), long before 50 steps at 768x768 would end.
    wait_until(first.idle, 15, "the worker to stop the cancelled job")
    quick = second.submit(prompt="after the cancel", seed=6)
    job = wait_until(lambda: (j := first.job(quick))["status"] == "succeeded" and j, 60,
                     "a job after the cancel")
    assert job["images"][0]["seed"] == 6


def test_a_queued_job_made_on_one_frontend_is_cancelled_on_the_other(pair) -> None:
    first, second = pair
    # Two workers, each holding a busy job and one more: the fifth job waits in the queue.
    busy = [first.submit(**BUSY, seed=100 + i) for i in range(4)]
    waiting = first.submit(prompt="never runs", seed=9)
    wait_until(lambda: second.job(waiting)["status"] == "queued", 30, "a queued job")
    assert second.http.delete(f"/v1/jobs/{waiting}").json()["status"] == "cancelled"
    assert wait_until(lambda: first.job(waiting)["status"] == "cancelled", 30,
                      "the queued job's cancel on the frontend that made it")
    for job_id in busy:
        assert second.http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert first.events(waiting)[-1][0] == "cancelled"
    assert first.job(waiting)["images"] == []


def test_a_retry_landing_on_the_other_frontend_is_the_same_job(pair) -> None:
    """The openai client retries with the same Idempotency-Key; behind a load balancer the
    retry lands anywhere."""
    first, second = pair
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"prompt": "once only", "size": "64x64", "steps": 2, "seed": 77}
    made = first.http.post("/v1/jobs", json=body, headers=key)
    again = second.http.post("/v1/jobs", json=body, headers=key)
    assert made.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["id"] == made.json()["id"]
    other = second.http.post("/v1/jobs", json={**body, "seed": 78}, headers=key)
    assert other.status_code == 409
    done = wait_until(lambda: (j := second.job(made.json()["id"]))["status"] == "succeeded"
                      and j, 60, "the job")
    assert [image["seed"] for image in done["images"]] == [77]


class RoundRobin:
    """A TCP load balancer: each new connection goes to the next frontend in turn."""

    def __init__(self, urls: list[str]) -> None:
        self.backends = [("127.0.0.1", int(url.rsplit(":", 1)[1])) for url in urls]
        self.served = [0] * len(urls)
        self._turn = itertools.count()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            turn = next(self._turn) % len(self.backends)
            self.served[turn] += 1
            upstream = socket.create_connection(self.backends[turn])
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        self._listener.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_through_a_round_robin_load_balancer(site: Site) -> None:
    """Every request on a new connection, each to the next frontend: a user of the openai
    client and the jobs API sees one service."""
    wait_until(site.a.idle, 60, "idle workers")
    balancer = RoundRobin([site.a.url, site.b.url])
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    http = httpx.Client(base_url=balancer.url, timeout=60, limits=no_reuse)
    client = openai.OpenAI(base_url=f"{balancer.url}/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(timeout=60, limits=no_reuse))
    try:
        streamed = list(client.images.generate(model="tiny", prompt="balanced", size="64x64",
                                               stream=True, partial_images=1,
                                               extra_body={"steps": 3, "seed": 21}))
        plain = client.images.generate(model="tiny", prompt="balanced", size="64x64",
                                       extra_body={"steps": 3, "seed": 21})
        assert plain.data[0].b64_json == streamed[-1].b64_json

        job_id = http.post("/v1/jobs", json={"prompt": "balanced job", "size": "64x64",
                                             "steps": 3, "seed": 22}).json()["id"]
        assert http.get(f"/v1/jobs/{job_id}").json()["seeds"] == [22]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            assert list(sse_events(resp.iter_lines()))[-1][0] == "completed"
        done = http.get(f"/v1/jobs/{job_id}").json()
        assert done["status"] == "succeeded"
        for _ in range(2):  # the image from each frontend in turn
            image = http.get(done["images"][0]["url"].replace(balancer.url, ""))
            assert png(image.content).size == (64, 64)

        busy = http.post("/v1/jobs", json={**BUSY, "seed": 23}).json()["id"]
        wait_until(lambda: http.get(f"/v1/jobs/{busy}").json()["status"] == "running", 60,
                   "the long job to run")
        assert http.delete(f"/v1/jobs/{busy}").json()["status"] == "cancelled"
        wait_until(lambda: all(http.get(f"/v1/jobs/{busy}").json()["status"] == "cancelled"
                               for _ in range(2)), 30, "both frontends to say cancelled")
        assert all(served >= 3 for served in balancer.served), balancer.served
    finally:
        balancer.close()
        http.close()
        client.close()
        wait_until(site.a.idle, 60, "idle workers after the test")
