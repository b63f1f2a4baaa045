"""X-Request-ID from a hostile client over real HTTP (waitress, as http_frontend/__main__.py
builds it), and log injection: no client- or peer-controlled string may forge a log line."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator

import pytest

from broker import logs, protocol
from broker.protocol import ErrorCode, MsgType
from http_frontend import job_log
from http_frontend import server as http_server
from http_frontend.app import FrontendConfig, create_app
from http_frontend.pending import PendingJob
from tests.broker.fakes import make_spec
from tests.http_frontend.test_app import FakeBroker

pytestmark = pytest.mark.timeout(60)

KEY = "sk-request-id-attacks"
MAX_BODY = 4096
MADE = re.compile(r"^[0-9a-f]{32}$")
BODY = json.dumps({"prompt": "a lighthouse", "model": "tiny", "size": "64x64"}).encode()


@pytest.fixture(scope="module")
def frontend() -> Iterator[tuple[str, int]]:
    config = FrontendConfig(api_keys=(KEY,), max_body=MAX_BODY)
    app = create_app(config, FakeBroker())
    server = http_server.create_server(
        app, host="127.0.0.1", port=0, threads=4, receive_timeout=10, max_body=MAX_BODY,
        max_request_body_size=4 * MAX_BODY + 1, cleanup_interval=1,
        asyncore_use_poll=True, ident="diffusion-cluster", channel_request_lookahead=1)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield "127.0.0.1", server.effective_port
    http_server.close_everything(server)
    thread.join(10)


def exchange(addr: tuple[str, int], head: bytes, body: bytes = b"") -> tuple[int, list[tuple[
        bytes, bytes]], bytes]:
    """Send one raw request (Connection: close) and read the whole answer."""
    with socket.create_connection(addr, timeout=20) as sock:
        try:
            sock.sendall(head + body)
        except OSError:  # waitress may answer and close before it has read everything
            pass
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head_raw, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_raw.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
    return status, headers, rest  # type: ignore[return-value]


def ids_of(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [v for k, v in headers if k.lower() == b"x-request-id"]


def request(method: str, path: str, extra: list[bytes], *, body: bytes = b"",
            key: bool = True, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close"]
    if key:
        lines.append(f"Authorization: Bearer {KEY}".encode())
    if body or length is not None:
        lines += [b"Content-Type: application/json",
                  f"Content-Length: {len(body) if length is None else length}".encode()]
    return b"\r\n".join(lines + extra) + b"\r\n\r\n"


HOSTILE_IDS: list[list[bytes]] = [
    [b"X-Request-ID: " + b"a" * 10_000],
    [b"X-Request-ID: one", b"X-Request-ID: two"],
    [b"X-Request-ID: caf\xc3\xa9"],
    [b"X-Request-ID: \xff\xfe\x80raw"],
    [b"X-Request-ID: a\rInjected: yes"],
    [b"X-Request-ID: ", ],
    [b"X-Request-ID: a b"],
    [b"X-Request-ID: \x00nul"],
    [b"X-Request-ID: a,b"],
    [b"X-Request-ID: ok-id", b" folded-continuation"],
]

ROUTES = [
    ("GET", "/healthz", b"", True, 200),
    ("GET", "/v1/models", b"", False, 401),
    ("GET", "/no/such/route", b"", True, 404),
    ("DELETE", "/healthz", b"", True, 405),
    ("POST", "/v1/images/generations", b"x" * (MAX_BODY + 10), True, 413),  # the app's 413
    ("POST", "/v1/images/generations", BODY, True, 200),
]


@pytest.mark.parametrize("extra", HOSTILE_IDS, ids=lambda e: repr(b"|".join(e))[:40])
@pytest.mark.parametrize("method, path, body, key, expected", ROUTES,
                         ids=[f"{m}-{p}-{s}" for m, p, _, _, s in ROUTES])
def test_hostile_ids_are_replaced_on_every_route(frontend, extra, method, path, body, key,
                                                 expected) -> None:
    status, headers, _ = exchange(frontend, request(method, path, extra, body=body, key=key),
                                  body)
    if status == 400:  # waitress refused the head itself (a bare CR, a NUL): see below
        return
    assert status == expected
    ids = ids_of(headers)
    assert len(ids) == 1, headers
    assert MADE.match(ids[0].decode("latin-1")), ids
    assert not any(k.lower() == b"injected" for k, _ in headers)


@pytest.mark.parametrize("method, path, body, key, expected", ROUTES,
                         ids=[f"{m}-{p}-{s}" for m, p, _, _, s in ROUTES])
def test_a_good_id_comes_back_on_every_route(frontend, method, path, body, key,
                                             expected) -> None:
    status, headers, _ = exchange(frontend, request(method, path, [b"X-Request-ID: mine-1"],
                                                    body=body, key=key), body)
    assert status == expected
    assert ids_of(headers) == [b"mine-1"]


def test_streaming_answers_carry_the_id(frontend) -> None:
    body = json.dumps({"prompt": "p", "model": "tiny", "size": "64x64", "stream": True,
                       "partial_images": 1}).encode()
    status, headers, _ = exchange(frontend, request(
        "POST", "/v1/images/generations", [b"X-Request-ID: sse-1"], body=body), body)
    assert status == 200
    assert dict((k.lower(), v) for k, v in headers)[b"content-type"].startswith(
        b"text/event-stream")
    assert ids_of(headers) == [b"sse-1"]


@pytest.mark.parametrize("extra, expected", [
    ([], 413),  # a body past 4 x --max-body: waitress answers before the app
    ([b"X-Big: " + b"h" * (300 * 1024)], 431),  # a head past 256 KiB
], ids=["waitress-413", "waitress-431"])
def test_waitress_own_errors_carry_an_id(frontend, extra, expected) -> None:
    """BUG: docs/logs.md and docs/api.md promise X-Request-ID on every answer, 413 included;
    waitress's own refusals (http_frontend/server.py JSONErrorTask: the 413 past
    4 x --max-body, the 431, the 400) never reach the app's RequestIds middleware."""
    length = 4 * MAX_BODY + 100
    head = request("POST", "/v1/images/generations", [b"X-Request-ID: big-1", *extra],
                   length=length)
    status, headers, _ = exchange(frontend, head, b"x" * length if expected == 413 else b"")
    assert status == expected
    assert len(ids_of(headers)) == 1, (
        f"waitress's own {expected} answer carries no X-Request-ID: {headers}")


