"""A real single-node cluster (launch.py) on free ports, for the HTTP benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from _common import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """launch.py with CPU workers serving tiny; ``url`` once ``start()`` returned."""

    def __init__(self, *args: str, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Job records and images in a directory of its own, removed with the cluster.
        self.data_dir = tempfile.mkdtemp(prefix="dc-bench-")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "CUDA_VISIBLE_DEVICES": "", "DC_DATA_DIR": self.data_dir}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), "--port", str(self.port),
             "--clients", f"tcp://127.0.0.1:{free_port()}",
             "--workers", f"tcp://127.0.0.1:{free_port()}", "--num-workers", str(workers),
             "--log-level", "WARNING", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def start(self, timeout: float = 120.0) -> Cluster:
        deadline = time.monotonic() + timeout
        while not any("Ready in" in line for line in self.lines):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the cluster did not start:\n" + "".join(self.lines[-30:]))
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
