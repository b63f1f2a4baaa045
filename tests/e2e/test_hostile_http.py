"""The real frontend process under attack over raw sockets: idle and slow connections, held
threads, requests waitress refuses itself, odd methods and ids, text that is not Unicode.

The frontend runs as ``python -m http_frontend``, on waitress, against a stand-in broker: a
ZeroMQ ROUTER in this process that says one worker serves ``tiny``, takes every job and never
finishes one, so generations wait as long as a test wants.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import protocol
from broker.protocol import MsgType, ProtocolError
from tests.cluster import REPO, OutputLog, bound_http_port, cluster_env, wait_until

pytestmark = pytest.mark.slow

MAX_BODY = 1024  # the frontend's --max-body here: waitress itself refuses past 4x this
SERVED_WITHIN = 10.0  # generous: the measured times are printed (pytest -s), about 0.01 s


class StandInBroker:
    """A broker that takes every job and never finishes one."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        worker = {"worker_id": "w1", "host": "stand-in", "device": "cpu", "state": "ready",
                  "models": ["tiny"], "max_batch": 1, "running": []}
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            try:
                msg = protocol.decode(frames)
            except ProtocolError:
                continue
            if msg.type is MsgType.STATUS:
                reply = protocol.encode(MsgType.STATUS_REPLY, {"workers": [worker],
                                                               "queues": {}})
            elif msg.type is MsgType.SUBMIT:
                self.submitted.append(msg["job"].id)
                reply = protocol.encode(MsgType.ACCEPTED, {"job_id": msg["job"].id,
                                                           "position": 0})
            else:
                if msg.type is MsgType.CANCEL:
                    self.cancelled.append(msg["job_id"])
                continue
            self.sock.send_multipart([identity, *reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close(linger=0)


class Frontend:
    """``python -m http_frontend`` on a port it picks itself (``--port 0``)."""

    _ids = itertools.count(1)

    def __init__(self, cache_dir: Path, broker: str, *extra: str) -> None:
        # Its own id: by default it would be HOST:0 for every frontend started on port 0.
        frontend_id = f"hostile-{next(self._ids)}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http_frontend", "--port", "0", "--frontend-id", frontend_id,
             "--broker", broker, "--heartbeat", "0.2", "--max-body", str(MAX_BODY), *extra],
            cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.log = OutputLog(self.process)
        try:
            self.port = bound_http_port(self.log)
        except BaseException:
            self.process.kill()
            self.process.wait(10)
            raise

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def broker() -> Iterator[StandInBroker]:
    ctx = zmq.Context()
    stand_in = StandInBroker(ctx)
    try:
        yield stand_in
    finally:
        stand_in.close()
        ctx.term()


@pytest.fixture(scope="module")
def frontend(cache_dir: Path, broker: StandInBroker) -> Iterator[Frontend]:
    running = Frontend(cache_dir, broker.endpoint, "--threads", "8")
    try:
        wait_until(lambda: request(running.port, "GET", "/readyz")[0] == 200, 10.0,
                   "the frontend to see the stand-in broker")
        yield running
    finally:
        running.stop()


# ------------------------------------------------------------------------------ raw HTTP

def connect(port: int, timeout: float = SERVED_WITHIN) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock: socket.socket, *, head_only: bool = False
                  ) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only else int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    with connect(port) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        return read_response(sock, head_only=method == "HEAD")


def openai_error(status: int, headers: dict[str, str], body: bytes, expected: int
                 ) -> dict[str, Any]:
    """The error in a response, checked to be OpenAI's shape with the expected status."""
    assert status == expected, body
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and ".py" not in error["message"]
    return error


def timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


# ------------------------------------------------------------------------------ exhaustion

def test_idle_connections_and_a_slowloris_do_not_stop_the_server(frontend: Frontend) -> None:
    idle = [connect(frontend.port) for _ in range(200)]
    slow = connect(frontend.port)
    stop = threading.Event()

    def slowloris() -> None:
        # A request head that never ends, one byte at a time.
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000:
            if stop.wait(0.05):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return

    attacker = threading.Thread(target=slowloris, daemon=True)
    attacker.start()
    try:
        time.sleep(1.0)  # every connection accepted, the slowloris well under way
        health_s, health = timed(lambda: request(frontend.port, "GET", "/healthz"))
        page_s, page = timed(lambda: request(frontend.port, "GET", "/"))
        models_s, models = timed(lambda: request(frontend.port, "GET", "/v1/models"))
        print(f"\n200 idle + slowloris: /healthz {health_s:.3f} s, / {page_s:.3f} s, "
              f"/v1/models {models_s:.3f} s")
        assert health[0] == 200 and json.loads(health[2]) == {"status": "ok"}
        assert page[0] == 200 and page[1]["content-type"].startswith("text/html")
        assert models[0] == 200 and json.loads(models[2])["data"][0]["id"] == "tiny"
        assert max(health_s, page_s, models_s) < SERVED_WITHIN
    finally:
        stop.set()
        attacker.join(2.0)
        for sock in [*idle, slow]:
            sock.close()


