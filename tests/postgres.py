"""A real PostgreSQL server for the storage tests, from the system's binaries.

One server per test session, started on first use in a temporary directory and stopped at the
end; each test takes a fresh database from it (``make_database()``), so no two share state.
PostgreSQL refuses to run as root: under root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # newest first
SERVER_USER = "postgres"  # the system user the server runs as when the tests run as root
START_ATTEMPTS = 3  # a free port may be taken before the server binds it: try another


@dataclass
class PostgresServer:
    """A running server; trust authentication on 127.0.0.1 for its superuser."""

    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def make_database(self) -> str:
        """Create a new, empty database; its URL."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


def _binary(name: str) -> str:
    for bin_dir in BIN_DIRS:
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    found = shutil.which(name)
    if found is None:  # a failure, not a skip: these tests must run wherever the suite does
        pytest.fail(f"PostgreSQL's {name} is not installed: `scripts/bootstrap test` installs "
                    f"Debian's postgresql package")
    return found


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_as_server_user(argv), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(data: Path, socket_dir: Path, log_file: Path) -> int:
    """Start the server on a free port; the port."""
    result = None
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        # Durability is no concern for throwaway data: skip every fsync.
        options = (f"-h 127.0.0.1 -p {port} -k {socket_dir} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        result = _run([_binary("pg_ctl"), "start", "-D", str(data), "-l", str(log_file),
                       "-w", "-t", "60", "-o", options])
        if result.returncode == 0:
            return port
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    assert result is not None
    pytest.fail(f"PostgreSQL did not start: {result.stdout}{result.stderr}\n{log[-2000:]}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session."""
    # Not pytest's tmp_path: its directories are private to the user running the tests,
    # and the server user must be able to reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="dc-postgres-"))
    data, socket_dir, log_file = root / "data", root / "sockets", root / "server.log"
    socket_dir.mkdir()
    if os.geteuid() == 0:
        for path in (root, socket_dir):
            shutil.chown(path, SERVER_USER, SERVER_USER)
    user = SERVER_USER if os.geteuid() == 0 else getpass.getuser()
    try:
        init = _run([_binary("initdb"), "-D", str(data), "-U", user, "--auth=trust",
                     "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {init.stdout}{init.stderr}")
        port = _start(data, socket_dir, log_file)
        try:
            yield PostgresServer(port=port, user=user)
        finally:
            _run([_binary("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
