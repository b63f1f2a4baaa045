"""Real clusters for tests: launch.py (or each component) as real processes on free ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = 0.5


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all bound at once, so the OS cannot hand out one twice
    (one after another, a port just closed can come back: a cluster's two broker endpoints
    once got the same one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def bound_broker_endpoints(log: OutputLog, timeout: float = 30.0) -> tuple[str, str]:
    """The (clients, workers) endpoints a broker started on ``tcp://127.0.0.1:*`` bound.

    Binding port 0 and reading back what the broker logs leaves no window in which another
    process can take a port picked for it, as ``free_port()`` does.
    """
    line = log.wait_for("broker: clients on ", timeout)
    match = re.search(r"clients on (\S+), workers on (\S+)", line)
    assert match, line
    return match.group(1), match.group(2)


def bound_http_port(log: OutputLog, timeout: float = 30.0) -> int:
    """The port a frontend started with ``--port 0`` listens on, from its "serving on" line."""
    line = log.wait_for("serving on http://", timeout)
    match = re.search(r"serving on http://\S+?:(\d+) ", line)
    assert match and match.group(1) != "0", line
    return int(match.group(1))


def cluster_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a test cluster's processes: the shared tiny-model cache, and a
    data directory (job records, images) of its own, so no test resumes another's jobs."""
    data_dir = tempfile.mkdtemp(prefix="data-", dir=cache_dir)
    # torch's CPU threads (GNU OpenMP) spin at every barrier by default. A test runs several
    # workers beside a frontend, a broker, a browser and pytest on few cores: spinning
    # threads take the cores from the ones with work, and a 256x256 tiny job of 20 steps
    # took 10-20 s instead of 1 s. Waiting passively changes how idle threads wait, nothing
    # a test checks. One set in the environment wins.
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "DC_CACHE_DIR": str(cache_dir), "DC_DATA_DIR": data_dir,
            "CUDA_VISIBLE_DEVICES": ""}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               details: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true (returned), or fail naming ``what``
    (and what ``details`` says then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f"\n{details()}" if details else ""))


class OutputLog:
    """Collects a process's output in a thread, so tests can wait for a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if not self._thread.is_alive():
                break  # the process closed its output: it is gone
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen in {timeout} s; output:\n" +
                             "\n".join(self.lines[-60:]))

    def text(self) -> str:
        return "\n".join(self.lines)


class Cluster:
    """A whole single-node cluster started with launch.py on free ports."""

    def __init__(self, cache_dir: Path, *, workers: int = 2, extra: list[str] | None = None,
                 heartbeat: float = HEARTBEAT, env: dict[str, str] | None = None):
        self.port, clients_port, workers_port = free_ports(3)
        self.clients = f"tcp://127.0.0.1:{clients_port}"
        self.workers_endpoint = f"tcp://127.0.0.1:{workers_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache_dir = cache_dir
        self.argv = [sys.executable, str(REPO / "launch.py"), "--port", str(self.port),
                     "--clients", self.clients, "--workers", self.workers_endpoint,
                     "--num-workers", str(workers), "--heartbeat", str(heartbeat),
                     "--grace", "5", *(extra or [])]
        self.process = subprocess.Popen(self.argv, cwd=REPO,
                                        env={**cluster_env(cache_dir), **(env or {})},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.log = OutputLog(self.process)

    def wait_ready(self, timeout: float = 120.0) -> str:
        return self.log.wait_for("Ready in", timeout)

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def cluster_status(self) -> dict:
        return httpx.get(f"{self.url}/v1/cluster", timeout=10).json()

    def pid_of(self, module: str) -> list[int]:
        """Pids of this cluster's processes started as ``python -m <module>``."""
        found = []
        for pid in descendants(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in argv and module.encode() in argv:
                found.append(pid)
        return found

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in descendants(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            raise