def test_idle_and_slow_connections_are_closed_when_their_time_is_up(
        cache_dir: Path, broker: StandInBroker) -> None:
    # A connection limit the attack fills: the timeouts free it.
    small = Frontend(cache_dir, broker.endpoint, "--connection-limit", "50",
                     "--channel-timeout", "1", "--receive-timeout", "2")
    idle = [connect(small.port) for _ in range(60)]
    slow = connect(small.port)
    cut_off_after: list[float] = []

    def slowloris() -> None:
        started = time.monotonic()
        try:
            slow.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - started < 2 * SERVED_WITHIN:
                slow.sendall(b"X")  # never idle, never done
                time.sleep(0.1)
        except OSError:
            cut_off_after.append(time.monotonic() - started)

    attacker = threading.Thread(target=slowloris, daemon=True)
    try:
        attacker.start()
        served_s, health = timed(lambda: request(small.port, "GET", "/healthz"))
        print(f"\n60 idle over a limit of 50 + slowloris: /healthz {served_s:.3f} s")
        assert health[0] == 200
        assert served_s < SERVED_WITHIN
        attacker.join(2 * SERVED_WITHIN)
        print(f"the slowloris was cut off after {cut_off_after[0]:.1f} s")
        assert cut_off_after[0] < SERVED_WITHIN  # within its 2 s, give or take a check
        assert "did not arrive within 2 s" in small.log.text()
    finally:
        for sock in [*idle, slow]:
            sock.close()
        assert small.stop() == 0


def test_health_never_waits_behind_generations(frontend: Frontend,
                                               broker: StandInBroker) -> None:
    # 8 threads, 2 of them reserved: 6 generations may wait; the rest get a 429 at once.
    body = json.dumps({"prompt": "a fox", "timeout": 60}).encode()
    waiting = []
    for _ in range(10):
        sock = connect(frontend.port)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        waiting.append(sock)
    try:
        def answer(sock: socket.socket) -> tuple | None:
            sock.settimeout(2.0)
            try:
                return read_response(sock)
            except TimeoutError:
                return None  # still waiting for its image, as it should

        # Each socket gets its 2 s, all at once: not 2 s after the one before it.
        with concurrent.futures.ThreadPoolExecutor(len(waiting)) as pool:
            refused = [got for got in pool.map(answer, waiting) if got is not None]
        assert len(refused) == 4, refused
        for status, headers, raw in refused:
            error = openai_error(status, headers, raw, 429)
            assert (error["code"], error["type"]) == ("too_many_requests", "rate_limit_error")
            assert int(headers["retry-after"]) > 0
            assert headers["x-should-retry"] == "true"
        wait_until(lambda: len(broker.submitted) >= 6, 5.0, "six jobs at the broker")
        health_s, health = timed(lambda: request(frontend.port, "GET", "/healthz"))
        ready_s, ready = timed(lambda: request(frontend.port, "GET", "/readyz"))
        print(f"\n6 generations holding threads: /healthz {health_s:.3f} s, "
              f"/readyz {ready_s:.3f} s")
        assert (health[0], ready[0]) == (200, 200)
        assert max(health_s, ready_s) < SERVED_WITHIN
    finally:
        for sock in waiting:
            sock.close()
    # Clients that hang up cancel their jobs, and give their slots back.
    wait_until(lambda: len(broker.cancelled) >= 6, 10.0, "the jobs to be cancelled")
    wait_until(lambda: request(frontend.port, "POST", "/v1/jobs", body)[0] == 202, 5.0,
               "a slot to be free again")


# ---------------------------------------------------------------- waitress's own errors

@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431,
     "request_header_fields_too_large"),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
     + b"x" * 5000, 413, "request_too_large"),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n", 413,
     "request_too_large"),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nabc\r\n0\r\n\r\n", 400, "malformed_request"),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
     501, "not_implemented"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed_request"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400,
     "malformed_request"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
     b"hello!", 400, "malformed_request"),
    (b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed_request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed_request"),
], ids=["head-too-large", "body-over-4x-max-body", "chunked-over-4x-max-body",
        "broken-chunks", "unknown-transfer-coding", "malformed-header", "negative-length",
        "two-lengths", "lowercase-method", "tls-hello"])
def test_errors_waitress_answers_itself_are_json(frontend: Frontend, raw: bytes, status: int,
                                                 code: str) -> None:
    with connect(frontend.port) as sock:
        sock.sendall(raw)
        got_status, headers, body = read_response(sock)
    error = openai_error(got_status, headers, body, status)
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert headers["x-should-retry"] == "false"
    if status == 413:
        assert f"larger than {MAX_BODY} bytes" in error["message"]


def test_a_client_that_sends_its_whole_oversized_body_first_reads_the_413(
        frontend: Frontend) -> None:
    # waitress refuses a body over its limit as soon as it has read the head; it used to
    # close with the body unread, and the kernel reset the connection under the answer.
    body = b"x" * (8 << 20)
    with connect(frontend.port) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        sock.sendall(body)  # blocks unless the server keeps reading
        sock.shutdown(socket.SHUT_WR)
        status, headers, raw = read_response(sock)
        assert sock.recv(10) == b""  # then an orderly close
    error = openai_error(status, headers, raw, 413)
    assert error["code"] == "request_too_large"


