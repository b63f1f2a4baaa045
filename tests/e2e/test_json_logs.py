"""--log-format json on a real cluster: every line every program writes is one JSON object, and
one job can be followed across the frontend, the broker and the worker by its id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.cluster import REPO, cluster_env, descendants, free_port, wait_until

pytestmark = pytest.mark.slow

REQUEST_ID = "e2e-json-logs-7f3a"
PROGRAMS = {"launch", "broker", "worker", "frontend"}


class Lines:
    """Every line of one output stream, read in a thread as it comes."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        wait_until(lambda: any(text in line for line in list(self.lines)), timeout,
                   repr(text), lambda: "\n".join(self.lines[-40:]))

    def close(self) -> None:
        self._thread.join(10)


class Run:
    """launch.py with its logs (stderr: every program's) kept apart from its banners
    (stdout: for the person at the terminal)."""

    def __init__(self, cache_dir: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, str(REPO / "launch.py"), "--port", str(port),
                "--clients", f"tcp://127.0.0.1:{free_port()}",
                "--workers", f"tcp://127.0.0.1:{free_port()}", "--num-workers", "1",
                "--heartbeat", "0.5", "--grace", "5", "--log-format", "json"]
        self.process = subprocess.Popen(argv, cwd=REPO, env=cluster_env(cache_dir),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None and self.process.stderr is not None
        self.banners = Lines(self.process.stdout)
        self.logs = Lines(self.process.stderr)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            for pid in descendants(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            raise
        finally:
            self.banners.close()
            self.logs.close()


@pytest.fixture(scope="module")
def finished(cache_dir: Path) -> Iterator[dict[str, Any]]:
    """A cluster that made one generation and stopped: its answer and every log line."""
    run = Run(cache_dir)
    try:
        run.banners.wait_for("Ready in", 120)
        response = httpx.post(f"{run.url}/v1/images/generations", timeout=120,
                              headers={"X-Request-ID": REQUEST_ID},
                              json={"prompt": "a lighthouse", "size": "64x64",
                                    "user": "log-tester"})
        job_id = response.json().get("job_id")
        run.logs.wait_for(f"job {job_id} succeeded", 30)
    finally:
        run.stop()
    yield {"response": response, "job_id": job_id, "lines": list(run.logs.lines),
           "banners": list(run.banners.lines)}


def entries(finished: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in finished["lines"]]


def about_the_job(finished: dict[str, Any], program: str) -> list[dict[str, Any]]:
    return [e for e in entries(finished)
            if e["program"] == program and e.get("job_id") == finished["job_id"]]


def test_the_request_id_comes_back(finished: dict[str, Any]) -> None:
    response = finished["response"]
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == REQUEST_ID


def test_every_line_is_one_json_object(finished: dict[str, Any]) -> None:
    seen = set()
    for line in finished["lines"]:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert {"time", "level", "program", "message"} <= entry.keys(), line
        seen.add(entry["program"])
    assert seen == PROGRAMS
    # stdout holds launch.py's banners for people, and no program's log lines.
    assert any(line.startswith("Ready in") for line in finished["banners"])
    assert not [line for line in finished["banners"] if line.startswith("{")]


def test_the_frontend_logs_the_job_with_its_request(finished: dict[str, Any]) -> None:
    lines = about_the_job(finished, "frontend")
    messages = [e["message"] for e in lines]
    assert any("sent to the broker" in m for m in messages), messages
    assert any("succeeded: 1 image(s)" in m for m in messages), messages
    for entry in lines:
        assert entry["model"] == "tiny" and entry["request_id"] == REQUEST_ID, entry
        assert entry["user"] == "log-tester", entry
    assert "a lighthouse" not in "\n".join(finished["lines"])  # prompts are never logged


def test_workers_name_themselves_on_every_line_once_they_have_an_id(
        finished: dict[str, Any]) -> None:
    workers = [e for e in entries(finished) if e["program"] == "worker"]
    serving = [i for i, e in enumerate(workers) if " serving " in e["message"]]
    assert serving, workers
    started = workers[serving[0]:]
    assert all(e.get("worker_id") for e in started), [e for e in started
                                                      if not e.get("worker_id")]


def test_the_broker_and_the_worker_log_the_job_too(finished: dict[str, Any]) -> None:
    """grep JOB_ID finds the job in every program it passed through."""
    for program in ("broker", "worker"):
        lines = about_the_job(finished, program)
        assert lines, f"no {program} line names job {finished['job_id']}"
        assert all(e["model"] == "tiny" for e in lines), lines
        assert all(e["user"] == "log-tester" for e in lines), lines  # the job carries it
        assert all(e.get("worker_id") for e in lines), lines
