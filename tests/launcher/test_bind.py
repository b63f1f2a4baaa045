"""A launch.py that cannot listen where it is told says so once and exits; it never loops.

Each test takes an address with a real listening socket and runs launch.py as a real process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.cluster import address_in_use, split_address
from launcher.supervisor import EXIT_CONFIG
from tests.cluster import REPO, OutputLog, cluster_env, free_port

EXIT_WITHIN_S = 30.0


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is listening on, for the length of the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def launch_argv(taken: str, port: int) -> tuple[list[str], str]:
    """launch.py's flags with the ``taken`` address on ``port``; (flags, that address)."""
    addresses = {"port": str(free_port()), "clients": f"tcp://127.0.0.1:{free_port()}",
                 "workers": f"tcp://127.0.0.1:{free_port()}"}
    addresses[taken] = str(port) if taken == "port" else f"tcp://127.0.0.1:{port}"
    named = f"127.0.0.1:{port}" if taken == "port" else addresses[taken]
    return (["--port", addresses["port"], "--clients", addresses["clients"], "--workers",
             addresses["workers"], "--num-workers", "1", "--grace", "5"], named)


def run_until_exit(argv: list[str], cache_dir: Path) -> tuple[int | None, OutputLog, float]:
    """Run ``argv``; return (exit status, output, seconds) as soon as it exits, or once a
    child is restarted (status None: it would loop), or after EXIT_WITHIN_S."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=REPO, env=cluster_env(cache_dir),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = OutputLog(process)
    try:
        deadline = started + EXIT_WITHIN_S
        while process.poll() is None and time.monotonic() < deadline:
            if any("restarting in" in line for line in list(output.lines)):
                break
            time.sleep(0.05)
        status = process.poll()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(15)
    output._thread.join(5)
    return status, output, time.monotonic() - started


@pytest.mark.parametrize("taken", ["port", "clients", "workers"])
def test_launch_on_a_taken_address_exits_at_once_naming_it(
        taken: str, taken_port: int, cache_dir: Path) -> None:
    flags, named = launch_argv(taken, taken_port)
    status, output, seconds = run_until_exit(
        [sys.executable, str(REPO / "launch.py"), *flags], cache_dir)
    text = output.text()
    assert status == EXIT_CONFIG, text
    assert seconds < EXIT_WITHIN_S
    lines = [line for line in output.lines if named in line]
    assert len(lines) == 1 and "already in use" in lines[0], text
    assert lines[0].startswith("launch.py: cannot listen on"), text
    assert "started" not in text, "children were started on an address known to be taken"


# The check before starting is racy: the address can be taken after it. Then the child that
# cannot bind must exit with EXIT_CONFIG, and launch.py stop instead of restarting it. Run
# launch.py with its check disabled to see that path.
UNCHECKED = ("import sys, launch; launch.addresses_in_use = lambda args: []; "
             "sys.exit(launch.main(sys.argv[1:]))")


@pytest.mark.parametrize(("taken", "child"), [
    ("clients", "broker"),
    ("workers", "broker"),
    ("port", "frontend"),
])
def test_a_child_that_cannot_bind_stops_launch_instead_of_looping(
        taken: str, child: str, taken_port: int, cache_dir: Path) -> None:
    flags, named = launch_argv(taken, taken_port)
    status, output, seconds = run_until_exit([sys.executable, "-c", UNCHECKED, *flags],
                                             cache_dir)
    text = output.text()
    assert sum(f"started {child} " in line for line in output.lines) == 1, text
    assert "restarting in" not in text, text
    assert status == EXIT_CONFIG, text
    assert seconds < EXIT_WITHIN_S
    # The child's own error and launch.py's last line both name the address.
    assert any("cannot start" in line and named in line for line in output.lines
               if not line.startswith("launch.py")), text
    last = output.lines[-1]
    assert last.startswith(f"launch.py: stopped: {child} cannot start"), text
    assert named in last, text


def test_address_in_use_sees_a_listener_and_nothing_else(taken_port: int) -> None:
    assert address_in_use(f"127.0.0.1:{taken_port}") == "Address already in use"
    assert address_in_use(f"tcp://127.0.0.1:{taken_port}") == "Address already in use"
    assert address_in_use(f"tcp://*:{taken_port}") == "Address already in use"
    assert address_in_use(f"tcp://127.0.0.1:{free_port()}") is None
    assert address_in_use("tcp://127.0.0.1:*") is None  # ephemeral: nothing to check
    assert address_in_use("ipc:///tmp/broker.sock") is None
    assert address_in_use("tcp://no-such-host.invalid:5555") is None  # left to the program


def test_a_port_closed_a_moment_ago_counts_as_free() -> None:
    # A cluster that just stopped leaves TIME_WAIT connections; waitress and ZeroMQ bind
    # through them (SO_REUSEADDR), so the check must not refuse a restart of launch.py.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress and ZeroMQ
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    assert address_in_use(f"127.0.0.1:{port}") is None


@pytest.mark.parametrize(("address", "expected"), [
    ("tcp://127.0.0.1:5555", ("127.0.0.1", 5555)),
    ("tcp://*:5555", ("0.0.0.0", 5555)),
    ("tcp://[::1]:5555", ("::1", 5555)),
    ("[::]:8000", ("::", 8000)),
    ("0.0.0.0:8000", ("0.0.0.0", 8000)),
    ("tcp://127.0.0.1:*", None),
    ("ipc:///tmp/x", None),
    ("inproc://x", None),
])
def test_split_address(address: str, expected: tuple[str, int] | None) -> None:
    assert split_address(address) == expected
