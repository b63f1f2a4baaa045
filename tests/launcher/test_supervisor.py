"""The supervisor restarts children that crash, and stops for good on one that cannot start."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from launcher.supervisor import EXIT_CONFIG, ProcessSpec, Supervisor

WATCHDOG_S = 20.0


def child(tmp_path: Path, name: str, body: str) -> ProcessSpec:
    """A Python child that appends a line to runs-NAME each time it starts, then runs ``body``."""
    runs = tmp_path / f"runs-{name}"
    code = (f"import os, sys, time\nopen({str(runs)!r}, 'a').write('run\\n')\n"
            f"runs = len(open({str(runs)!r}).read().splitlines())\n{body}\n")
    return ProcessSpec(name, [sys.executable, "-c", code], listens=(f"tcp://127.0.0.1:{name}",))


def runs(tmp_path: Path, name: str) -> int:
    path = tmp_path / f"runs-{name}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def supervise(supervisor: Supervisor, *, stop_when=None) -> tuple[int, float]:
    """Run wait() with a watchdog (or ``stop_when``) that stops it; (status, seconds)."""
    started = time.monotonic()
    done = threading.Event()

    def watchdog() -> None:
        deadline = started + WATCHDOG_S
        while not done.wait(0.05) and time.monotonic() < deadline:
            if stop_when is not None and stop_when():
                break
        supervisor.stop()

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        return supervisor.wait(), time.monotonic() - started
    finally:
        done.set()
        thread.join()


def test_exit_config_is_sysexits_ex_config() -> None:
    # The broker and the worker return os.EX_CONFIG; the supervisor must read it the same way.
    assert EXIT_CONFIG == 78


def test_a_child_that_cannot_start_stops_the_cluster_without_a_restart(tmp_path: Path) -> None:
    sleeper = child(tmp_path, "sleeper", "time.sleep(60)")
    broken = child(tmp_path, "broken", f"sys.exit({EXIT_CONFIG})")
    supervisor = Supervisor([sleeper, broken], grace=5)
    supervisor.start()
    status, seconds = supervise(supervisor)
    assert status == EXIT_CONFIG
    assert seconds < WATCHDOG_S / 2, "the supervisor did not stop on its own"
    assert runs(tmp_path, "broken") == 1
    assert supervisor.failure is not None
    assert "broken cannot start" in supervisor.failure
    assert "tcp://127.0.0.1:broken" in supervisor.failure
    # The others were stopped with it, not left running.
    assert all(c.process is None or c.process.poll() is not None
               for c in supervisor._children)


def test_a_child_that_ran_then_cannot_start_on_its_restart_stops_too(tmp_path: Path) -> None:
    # Ran, crashed; by its restart the port was taken: no endless loop of restarts.
    flaky = child(tmp_path, "flaky",
                  f"time.sleep(0.3)\nsys.exit(1 if runs == 1 else {EXIT_CONFIG})")
    supervisor = Supervisor([flaky], grace=5)
    supervisor.start()
    status, seconds = supervise(supervisor)
    assert status == EXIT_CONFIG
    assert seconds < WATCHDOG_S / 2
    assert runs(tmp_path, "flaky") == 2


def test_a_child_that_crashes_is_still_restarted(tmp_path: Path) -> None:
    crasher = child(tmp_path, "crasher", "sys.exit(1)")
    supervisor = Supervisor([crasher], grace=5)
    supervisor.start()
    status, _ = supervise(supervisor, stop_when=lambda: runs(tmp_path, "crasher") >= 3)
    assert status == 0
    assert supervisor.failure is None
    assert runs(tmp_path, "crasher") >= 3


@pytest.mark.parametrize("code", [0, 2])
def test_other_exit_statuses_are_restarted(tmp_path: Path, code: int) -> None:
    quitter = child(tmp_path, "quitter", f"sys.exit({code})")
    supervisor = Supervisor([quitter], grace=5)
    supervisor.start()
    status, _ = supervise(supervisor, stop_when=lambda: runs(tmp_path, "quitter") >= 2)
    assert (status, supervisor.failure) == (0, None)
