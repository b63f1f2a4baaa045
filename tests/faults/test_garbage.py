"""Garbage and overload injected for real: junk on every socket, a flood of fake workers, a fake
broker that talks nonsense, malformed HTTP, and more requests than the queue takes.

Nothing here may crash a process, leak a traceback to a client or leave the cluster unable to
serve; a rejected request always gets OpenAI's error shape.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import math
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import zmq

from broker import protocol
from broker.protocol import MsgType
from tests.cluster import REPO, Cluster, OutputLog, alive, bound_http_port, cluster_env, wait_until
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2  # a peer is dead after 3 missed: 0.6 s
MAX_QUEUE = 4
SLOW_JOB = {"prompt": "slow", "size": "512x512", "steps": 20}  # seconds on one core
GENERATIONS = "/v1/images/generations"
FAKE_HOST = "fake-garbage-host"


@pytest.fixture(scope="module")
def cluster(cache_dir: Path) -> Iterator[Cluster]:
    running = Cluster(cache_dir, workers=2, heartbeat=HEARTBEAT,
                      extra=["--max-queue", str(MAX_QUEUE)])
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def idle_workers(cluster: Cluster) -> set[str] | None:
    """The ids of the two real workers once both are ready, idle and nothing is queued."""
    status = cluster.cluster_status()
    workers = status["workers"]
    if (len(workers) == 2 and all(w["state"] == "ready" and not w["running"] for w in workers)
            and not any(status["queues"].values())):
        return {w["worker_id"] for w in workers}
    return None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def job_wire(**overrides: Any) -> dict[str, Any]:
    job = {"id": "garbage-job", "model": "tiny", "prompt": "x", "width": 64, "height": 64,
           "steps": 1, "seeds": [1]}
    return {**job, **overrides}


def common_garbage() -> list[list[bytes]]:
    """Messages neither side of the broker may send: each must be dropped, none may raise."""
    status = pack({"v": 1, "t": "status"})
    messages = [[os.urandom(size)] for size in (1, 7, 64, 1000, 65_536)]
    messages += [
        [b""],
        [status[: len(status) // 2]],  # a valid header cut in half
        [pack({"v": 1, "t": "submit", "job": job_wire()})[:20]],
        [pack([1, "status"])],  # a list, not a map
        [pack("status")],
        [pack(None)],
        [pack({"v": 99, "t": "status"})],
        [pack({"v": True, "t": "status"})],
        [pack({"v": 1.0, "t": "status"})],
        [pack({"v": "1", "t": "status"})],
        [pack({"t": "status"})],
        [pack({"v": 1, "t": "explode"})],
        [pack({"v": 1, "t": 5})],
        [pack({"v": 1})],
        [pack({b"v": 1, b"t": b"status"})],  # bytes where strings belong
        [pack({"v": 1, "t": "status", "x": msgpack.ExtType(5, b"boom")})],
        [pack({"v": 1, "t": "status", "x": msgpack.Timestamp(1, 0)})],
        [b"\x91" * 100_000 + b"\xc0"],  # arrays nested 100 000 deep
        [b"\xdd\xff\xff\xff\xff"],  # an array that claims 4 billion entries
        [b"\xdb\x7f\xff\xff\xff"],  # a string that claims 2 GiB
        [b"\x81\x91\x01\x01"],  # a map with a list as key
        [status, b"an unexpected payload"],
        [pack({"v": 1, "t": "status", "x": "y" * 100_000})],  # a field over MAX_STRING
        [pack({"v": 1, "t": "cancel", "job_id": 5})],
        [pack({"v": 1, "t": "result", "job_id": "j", "images": [{"seed": 1}]}), b"png"],
        [pack({"v": 1, "t": "result", "job_id": "j", "images": []})],
    ]
    return messages


def client_garbage() -> list[list[bytes]]:
    submit = {"v": 1, "t": "submit"}
    return [
        *common_garbage(),
        [pack({**submit, "job": "x"})],
        [pack({**submit, "job": {"id": "j"}})],
        [pack({**submit, "job": job_wire(width="64")})],
        [pack({**submit, "job": job_wire(width=-64)})],
        [pack({**submit, "job": job_wire(steps=0)})],
        [pack({**submit, "job": job_wire(seeds=[])})],
        [pack({**submit, "job": job_wire(seeds=list(range(17)))})],
        [pack({**submit, "job": job_wire(seeds=["1"])})],
        [pack({**submit, "job": job_wire(timeout=math.nan)})],
        [pack({**submit, "job": job_wire(timeout=math.inf)})],
        [pack({**submit, "job": job_wire(timeout=-1)})],
        [pack({**submit, "job": job_wire(guidance=math.inf)})],
        [pack({**submit, "job": job_wire(prompt=True)})],
        [pack({**submit, "job": job_wire(width=True)})],
    ]


def worker_garbage() -> list[list[bytes]]:
    ready = {"v": 1, "t": "ready", "worker_id": "junk", "host": FAKE_HOST, "device": "cpu",
             "models": ["tiny"]}
    return [
        *common_garbage(),
        [pack({**ready, "models": 5})],
        [pack({**ready, "models": []})],
        [pack({**ready, "models": [""]})],
        [pack({**ready, "models": [5]})],
        [pack({**ready, "worker_id": 5})],
        [pack({**ready, "capacity": 0})],
        [pack({**ready, "max_batch": -1})],
        [pack({**ready, "capacity": "many"})],
        [pack({**ready, "model_info": []})],
        [pack({**ready, "models": ["m"] * 2000})],  # over MAX_LIST
        [pack({"v": 1, "t": "heartbeat", "running": "x"})],
        [pack({"v": 1, "t": "progress", "job_id": "j", "step": "1", "steps": 2})],
        [pack({"v": 1, "t": "failed", "job_id": "j", "code": 1, "message": "m"})],
    ]


def fake_ready(worker_id: str, models: list[str]) -> list[bytes]:
    return protocol.encode(MsgType.READY, {
        "worker_id": worker_id, "host": FAKE_HOST, "device": "cpu", "models": models,
        "max_batch": 1, "capacity": 1, "version": "fake", "model_info": {}})


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(endpoint)
    return sock


def broker_drop_lines(cluster: Cluster) -> list[str]:
    return [line for line in cluster.log.lines
            if " broker " in line and "dropped a message" in line]


# --------------------------------------------------------------------------------------------
# 1. Garbage on the broker's sockets


def test_broker_drops_garbage_on_both_sockets_and_keeps_serving(cluster: Cluster) -> None:
    [broker_pid] = cluster.pid_of("broker")
    real_workers = wait_until(lambda: idle_workers(cluster), 30, "two idle workers")
    ctx = zmq.Context()
    sent = 0
    try:
        # A flood of READYs from 200 fake workers that then go silent. It comes first, so the
        # fakes have expired before a real job could be leased to one of them.
        fakes = [dealer(ctx, cluster.workers_endpoint) for _ in range(200)]
        for _ in range(5):
            for i, fake in enumerate(fakes):
                fake.send_multipart(fake_ready(f"fake-{i}", ["tiny"]))
        wait_until(lambda: sum(f"host={FAKE_HOST}" in line for line in cluster.log.lines)
                   >= 1000, 30, "the broker to register all 1000 fake READYs")

        # One frame over the clients socket's 1 MiB MAXMSGSIZE: the broker drops the
        # connection without reading the message.
        oversized = dealer(ctx, cluster.clients)
        oversized.send_multipart([os.urandom(2 << 20)])
        sent += 1

        client = dealer(ctx, cluster.clients)
        worker = dealer(ctx, cluster.workers_endpoint)
        for _ in range(5):
            for frames in client_garbage():
                client.send_multipart(frames)
                sent += 1
            for frames in worker_garbage():
                worker.send_multipart(frames)
                sent += 1
        # 50 000 frames in one message, on each socket.
        client.send_multipart([b"x"] * 50_000)
        worker.send_multipart([b"x"] * 50_000)
        sent += 2

        # Sentinels: each connection is read in order, so once these are answered, every
        # piece of garbage sent before them on the same connection has been handled.
        client.send_multipart(protocol.encode(MsgType.STATUS))
        assert client.poll(20_000), "the broker did not answer STATUS after the garbage"
        reply = protocol.decode(client.recv_multipart())
        assert reply.type is MsgType.STATUS_REPLY
        worker.send_multipart(fake_ready("garbage-sentinel", ["sentinel-model"]))
        cluster.log.wait_for("worker garbage-sentinel ready", 20)

        # Every fake (and the sentinel) misses its heartbeats and is declared dead; only the
        # two real workers remain.
        wait_until(lambda: {w["worker_id"] for w in cluster.cluster_status()["workers"]}
                   == real_workers, 30, "the fake workers to be declared dead")
        assert FAKE_HOST not in json.dumps(cluster.cluster_status())

        # The drop log is rate-limited and says how many it did not show.
        assert broker_drop_lines(cluster), "no 'dropped a message' warning in the broker's log"

        def summary_logged() -> bool:
            nonlocal sent
            client.send_multipart([b"\xc1"])  # 0xc1 is never valid msgpack
            sent += 1
            return any("more dropped since" in line for line in broker_drop_lines(cluster))

        wait_until(summary_logged, 15, "a drop warning that counts the suppressed ones")
    finally:
        ctx.destroy(linger=0)

    assert cluster.pid_of("broker") == [broker_pid]
    assert alive(broker_pid)
    resp = httpx.post(f"{cluster.url}{GENERATIONS}", json={"prompt": "x", "size": "64x64"},
                      timeout=60)
    assert resp.status_code == 200, resp.text
    validate(resp.json(), "ImagesResponse")
    assert resp.json()["worker_id"] in real_workers
    png = base64.b64decode(resp.json()["data"][0]["b64_json"])
    assert png_size(png) == (64, 64)

    drops = broker_drop_lines(cluster)
    assert 1 <= len(drops) < 50 < sent, (len(drops), sent)
    assert not any(" broker ERROR " in line for line in cluster.log.lines)
    assert "Traceback" not in cluster.log.text()


# --------------------------------------------------------------------------------------------
# 2. Garbage from a (fake) broker to the frontend


class FakeBroker:
    """A ROUTER the frontend connects to; answers each STATUS in the current ``mode``."""

    WORKER = {"worker_id": "w", "host": "h", "device": "cpu", "models": ["tiny"],
              "state": "ready", "running": [], "jobs_done": 0, "max_batch": 1, "capacity": 1,
              "version": "x", "model_info": {}}

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.mode = "garbage"
        self.answered = {"garbage": 0, "valid": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _garbage(self) -> list[list[bytes]]:
        reply = {"v": 1, "t": "status_reply"}
        return [
            [os.urandom(64)],
            [os.urandom(3000)],
            [pack({**reply, "v": 2, "workers": [], "queues": {}})],
            [pack({**reply, "workers": "x", "queues": {}})],
            [pack({**reply, "workers": [], "queues": []})],
            [pack({**reply, "workers": []})],
            [pack([1, "status_reply"])],
            [pack({**reply, "workers": [], "queues": {}})[:10]],
            [pack({"v": 1, "t": "nonsense"})],
            [pack({"v": 1, "t": "accepted", "job_id": 1, "position": 0})],
            [pack({"v": 1, "t": "result", "job_id": "j", "images": []})],
            [pack({**reply, "workers": [], "queues": {}}), b"extra frame"],
            [b"\x91" * 50_000 + b"\xc0"],
            [b"x"] * 1000,
        ]

    def _run(self) -> None:
        garbage = self._garbage()
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            identity, *frames = self.router.recv_multipart()
            try:
                is_status = protocol.decode(frames).type is MsgType.STATUS
            except protocol.ProtocolError:
                is_status = False
            if not is_status:
                continue
            if self.mode == "garbage":
                for junk in garbage:
                    self.router.send_multipart([identity, *junk])
                self.answered["garbage"] += 1
            else:
                self.router.send_multipart([identity, *protocol.encode(
                    MsgType.STATUS_REPLY, {"workers": [self.WORKER], "queues": {}})])
                self.answered["valid"] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.ctx.destroy(linger=0)


def test_frontend_drops_garbage_from_the_broker(cache_dir: Path) -> None:
    broker = FakeBroker()
    frontend = subprocess.Popen(
        [sys.executable, "-m", "http_frontend", "--broker", f"tcp://127.0.0.1:{broker.port}",
         "--port", "0", "--heartbeat", str(HEARTBEAT)],
        cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    log = OutputLog(frontend)
    try:
        url = f"http://127.0.0.1:{bound_http_port(log)}"
        # Every STATUS so far got only garbage back; several polls in, the frontend still
        # polls (its I/O thread survived) and counts the broker as unreachable.
        wait_until(lambda: broker.answered["garbage"] >= 8, 20, "eight garbage answers")
        health = httpx.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200, health.text
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        assert ready.json()["ready"] is False
        refused = httpx.post(f"{url}{GENERATIONS}", json={"prompt": "x", "size": "64x64"},
                             timeout=10)
        assert refused.status_code == 503, refused.text
        validate(refused.json(), "ErrorResponse")
        assert refused.json()["error"]["code"] == "broker_unavailable"
        assert "dropped a message from the broker" in log.text()

        broker.mode = "valid"
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, 20,
                   "/readyz to turn 200 once the broker answers properly")
        assert httpx.get(f"{url}/readyz", timeout=10).json()["workers"] == 1
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200

        frontend.send_signal(signal.SIGTERM)
        assert frontend.wait(15) == 0
        assert "Traceback" not in log.text()
    finally:
        if frontend.poll() is None:
            frontend.kill()
            frontend.wait(10)
        broker.close()


# --------------------------------------------------------------------------------------------
# 3. Garbage over HTTP against the real waitress

JSON = {"content-type": "application/json"}
HTTP_GARBAGE = [
    # id, request keyword arguments, expected status, expected param
    ("malformed-json", {"content": b'{"prompt": "x",', "headers": JSON}, 400, None),
    ("empty-body", {"content": b"", "headers": JSON}, 400, None),
    ("json-array", {"json": ["prompt", "x"]}, 400, None),
    ("json-string", {"json": "prompt"}, 400, None),
    ("json-nan", {"content": b'{"prompt": "x", "guidance": NaN}', "headers": JSON}, 400, None),
    ("json-deep", {"content": b"[" * 100_000, "headers": JSON}, 400, None),
    ("json-5000-digits", {"content": b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}",
                          "headers": JSON}, 400, None),
    ("non-utf8", {"content": b'\xff\xfe{"prompt"', "headers": JSON}, 400, None),
    ("text-plain", {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}},
     415, None),
    ("no-prompt", {"json": {"size": "64x64"}}, 400, "prompt"),
    ("empty-prompt", {"json": {"prompt": "  "}}, 400, "prompt"),
    ("prompt-int", {"json": {"prompt": 5}}, 400, "prompt"),
    ("prompt-list", {"json": {"prompt": ["x"]}}, 400, "prompt"),
    ("prompt-1M-chars", {"json": {"prompt": "a" * 1_000_000}}, 400, "prompt"),
    ("body-2MiB", {"content": b"x" * (2 << 20), "headers": JSON}, 413, None),
    ("chunked-2MiB", {"content": (b"x" * 65536 for _ in range(32)), "headers": JSON}, 413, None),
    ("n-string", {"json": {"prompt": "x", "n": "2"}}, 400, "n"),
    ("n-bool", {"json": {"prompt": "x", "n": True}}, 400, "n"),
    ("n-1000", {"json": {"prompt": "x", "n": 1000}}, 400, "n"),
    ("n-huge", {"json": {"prompt": "x", "n": 10**300}}, 400, "n"),
    ("size-int", {"json": {"prompt": "x", "size": 64}}, 400, "size"),
    ("size-words", {"json": {"prompt": "x", "size": "big"}}, 400, "size"),
    ("size-99999", {"json": {"prompt": "x", "size": "99999x99999"}}, 400, "size"),
    ("size-zero", {"json": {"prompt": "x", "size": "0x64"}}, 400, "size"),
    ("steps-negative", {"json": {"prompt": "x", "steps": -1}}, 400, "steps"),
    ("steps-float", {"json": {"prompt": "x", "steps": 2.5}}, 400, "steps"),
    ("seed-negative", {"json": {"prompt": "x", "seed": -1}}, 400, "seed"),
    ("guidance-string", {"json": {"prompt": "x", "guidance": "high"}}, 400, "guidance"),
    ("timeout-zero", {"json": {"prompt": "x", "timeout": 0}}, 400, "timeout"),
    ("stream-string", {"json": {"prompt": "x", "stream": "yes"}}, 400, "stream"),
    ("format-bmp", {"json": {"prompt": "x", "output_format": "bmp"}}, 400, "output_format"),
    ("user-dict", {"json": {"prompt": "x", "user": {"id": 1}}}, 400, "user"),
]


def assert_clean_error(resp: httpx.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    assert 400 <= resp.status_code < 500
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["param"] == param, resp.text
    for leak in ("Traceback", "/work", ".py"):
        assert leak not in resp.text, resp.text


@pytest.mark.parametrize(("body", "status", "param"),
                         [pytest.param(*case[1:], id=case[0]) for case in HTTP_GARBAGE])
def test_http_garbage_gets_openai_errors(cluster: Cluster, body: dict, status: int,
                                         param: str | None) -> None:
    resp = httpx.post(f"{cluster.url}{GENERATIONS}", timeout=30, **body)
    assert_clean_error(resp, status, param)


def test_http_wrong_route_and_method_get_openai_errors(cluster: Cluster) -> None:
    assert_clean_error(httpx.post(f"{cluster.url}/v1/images/nothing", json={"prompt": "x"},
                                  timeout=10), 404, None)
    assert_clean_error(httpx.get(f"{cluster.url}{GENERATIONS}", timeout=10), 405, None)
    assert_clean_error(httpx.delete(f"{cluster.url}/healthz", timeout=10), 405, None)


RAW_GARBAGE = {
    "request-line": b"GARBAGE\r\n\r\n",
    "random": os.urandom(4096) + b"\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
    "negative-length": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: -1\r\n\r\n",
    "two-lengths": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 1, 2\r\n\r\n",
    "bad-chunk": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "huge-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 +
                   b"\r\n\r\n",
}


def raw_exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read until the server closes; half-close if it waits for more."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            return answer  # closed on us mid-send: a refusal too
        sock.settimeout(2)
        half_closed = False
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if half_closed:
                    raise AssertionError(f"no answer and no close; got {answer[:200]!r}") from None
                # Still waiting for the rest of a request that never ends: tell it so.
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(10)
                half_closed = True
                continue
            except ConnectionResetError:
                return answer
            if not chunk:
                return answer
            answer += chunk


@pytest.mark.parametrize("raw", list(RAW_GARBAGE.values()), ids=list(RAW_GARBAGE))
def test_malformed_http_is_refused_and_the_frontend_keeps_serving(cluster: Cluster,
                                                                  raw: bytes) -> None:
    answer = raw_exchange(cluster.port, raw)
    # Either waitress closes the connection, or it answers with a 4xx.
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1."), answer[:200]
        assert 400 <= int(status_line.split()[1]) < 500, answer[:300]
        assert b"Traceback" not in answer and b"/work" not in answer
    assert httpx.get(f"{cluster.url}/healthz", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------
# 4. Overload


def test_overload_gets_fast_429s_and_the_broker_stays_small(cluster: Cluster) -> None:
    wait_until(lambda: idle_workers(cluster), 60, "two idle workers")
    [broker_pid] = cluster.pid_of("broker")
    rss_before = rss_kib(broker_pid)

    def timed_post(seed: int) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        resp = httpx.post(f"{cluster.url}{GENERATIONS}", json={**SLOW_JOB, "seed": seed},
                          timeout=120)
        return resp, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = [f.result(timeout=180) for f in
                   [pool.submit(timed_post, seed) for seed in range(40)]]

    by_status: dict[int, list[tuple[httpx.Response, float]]] = {}
    for resp, took in answers:
        by_status.setdefault(resp.status_code, []).append((resp, took))
    assert set(by_status) <= {200, 429}, {s: r[0][0].text for s, r in by_status.items()}
    ok, refused = by_status.get(200, []), by_status.get(429, [])
    # Two run at once and four wait; the rest find the queue full.
    assert len(ok) >= 2, len(ok)
    assert refused, "no request was refused"
    assert len(ok) + len(refused) == 40
    for resp, _ in refused:
        retry_after = resp.headers.get("retry-after", "")
        assert retry_after.isdigit() and int(retry_after) > 0, resp.headers
        validate(resp.json(), "ErrorResponse")
        assert resp.json()["error"]["code"] == "queue_full"
    for resp, _ in ok:
        png = base64.b64decode(resp.json()["data"][0]["b64_json"])
        assert png_size(png) == (512, 512)
    assert statistics.median(t for _, t in refused) < statistics.median(t for _, t in ok)

    assert cluster.pid_of("broker") == [broker_pid]
    grown_mib = (rss_kib(broker_pid) - rss_before) / 1024
    assert grown_mib < 50, f"the broker grew by {grown_mib:.1f} MiB"
