"""Issue 14 under attack, end to end: `launch.py status` against a frontend answering
garbage, huge or slow; and --log-format json on a real cluster (startup, a worker crash and
its restart, SIGINT/SIGTERM, a bad flag): every stderr line one JSON object."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher import status
from tests.cluster import REPO, cluster_env, descendants, free_port, wait_until

# --------------------------------------------------------------------------------------------
# launch.py status against a hostile frontend


@contextmanager
def fake_frontend(routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]
                  ) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes[self.path.split("?", 1)[0]](self)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def json_answer(body: bytes | str, code: int = 200) -> Callable[[Any], None]:
    data = body.encode() if isinstance(body, str) else body

    def handle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return handle


READY = json_answer('{"status": "ready", "workers": 1}')
NO_JOBS = json_answer('{"object": "list", "data": [], "has_more": false}')


def cluster_answer(workers: str, queues: str = "{}") -> Callable[[Any], None]:
    return json_answer(f'{{"workers": {workers}, "queues": {queues}}}')


def run_status(url: str, timeout: float = 2.0) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = status.run(url, out=out, err=err, timeout=timeout)
    return code, out.getvalue(), err.getvalue()


HUGE = "1" + "0" * 400  # a JSON integer Python reads, and no float can hold


@pytest.mark.parametrize("workers, jobs", [
    # An integer no float holds, for a rate, a time left and an image count.
    (f'[{{"worker_id": "w", "models": ["tiny"], "state": "ready", '
     f'"stats": {{"images_per_second": {HUGE}}}}}]', None),
    (f'[{{"worker_id": "w", "models": ["tiny"], "state": "quarantined", '
     f'"quarantine_left_s": {HUGE}}}]', None),
    ("[]", f'{{"object": "list", "has_more": false, "data": [{{"status": "succeeded", '
           f'"n": {HUGE}, "finished": 1e300, "created": 1}}]}}'),
    # Infinity and NaN are not JSON, but Python's json reads them
    ('[{"worker_id": "w", "models": ["tiny"], "state": "quarantined", '
     '"quarantine_left_s": NaN, "stats": {"images_per_second": Infinity}}]', None),
    ("[]", '{"object": "list", "has_more": true, "data": [{"status": "succeeded", '
           '"n": 2, "finished": NaN, "created": -Infinity}]}'),
    ('[{"worker_id": {"a": [1]}, "models": [[1], {"x": 2}, null], "state": ["s"], '
     '"running": 7, "jobs_done": "many"}]', None),
    ('[' + ",".join([f'{{"worker_id": "w{i}", "models": ["m{i}"], "state": "ready"}}'
                     for i in range(5000)]) + ']', None),
], ids=["huge-rate", "huge-quarantine", "huge-n", "nan-inf", "nan-finished",
        "wrong-types", "5000-workers"])
def test_status_survives_garbage_numbers(workers: str, jobs: str | None) -> None:
    routes = {"/readyz": READY, "/v1/cluster": cluster_answer(workers),
              "/v1/jobs": json_answer(jobs) if jobs else NO_JOBS}
    with fake_frontend(routes) as url:
        try:
            code, out, err = run_status(url)
        except Exception as exc:
            pytest.fail(f"launch.py status crashed with a traceback: {type(exc).__name__}: "
                        f"{exc}")
    assert code in (status.EXIT_READY, status.EXIT_UNREACHABLE), (code, out, err)
    assert "\x1b" not in out + err


def test_status_huge_answer_is_refused_not_read_whole() -> None:
    body = b'{"workers": [' + b'"x",' * (5 << 20) + b'"x"], "queues": {}}'  # > 16 MiB
    with fake_frontend({"/readyz": READY, "/v1/cluster": json_answer(body),
                        "/v1/jobs": NO_JOBS}) as url:
        code, _, err = run_status(url)
    assert code == status.EXIT_UNREACHABLE and "MiB" in err


def test_status_deeply_nested_answer_is_garbage_not_a_crash() -> None:
    body = "[" * 100_000 + "]" * 100_000
    with fake_frontend({"/readyz": READY, "/v1/cluster": json_answer(body),
                        "/v1/jobs": NO_JOBS}) as url:
        code, _, err = run_status(url)
    assert code == status.EXIT_UNREACHABLE and "not JSON" in err


def test_status_gives_up_on_a_frontend_that_trickles_its_answer() -> None:
    """urllib's timeout is per socket read: a frontend (or a proxy) sending one byte every
    0.1 s would keep `launch.py status` waiting for up to 16 MiB -- days. --timeout bounds
    each answer as a whole."""
    stop = threading.Event()

    def trickle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(1 << 24))
        handler.end_headers()
        handler.wfile.write(b'{"status": "ready", "x": "')
        while not stop.is_set():
            try:
                handler.wfile.write(b"a")
                handler.wfile.flush()
            except OSError:
                return
            stop.wait(0.1)

    result: list[Any] = []
    with fake_frontend({"/readyz": trickle, "/v1/cluster": cluster_answer("[]"),
                        "/v1/jobs": NO_JOBS}) as url:
        thread = threading.Thread(target=lambda: result.append(run_status(url, timeout=0.5)),
                                  daemon=True)
        thread.start()
        thread.join(20)  # 40 x --timeout
        stop.set()
        hung = thread.is_alive()
        thread.join(5)
    assert not hung, "launch.py status --timeout 0.5 still waits after 20 s on a trickling " \
                     "answer"
    assert result and result[0][0] == status.EXIT_UNREACHABLE


# --------------------------------------------------------------------------------------------
# --log-format json on a real cluster, through a crash, a restart and a signal


class Lines:
    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def close(self) -> None:
        self._thread.join(10)


def launch(cache_dir: Path, *extra: str) -> tuple[subprocess.Popen, Lines, Lines, str]:
    port = free_port()
    argv = [sys.executable, str(REPO / "launch.py"), "--port", str(port),
            "--clients", f"tcp://127.0.0.1:{free_port()}",
            "--workers", f"tcp://127.0.0.1:{free_port()}", "--num-workers", "1",
            "--heartbeat", "0.5", "--grace", "5", "--log-format", "json", *extra]
    process = subprocess.Popen(argv, cwd=REPO, env=cluster_env(cache_dir),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               errors="surrogateescape")
    return process, Lines(process.stdout), Lines(process.stderr), f"http://127.0.0.1:{port}"


def finish(process: subprocess.Popen, sig: int, *readers: Lines) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(40)
    except subprocess.TimeoutExpired:
        for pid in descendants(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        raise
    finally:
        for reader in readers:
            reader.close()


def not_json(lines: list[str]) -> list[str]:
    bad = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(entry, dict) or "program" not in entry:
            bad.append(line)
    return bad


def worker_pids(process: subprocess.Popen) -> list[int]:
    found = []
    for pid in descendants(process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv and b"gpu_worker" in argv:
            found.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_json_logs_through_hostile_requests_a_worker_crash_and_sigint(cache_dir: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    process, out, err, base = launch(cache_dir)
    try:
        wait_until(lambda: out.has("Ready in"), 150, "the cluster to be ready",
                   lambda: "\n".join(err.lines[-30:]))
        with httpx.Client(base_url=base, timeout=120) as client:
            # Client-controlled strings with line breaks: user, model, prompt, request id.
            forged = "x\n2026-11-30 00:00:00,000 frontend ERROR forged\u2028\x85"
            answer = client.post("/v1/images/generations",
                                 headers={"X-Request-ID": "attack-id-1"},
                                 json={"prompt": forged, "size": "64x64", "user": forged})
            assert answer.status_code == 200, answer.text
            client.post("/v1/images/generations",
                        json={"prompt": "p", "model": forged, "user": forged})
            # Real stats from a real worker, through the real broker: /metrics parses.
            wait_until(lambda: "dc_worker_jobs" in client.get("/metrics").text, 30,
                       "the worker's stats in /metrics")
            families = list(text_string_to_metric_families(client.get("/metrics").text))
            assert {f.name for f in families} >= {"dc_worker_jobs", "dc_broker_up"}
            # A worker crash, and its restart by the supervisor.
            (first,) = worker_pids(process)
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: err.has("restarting in"), 30, "the supervisor's restart line")
            wait_until(lambda: [p for p in worker_pids(process) if p != first], 30,
                       "a new worker process")
            wait_until(lambda: any(w.get("state") == "ready" for w in
                                   client.get("/v1/cluster").json().get("workers", [])
                                   if str(first) not in str(w.get("worker_id"))), 150,
                       "the restarted worker to register")
    finally:
        code = finish(process, signal.SIGINT, out, err)
    assert code == 0, "\n".join(err.lines[-20:])
    bad = not_json(err.lines)
    assert not bad, f"{len(bad)} stderr line(s) are not one JSON object: {bad[:10]}"
    programs = {json.loads(line)["program"] for line in err.lines}
    assert programs == {"launch", "broker", "worker", "frontend"}
    assert not [line for line in out.lines if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_worker_with_bad_c2pa_files_stops_the_cluster_once_in_json(cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    """EX_CONFIG from the worker: launch.py says why once and stops; no restart loop."""
    process, out, err, _ = launch(cache_dir, "--c2pa-cert", str(tmp_path / "missing.pem"),
                               "--c2pa-key", str(tmp_path / "missing.key"))
    try:
        code = process.wait(150)
    except subprocess.TimeoutExpired:
        code = finish(process, signal.SIGTERM, out, err)
        pytest.fail(f"launch.py kept running (exit {code}) with a worker that cannot start: "
                    f"{err.lines[-10:]}")
    out.close()
    err.close()
    assert code == os.EX_CONFIG, err.lines[-10:]
    entries = [json.loads(line) for line in err.lines if not not_json([line])]
    refusals = [e for e in entries if e["program"] == "worker"
                and e["message"].startswith("cannot start")]
    assert len(refusals) == 1, refusals
    assert not [e for e in entries if "restarting in" in e["message"]]
    # launch.py's own last word ("stopped: ...") is a JSON line too.
    bad = not_json(err.lines)
    assert not bad, f"--log-format json, yet launch.py wrote plain stderr lines: {bad}"


@pytest.mark.timeout(120)
def test_a_port_in_use_is_said_in_json_too(cache_dir: Path) -> None:
    """launch.py's own complaints (a port in use, a bad flag combination, a child that could
    not start) follow --log-format: a JSON log pipeline must not meet a plain line."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(REPO / "launch.py"), "--port", str(port),
             "--clients", f"tcp://127.0.0.1:{free_port()}",
             "--workers", f"tcp://127.0.0.1:{free_port()}", "--num-workers", "1",
             "--log-format", "json"], cwd=REPO, env=cluster_env(cache_dir),
            capture_output=True, text=True, timeout=100)
    assert done.returncode == os.EX_CONFIG, done.stderr
    bad = not_json(done.stderr.splitlines())
    assert not bad, f"--log-format json, yet launch.py wrote plain stderr lines: {bad}"


