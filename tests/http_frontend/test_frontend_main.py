"""python -m http_frontend: its flags, and its exit when the broker thread dies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from http_frontend import __main__ as frontend_main
from tests.cluster import REPO


class Broker:
    def __init__(self) -> None:
        self.alive = True


def test_the_watchdog_stops_the_frontend_once_when_the_broker_thread_dies():
    broker, deaths = Broker(), []
    watchdog = frontend_main.BrokerWatchdog(broker, lambda: deaths.append(1), interval=0.01)
    watchdog.start()
    try:
        time.sleep(0.05)
        assert deaths == [] and not watchdog.died
        broker.alive = False
        deadline = time.monotonic() + 5
        while not deaths and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert deaths == [1] and watchdog.died
    finally:
        watchdog.stop()


def test_a_broker_client_without_alive_counts_as_alive():
    deaths: list[int] = []
    watchdog = frontend_main.BrokerWatchdog(object(), lambda: deaths.append(1), interval=0.01)
    watchdog.start()
    time.sleep(0.05)
    watchdog.stop()
    assert deaths == [] and not watchdog.died


# The real main(), with a broker client whose I/O thread "dies" a moment after it starts.
_DYING = textwrap.dedent("""
    import sys, threading, time
    import http_frontend.__main__ as m

    class DyingBrokerClient:
        def __init__(self, *args, **kwargs):
            self.alive = False
            self.connected = False
        def start(self):
            self.alive = True
            threading.Timer(0.5, setattr, (self, "alive", False)).start()
        def status(self):
            return None
        def close(self):
            self.alive = False

    m.BrokerClient = DyingBrokerClient
    sys.exit(m.main(["--port", "0", "--drain-timeout", "0.5"]))
""")


def test_main_exits_70_when_the_broker_thread_dies():
    done = subprocess.run([sys.executable, "-c", _DYING], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == frontend_main.EXIT_BROKER_THREAD_DIED, done.stderr
    assert "broker connection thread died" in done.stderr


@pytest.mark.parametrize(("argv", "error"), [
    (["--threads", "4", "--reserved-threads", "4"], "--reserved-threads"),
    (["--reserved-threads", "0"], "--reserved-threads"),
    (["--connection-limit", "0"], "--connection-limit"),
    (["--channel-timeout", "0"], "--channel-timeout"),
    (["--receive-timeout", "0"], "--receive-timeout"),
])
def test_limits_that_cannot_work_are_refused_at_start(argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        frontend_main.parse_args(argv)
    assert exited.value.code == 2
    assert error in capsys.readouterr().err


def test_default_limits_leave_threads_for_health_checks():
    args = frontend_main.parse_args([])
    assert (args.threads, args.reserved_threads, args.max_streams) == (64, 8, 32)
    assert (args.connection_limit, args.channel_timeout, args.receive_timeout) == (1000, 30, 30.0)
    small = frontend_main.parse_args(["--threads", "3"])
    assert (small.reserved_threads, small.max_streams) == (2, 1)


def test_no_thread_is_left_behind():
    before = threading.active_count()
    watchdog = frontend_main.BrokerWatchdog(Broker(), lambda: None, interval=0.01)
    watchdog.start()
    watchdog.stop()
    assert threading.active_count() == before
