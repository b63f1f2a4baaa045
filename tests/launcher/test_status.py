"""`launch.py status` against real frontends: waitress serving the Falcon app on a fake
broker, and servers that are no frontend at all."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from waitress import wasyncore

from http_frontend import server as http_server
from http_frontend.app import FrontendConfig, create_app
from http_frontend.service import ServiceConfig
from launcher import status
from tests.cluster import REPO, free_port
from tests.http_frontend.test_app import FakeBroker, worker

KEY = "sk-status-test-key"


@contextmanager
def frontend(broker: FakeBroker, *, api_keys: tuple[str, ...] = ()) -> Iterator[str]:
    """The real app under waitress on a free port, in this process; yields its URL."""
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0, retry_after=1),
                            api_keys=api_keys)
    server = http_server.create_server(create_app(config, broker), host="127.0.0.1", port=0,
                                       threads=4, receive_timeout=10.0, max_body=1 << 20)
    stopping = threading.Event()

    def serve() -> None:
        # waitress's own run() loops until its sockets close; closing them from another
        # thread races with its select(), so the loop's thread closes them.
        while not stopping.is_set():
            wasyncore.loop(timeout=0.05, use_poll=True, map=server._map, count=1)
        http_server.close_everything(server)

    thread = threading.Thread(target=serve, name="waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stopping.set()
        thread.join(10)
        server.task_dispatcher.shutdown()


@contextmanager
def other_server(handle: Callable[[http.server.BaseHTTPRequestHandler], None]
                 ) -> Iterator[str]:
    """An HTTP server that is no frontend: ``handle`` answers every GET."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            handle(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def answer(status_code: int, body: bytes, content_type: str = "application/json"
           ) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def handle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status_code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return handle


