"""A real S3-compatible server for the storage tests: moto in server mode, in its own process.

Started once per test session on first use. Its port is chosen by the server itself (port 0)
and read back from its log, so two sessions on one host never race for one.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

START_TIMEOUT = 30.0  # seconds for the server to answer
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
_LISTENING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")


@dataclass
class S3Server:
    """A running S3-compatible server: where it is, and how to reach it."""

    endpoint_url: str
    log_path: Path
    client: Any = field(init=False)  # a boto3 S3 client for it
    env: dict[str, str] = field(init=False)  # what a process needs to use it, endpoint included

    def __post_init__(self) -> None:
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                                   **CREDENTIALS)
        self.env = {"AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
                    "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
                    "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint_url}

    def make_bucket(self, name: str) -> str:
        """Create the bucket ``name``; return its name."""
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


@contextlib.contextmanager
def running_s3_server(log_path: Path, env: dict[str, str] | None = None) -> Iterator[S3Server]:
    """Start moto's server, logging to ``log_path``, with ``env`` added to its environment.

    ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` makes it check credentials: it knows none.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        server = S3Server(_wait_for_endpoint(process, log_path), log_path)
        _wait_until_it_answers(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_endpoint(process: subprocess.Popen[bytes], log_path: Path) -> str:
    """The URL the server prints once it listens (werkzeug names the port it was given)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return match[1]
        _fail_if_exited(process, log_path)
        time.sleep(0.05)
    pytest.fail(f"the S3 server did not start in {START_TIMEOUT} s:\n{_tail(log_path)}")


def _wait_until_it_answers(server: S3Server, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            server.client.list_buckets()
            return
        except botocore.exceptions.ClientError:
            return  # an answer, if a refusal: a server that checks credentials knows none
        except Exception:
            _fail_if_exited(process, server.log_path)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _fail_if_exited(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        pytest.fail(f"the S3 server exited with {process.returncode}:\n{_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:]