# ------------------------------------------------------------------------------ routes and methods

@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("HEAD", "/", 200, None),
    ("HEAD", "/v1/models", 200, None),
    ("HEAD", "/static/app.js", 200, None),
    ("PUT", "/static/app.js", 405, {"GET", "HEAD", "OPTIONS"}),
    ("DELETE", "/static/app.js", 405, {"GET", "HEAD", "OPTIONS"}),
    ("TRACE", "/static/app.js", 405, {"GET", "HEAD", "OPTIONS"}),
    ("TRACE", "/", 405, {"GET", "HEAD", "OPTIONS"}),
    ("FOO", "/healthz", 405, {"GET", "HEAD", "OPTIONS"}),
    ("GET", "/v1/images/generations", 405, {"POST", "OPTIONS"}),
    ("PUT", "/v1/jobs", 405, {"GET", "HEAD", "POST", "OPTIONS"}),
    ("POST", "/v1/jobs/abc", 405, {"GET", "HEAD", "DELETE", "OPTIONS"}),
    ("DELETE", "/v1/jobs/abc/events", 405, {"GET", "HEAD", "OPTIONS"}),
])
def test_each_route_takes_only_its_methods(frontend: Frontend, method: str, path: str,
                                           status: int, allow: set[str] | None) -> None:
    got, headers, body = request(frontend.port, method, path)
    if status == 200:
        assert got == 200
        assert int(headers["content-length"]) > 0  # what GET would send, not sent
        return
    error = openai_error(got, headers, body, 405)
    assert error["code"] == "method_not_allowed"
    assert {m.strip() for m in headers["allow"].split(",")} == allow


def test_a_long_unknown_method_is_a_short_405(frontend: Frontend) -> None:
    error = openai_error(*request(frontend.port, "A" * 10_000, "/healthz"), 405)
    assert len(error["message"]) < 100


@pytest.mark.parametrize("path", [
    "/v1/jobs/" + "a" * 5000,
    "/v1/jobs/%ED%A0%80",  # the UTF-8 of a lone surrogate
    "/v1/jobs/%FF%FE",
    "/v1/jobs/%00",
    "/v1/jobs/" + "a" * 5000 + "/events",
    "/v1/jobs/%ED%A0%80/events",
])
@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD"])
def test_hostile_job_ids_are_plain_404s(frontend: Frontend, path: str, method: str) -> None:
    if method == "DELETE" and path.endswith("/events"):
        return
    status, headers, body = request(frontend.port, method, path)
    if method == "HEAD":
        assert status == 404
        return
    error = openai_error(status, headers, body, 404)
    assert (error["code"], error["param"]) == ("job_not_found", "id")
    assert len(error["message"]) < 200  # the id is not echoed back


@pytest.mark.parametrize("path", ["/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/static/..%2F..%2FREADME.md",
                                  "/static/%2e%2e/README.md", "/v1/" + "x" * 5000])
def test_paths_out_of_the_tree_are_404s(frontend: Frontend, path: str) -> None:
    error = openai_error(*request(frontend.port, "GET", path), 404)
    assert error["code"] == "not_found"
    assert len(error["message"]) < 300  # a long path is not echoed back whole


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "user", "model", "size",
                                   "quality", "output_format"])
@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/jobs"])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(
        frontend: Frontend, broker: StandInBroker, route: str, field: str) -> None:
    submitted = len(broker.submitted)
    body = {"prompt": "a fox", "timeout": 1}
    body[field] = "ok \ud800"  # json.dumps writes the lone surrogate as \ud800
    error = openai_error(*request(frontend.port, "POST", route, json.dumps(body).encode()), 400)
    assert (error["param"], error["code"]) == (field, "invalid_value")
    assert "Unicode" in error["message"]
    assert len(broker.submitted) == submitted
    status, _, _ = request(frontend.port, "GET", "/readyz")
    assert status == 200  # nothing was poisoned


def test_uploads_have_their_own_body_limit_and_other_routes_keep_theirs(
        frontend: Frontend) -> None:
    """Past 4 x --max-body waitress refuses a JSON route's body from its head; an upload
    route (/v1/images/edits) takes bodies up to --max-edit-body-mb, and its 413 says so."""
    body = b"x" * (64 * MAX_BODY)
    for path, refused in (("/v1/images/generations", True), ("/v1/images/edits", False)):
        with connect(frontend.port) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"multipart/form-data; boundary=b\r\nContent-Length: "
                         f"{len(body)}\r\n\r\n".encode() + body)
            status, headers, raw = read_response(sock)
        error = json.loads(raw)["error"]
        if refused:
            assert (status, error["code"]) == (413, "request_too_large")
        else:  # read whole and answered by the app: not a multipart body it can parse
            assert status == 400 and error["code"] == "invalid_multipart", raw
    huge = 1 << 40
    with connect(frontend.port) as sock:
        sock.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: {huge}"
                     f"\r\n\r\n".encode())
        status, headers, raw = read_response(sock)
    error = openai_error(status, headers, raw, 413)
    assert f"larger than {64 << 20} bytes" in error["message"]