def run(url: str, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = status.run(url, out=out, err=err, **{"timeout": 5.0, **kwargs})
    return code, out.getvalue(), err.getvalue()


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def generate(url: str, n: int, *, key: str | None = None) -> None:
    body = json.dumps({"prompt": "a lighthouse", "model": "tiny", "n": n, "size": "64x64",
                       "response_format": "b64_json"}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/images/generations", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# A frontend answering


def test_ready_cluster_shows_workers_queues_and_throughput() -> None:
    busy = {**worker("w1", "tiny"), "running": ["job-a", "job-b"], "jobs_done": 17,
            "stats": {"jobs_done": 20, "images_done": 31, "images_per_second": 1.25}}
    loading = {**worker("w2", "sdxl-turbo", state="loading"), "host": "gpu-2",
               "device": "cuda:0"}
    broker = FakeBroker([busy, loading])
    broker.queues = {"tiny": 3}
    with frontend(broker) as url:
        generate(url, 2)
        generate(url, 1)
        code, out, err = run(url)
    assert code == status.EXIT_READY, err
    assert err == ""
    assert out.splitlines()[0] == f"Frontend {url}: ready (1 worker(s) ready)"
    table = rows(out)
    assert ["WORKER", "HOST", "DEVICE", "MODELS", "STATE", "RUNNING", "JOBS", "DONE",
            "IMAGES/S"] in table
    assert ["w1", "gpu-host", "cpu", "tiny", "ready", "2", "17", "1.25"] in table
    # The fake's records carry no jobs_done and no stats: shown as unknown, never as 0.
    assert ["w2", "gpu-2", "cuda:0", "sdxl-turbo", "loading", "0", "-", "-"] in table
    assert ["tiny", "3", "1"] in table and ["sdxl-turbo", "0", "0"] in table
    assert ["last", "minute:", "3", "image(s),", "0.05", "images/s"] in table
    assert ["last", "5", "minutes:", "3", "image(s),", "0.01", "images/s"] in table
    assert "Images finished (succeeded jobs, among the newest jobs, at most 100)" in out


def test_no_ready_worker_is_exit_1_with_the_reason() -> None:
    broker = FakeBroker([worker("w1", "tiny", state="loading")])
    with frontend(broker) as url:
        code, out, err = run(url)
    assert code == status.EXIT_NOT_READY, err
    assert out.splitlines()[0] == f"Frontend {url}: NOT READY: no worker is ready"
    assert ["w1", "gpu-host", "cpu", "tiny", "loading", "0", "-", "-"] in rows(out)
    assert ["last", "minute:", "0", "image(s),", "0.00", "images/s"] in rows(out)


def test_broker_out_of_reach_is_exit_1_and_says_so() -> None:
    broker = FakeBroker()
    broker.reachable = False
    with frontend(broker) as url:
        code, out, err = run(url)
    assert code == status.EXIT_NOT_READY, err
    assert "NOT READY: broker not reachable" in out
    assert "Workers: unavailable (HTTP 503: " in out


def test_quarantine_and_hostile_names_print_as_plain_text() -> None:
    sick = {**worker("w1", "tiny", state="quarantined"), "quarantine_left_s": 12.5,
            "host": "evil\x1b[2J\x07host"}
    with frontend(FakeBroker([sick, worker("w2", "tiny")])) as url:
        code, out, _ = run(url)
    assert code == status.EXIT_READY
    assert "\x1b" not in out and "\x07" not in out
    assert ["w1", "evil?[2J?host", "cpu", "tiny", "quarantined", "(12.5", "s", "left)", "0",
            "-", "-"] in rows(out)


@pytest.mark.parametrize("stats", [
    None, "fast", [], {}, {"images_per_second": "9"}, {"images_per_second": True},
    {"images_per_second": None}, {"images_per_second": [1]},
])
def test_a_worker_rate_that_is_not_a_number_shows_as_unknown(stats: Any) -> None:
    odd = {**worker("w1", "tiny"), "stats": stats}
    with frontend(FakeBroker([odd])) as url:
        code, out, _ = run(url)
    assert code == status.EXIT_READY
    assert ["w1", "gpu-host", "cpu", "tiny", "ready", "0", "-", "-"] in rows(out)


def test_a_worker_rate_is_shown_to_two_places() -> None:
    quick = {**worker("w1", "tiny"), "jobs_done": 3,
             "stats": {"jobs_done": 3, "images_done": 3, "images_per_second": 0.0456}}
    with frontend(FakeBroker([quick])) as url:
        _, out, _ = run(url)
    assert ["w1", "gpu-host", "cpu", "tiny", "ready", "0", "3", "0.05"] in rows(out)


def test_no_worker_registered() -> None:
    with frontend(FakeBroker([])) as url:
        code, out, _ = run(url)
    assert code == status.EXIT_NOT_READY
    assert "Workers (0)\n  none registered" in out
    assert "no model served, nothing queued" in out


# --------------------------------------------------------------------------------------------
# API keys


def test_the_key_is_sent_as_bearer_and_lists_that_keys_jobs() -> None:
    with frontend(FakeBroker(), api_keys=(KEY,)) as url:
        generate(url, 1, key=KEY)
        code, out, err = run(url, api_key=KEY)
    assert code == status.EXIT_READY, err
    assert ["w1", "gpu-host", "cpu", "tiny", "ready", "0", "-", "-"] in rows(out)
    assert "among the newest jobs this key may list" in out
    assert ["last", "minute:", "1", "image(s),", "0.02", "images/s"] in rows(out)


@pytest.mark.parametrize(("key", "message"), [
    (None, "wants an API key (HTTP 401): pass --api-key KEY or set DC_API_KEY"),
    ("sk-wrong", "refused the API key (HTTP 401): check --api-key or DC_API_KEY"),
])
def test_missing_or_wrong_key_is_exit_2(key: str | None, message: str) -> None:
    with frontend(FakeBroker(), api_keys=(KEY,)) as url:
        code, out, err = run(url, api_key=key)
    assert code == status.EXIT_UNREACHABLE
    assert out == ""
    assert err == f"launch.py status: {url} {message}\n"
    assert "sk-" not in err


# --------------------------------------------------------------------------------------------
# No frontend there


def test_closed_port_is_exit_2_with_one_line() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    code, out, err = run(url)
    assert code == status.EXIT_UNREACHABLE
    assert out == ""
    assert err == f"launch.py status: cannot reach {url}: Connection refused\n"


@pytest.mark.parametrize("handle", [
    answer(200, b"<html>hello</html>", "text/html"),
    answer(503, b"Service Unavailable", "text/plain"),
    answer(200, b'{"workers": 3}'),  # JSON, but not /readyz's or /v1/cluster's
    answer(404, b'{"error": {"message": "not found"}}'),
    answer(200, b"[" * 100_000),
], ids=["html", "plain-503", "wrong-json", "json-404", "deep-json"])
def test_a_server_that_is_no_frontend_is_exit_2(handle: Any) -> None:
    with other_server(handle) as url:
        code, out, err = run(url)
    assert code == status.EXIT_UNREACHABLE
    assert out == ""
    assert err.startswith("launch.py status: ") and err.count("\n") == 1
    assert "diffusion-cluster frontend" in err


def test_a_server_that_speaks_no_http_is_exit_2() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\xffnot http at all\r\n\r\n")

        thread = threading.Thread(target=garbage, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        code, out, err = run(url)
        thread.join(5)
    assert code == status.EXIT_UNREACHABLE and out == ""
    assert err == f"launch.py status: cannot reach {url}: it answers something that is not HTTP\n"


def test_a_server_that_never_answers_is_exit_2_after_the_timeout() -> None:
    with socket.socket() as listener:  # the kernel accepts; nobody reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        code, _, err = run(url, timeout=0.3)
    assert code == status.EXIT_UNREACHABLE
    assert err == f"launch.py status: cannot reach {url}: timed out\n"


def test_a_redirect_is_not_followed_and_the_key_stays_here() -> None:
    seen: list[str | None] = []

    def elsewhere(handler: http.server.BaseHTTPRequestHandler) -> None:
        seen.append(handler.headers.get("Authorization"))
        answer(200, b'{"ready": true}')(handler)

    with other_server(elsewhere) as target:
        def redirect(handler: http.server.BaseHTTPRequestHandler) -> None:
            handler.send_response(302)
            handler.send_header("Location", f"{target}/readyz")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with other_server(redirect) as url:
            code, out, err = run(url, api_key=KEY)
    assert code == status.EXIT_UNREACHABLE and out == ""
    assert err == (f"launch.py status: {url}/readyz redirects to {target}/readyz: give the "
                   "frontend's own URL\n")
    assert seen == []


def test_not_an_http_url_is_exit_2() -> None:
    code, _, err = run("ftp://127.0.0.1:21")
    assert code == status.EXIT_UNREACHABLE
    assert err == "launch.py status: 'ftp://127.0.0.1:21' is not a frontend's http(s) URL\n"


# --------------------------------------------------------------------------------------------
# The throughput windows, on the server's clock


def jobs_answer(jobs: list[dict[str, Any]], *, now: float, has_more: bool = False
                ) -> status.Answer:
    return status.Answer(200, {"object": "list", "data": jobs, "has_more": has_more}, now)


def job(finished: float | None, *, created: float = 0.0, state: str = "succeeded",
        n: int = 1, images: int | None = None) -> dict[str, Any]:
    shown = [{"url": None}] * (n if images is None else images)
    return {"status": state, "created": int(created), "n": n,
            "finished": None if finished is None else int(finished), "images": shown}


def test_windows_count_succeeded_images_by_finish_time() -> None:
    now = 10_000.0
    lines = status.describe_throughput(jobs_answer([
        job(now - 5, n=4), job(now - 59, n=1), job(now - 61, n=2), job(now - 299, n=8),
        job(now - 301, n=16), job(now - 1, state="failed", n=32, images=0),
        job(None, state="running", n=64, images=0),
        job(now - 2, n=3, images=0),  # images not listed: its `n` counts
    ], now=now), keyed=False)
    assert lines[2].split() == ["last", "minute:", "8", "image(s),", "0.13", "images/s"]
    assert lines[3].split() == ["last", "5", "minutes:", "18", "image(s),", "0.06",
                                "images/s"]


def test_a_full_page_inside_the_window_is_a_lower_bound() -> None:
    now = 10_000.0
    page = [job(now - 30, created=now - 100)] * 100
    lines = status.describe_throughput(jobs_answer(page, now=now, has_more=True), keyed=False)
    assert "  last minute:     100 image(s)" in lines[2]  # created before the minute
    assert "at least 100 image(s), at least 0.33 images/s" in lines[3]


def test_garbage_job_fields_are_skipped() -> None:
    lines = status.describe_throughput(jobs_answer(
        ["x", {"status": "succeeded", "finished": "soon", "n": 5},
         {"status": "succeeded", "finished": 99, "n": True, "images": "many"}], now=100.0),
        keyed=False)
    assert "0 image(s)" in lines[2]


# --------------------------------------------------------------------------------------------
# launch.py status, as a process


def launch_status(*argv: str, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "launch.py", "status", *argv], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def test_launch_py_status_reads_the_key_from_the_environment() -> None:
    with frontend(FakeBroker(), api_keys=(KEY,)) as url:
        done = launch_status("--url", url.removeprefix("http://"), env={"DC_API_KEY": KEY})
        refused = launch_status("--url", url, env={"DC_API_KEY": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Frontend {url}: ready")
    assert ["w1", "gpu-host", "cpu", "tiny", "ready", "0", "-", "-"] in rows(done.stdout)
    assert refused.returncode == 2
    assert refused.stderr == (f"launch.py status: {url} wants an API key (HTTP 401): "
                              "pass --api-key KEY or set DC_API_KEY\n")


def test_launch_py_status_flag_beats_the_environment_and_not_ready_is_1() -> None:
    with frontend(FakeBroker([worker("w1", "tiny", state="loading")]),
                  api_keys=(KEY,)) as url:
        done = launch_status("--url", url, "--api-key", KEY, env={"DC_API_KEY": "sk-wrong"})
    assert done.returncode == 1, done.stderr
    assert "NOT READY: no worker is ready" in done.stdout


def test_launch_py_status_without_a_frontend_is_2_without_a_traceback() -> None:
    port = free_port()
    done = launch_status("--url", f"http://127.0.0.1:{port}")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (f"launch.py status: cannot reach http://127.0.0.1:{port}: "
                           "Connection refused\n")