@pytest.mark.parametrize("argv", [["--num-workers", "abc"], ["--log-format", "xml"],
                                  ["--no-such-flag"]])
def test_a_bad_flag_is_plain_text_usage_and_exit_2(argv: list[str]) -> None:
    """Documented here, not a failure: argparse prints its usage and error as plain text
    (it runs before logging is configured, and --log-format itself may be the bad flag), and
    exits 2 without starting anything. A log shipper sees two non-JSON lines."""
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), "--log-format", "json",
                           *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error:" in done.stderr and "Traceback" not in done.stderr
    assert not done.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_watermarked_odd_sizes_never_fail_a_job(cache_dir: Path) -> None:
    """--watermark on a real worker: each size the API takes gives an image of that size;
    a size it refuses is a 400, never a failed job (5xx)."""
    pytest.importorskip("imwatermark")
    process, out, err, base = launch(cache_dir, "--watermark")
    answers: dict[str, tuple[int, str]] = {}
    try:
        wait_until(lambda: out.has("Ready in"), 150, "the cluster to be ready",
                   lambda: "\n".join(err.lines[-30:]))
        with httpx.Client(base_url=base, timeout=120) as client:
            for size in ("8x8", "16x16", "64x64", "255x257", "257x255", "256x256", "264x248",
                         "512x8", "8x512"):
                answer = client.post("/v1/images/generations",
                                     json={"prompt": "p", "size": size, "steps": 1,
                                           "response_format": "b64_json"})
                answers[size] = (answer.status_code, answer.text[:300])
    finally:
        finish(process, signal.SIGTERM, out, err)
    failed = {size: a for size, a in answers.items() if a[0] not in (200, 400)}
    assert not failed, failed
    assert any(code == 200 for code, _ in answers.values()), answers
    assert not not_json(err.lines)