def test_id_is_reset_between_requests_on_one_thread(frontend) -> None:
    """A later request on the same waitress thread must not inherit an earlier id."""
    seen = set()
    for i in range(8):
        _, headers, _ = exchange(frontend, request("GET", "/healthz",
                                                   [f"X-Request-ID: seq-{i}".encode()]))
        seen.add(ids_of(headers)[0])
    for _ in range(8):
        _, headers, _ = exchange(frontend, request("GET", "/healthz", []))
        (made,) = ids_of(headers)
        assert made not in seen and MADE.match(made.decode())


# ------------------------------------------------------------------------- log injection

FORGED = "\n2026-11-30 00:00:00,000 frontend ERROR forged line"


def text_lines(program: str, emit) -> list[str]:  # type: ignore[no-untyped-def]
    return lines_logged(logs.TextFormatter(logs._text_format(program)), emit)


def json_lines(program: str, emit) -> list[str]:  # type: ignore[no-untyped-def]
    return lines_logged(logs.JsonFormatter(program), emit)


def lines_logged(formatter: logging.Formatter, emit) -> list[str]:  # type: ignore[no-untyped-def]
    """The lines the root logger writes, through ``formatter``, while ``emit()`` runs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        emit()
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    return out.getvalue().splitlines()


def failing_job(message: str) -> None:
    spec = make_spec("job-inject", model="tiny\nforged", user="evil\nuser")
    pending = PendingJob(spec.id)
    job_log.log_job(spec, pending)
    pending.update(protocol.decode(protocol.failed(spec.id, ErrorCode.WORKER_ERROR, message)))


def test_a_peer_failure_message_cannot_forge_frontend_text_lines() -> None:
    """http_frontend/job_log.py logs a job's failure message, which comes from the broker,
    which passes a worker's FAILED text through: a lying worker (or an exception text holding
    user input) must not forge a whole log line in text mode with "\\n<fake timestamp> ..."
    (broker.logs.TextFormatter escapes a message's control characters)."""
    lines = text_lines("frontend", lambda: failing_job("boom" + FORGED))
    forged = [line for line in lines if line.startswith("2026-11-30 00:00:00,000")]
    assert not forged, f"a failure message forged a text log line: {lines}"


def test_json_lines_stay_one_object_whatever_the_fields() -> None:
    lines = json_lines("frontend", lambda: failing_job("boom" + FORGED + "\u2028\x85\r\x1b[31m"))
    assert len(lines) == 2
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict)


def test_the_broker_does_not_log_a_worker_failure_message_raw() -> None:
    """The same on the broker's side: _fail logs the worker's FAILED message."""
    import zmq

    from tests.broker.fakes import BrokerHarness
    ctx = zmq.Context()
    harness = BrokerHarness(ctx)
    try:
        worker = harness.worker("liar")
        client = harness.client()

        def run() -> None:
            spec = make_spec("job-forge")
            client.submit(spec)
            (taken,) = worker.take()
            worker.send(protocol.failed(taken.id, ErrorCode.WORKER_ERROR, "oops" + FORGED))
            client.expect(MsgType.FAILED)

        lines = text_lines("broker", run)
    finally:
        harness.close()
        ctx.destroy(linger=0)
    assert not any(line.startswith("2026-11-30 00:00:00,000") for line in lines), (
        f"a worker's failure message forged a broker text log line: {lines}")


@pytest.mark.parametrize("fail", [None, ErrorCode.NO_WORKER, ErrorCode.WORKER_ERROR])
def test_client_strings_never_forge_frontend_text_lines(fail) -> None:  # type: ignore[no-untyped-def]
    """user, model, prompt and request id, each with a forged line in it, through the app."""
    import falcon.testing
    broker = FakeBroker()
    broker.fail_with = fail
    client = falcon.testing.TestClient(create_app(FrontendConfig(), broker))

    def emit() -> None:
        for model in ("tiny", "tiny" + FORGED):
            client.simulate_post("/v1/images/generations", headers={"X-Request-ID": "r" + FORGED},
                                 json={"prompt": "p" + FORGED, "model": model,
                                       "size": "64x64", "user": "u" + FORGED})
            client.simulate_post("/v1/jobs", json={"prompt": "p" + FORGED, "model": model,
                                                   "size": "64x64", "user": "u" + FORGED})

    lines = text_lines("frontend", emit)
    assert lines, "nothing logged"
    forged = [line for line in lines if line.startswith("2026-11-30 00:00:00,000")]
    assert not forged, lines
