"""A real Prometheus server scraping a cluster, from Debian's prometheus package.

What a dashboard or an alert does with our metrics is PromQL run by Prometheus, so that is
what the tests run it with: a server that scrapes one frontend every second into a temporary
directory, and answers queries through its HTTP API.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import free_port

SCRAPE_INTERVAL = 1.0  # seconds; rate() needs two scrapes inside its window
START_TIMEOUT = 30.0


class Prometheus:
    """A running server: ``query`` runs one PromQL expression now."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of ``expr``; an expression Prometheus refuses fails the test."""
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert body.get("status") == "success", f"{expr}: {body.get('error', resp.text)}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_scrapes(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the target has been scraped ``count`` times, all successfully."""
        deadline = time.monotonic() + timeout
        expr = f"count_over_time(up[1h]) >= {count} and min_over_time(up[1h]) == 1"
        while not self.query(expr):
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not scrape its target {count} times in {timeout} s")
            time.sleep(SCRAPE_INTERVAL / 2)


@contextmanager
def prometheus_scraping(target: str, *, bearer: str | None = None) -> Iterator[Prometheus]:
    """A Prometheus server scraping ``target`` (host:port) every second, stopped on exit."""
    binary = shutil.which("prometheus")
    if binary is None:  # a failure, not a skip: these tests must run wherever the suite does
        pytest.fail("Prometheus is not installed: `scripts/bootstrap test` installs Debian's "
                    "prometheus package")
    with tempfile.TemporaryDirectory(prefix="dc-prometheus-") as workdir:
        config = Path(workdir) / "prometheus.yml"
        auth = f"\n    authorization: {{credentials: {bearer}}}" if bearer else ""
        config.write_text(
            f"global: {{scrape_interval: {SCRAPE_INTERVAL:g}s, evaluation_interval: 1s}}\n"
            f"scrape_configs:\n  - job_name: diffusion-cluster{auth}\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        port = free_port()
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process)
            yield Prometheus(url)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reason = process.stderr.read() if process.stderr else ""
            pytest.fail(f"Prometheus exited at start: {reason}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"Prometheus was not ready in {START_TIMEOUT} s")
