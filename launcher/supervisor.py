"""Run child processes, restart the ones that crash (with back-off), stop them all cleanly.

A child that exits with EXIT_CONFIG is not restarted: it says it cannot run as configured (an
address already in use, a missing key file), which a restart would not change. The supervisor
then stops every child and wait() returns EXIT_CONFIG, whether that child was starting for the
first time or being restarted after it had run fine for hours (the port was taken meanwhile):
a cluster without its broker or frontend serves nothing, so it stops and says why rather than
retrying forever.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

# sysexits' EX_CONFIG: "cannot start as configured, do not restart me". The broker, the worker
# and the frontend exit with it when they cannot bind their address or read their keys.
EXIT_CONFIG = os.EX_CONFIG  # 78


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if launch.py dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Stopped only after the others exited: the broker carries their last results.
    stop_last: bool = False
    # The addresses it listens on, named when it cannot start.
    listens: tuple[str, ...] = ()


@dataclass
class _Child:
    spec: ProcessSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None


class Supervisor:
    """Owns the child processes; one thread (the caller of wait()) changes their state."""

    MAX_BACKOFF = 30.0
    STABLE_AFTER = 60.0  # a child that ran this long gets its back-off reset

    def __init__(self, specs: list[ProcessSpec], *, grace: float = 8.0) -> None:
        self.grace = grace
        self._children = [_Child(spec) for spec in specs]
        self._stop = threading.Event()
        # Why the supervisor stopped on its own (a child that cannot start), or None.
        self.failure: str | None = None

    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _: self._on_signal(signum))

    def _on_signal(self, signum: int) -> None:
        if not self._stop.is_set():
            log.info("got %s: stopping the cluster", signal.Signals(signum).name)
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    def start(self) -> None:
        for child in self._children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        env = {**os.environ, **child.spec.env, "PYTHONUNBUFFERED": "1"}
        # Children ignore the terminal's Ctrl-C (own session); we stop them in order.
        child.process = subprocess.Popen(child.spec.argv, env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform ==
                                         "linux" else None)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def wait(self) -> int:
        """Supervise until asked to stop; then stop every child. Returns the exit status:
        0, or EXIT_CONFIG when a child could not start as configured."""
        try:
            while not self._stop.wait(0.2):
                self._check_children(time.monotonic())
        finally:
            self._stop_all()
        return EXIT_CONFIG if self.failure else 0

    def _check_children(self, now: float) -> None:
        for child in self._children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child)
                continue
            code = child.process.poll() if child.process else None
            if code is None:
                continue
            if code == EXIT_CONFIG:
                self._give_up(child)
                return
            if now - child.started_at >= self.STABLE_AFTER:
                child.restarts = 0
            delay = min(self.MAX_BACKOFF, 0.5 * 2 ** child.restarts)
            child.restarts += 1
            child.restart_at = now + delay
            log.warning("%s exited with status %s; restarting in %.1f s",
                        child.spec.name, code, delay)

    def _give_up(self, child: _Child) -> None:
        """A child that cannot start as configured: stop everything, once, saying why."""
        spec = child.spec
        hint = f" (is {' or '.join(spec.listens)} already in use?)" if spec.listens else ""
        self.failure = (f"{spec.name} cannot start as configured{hint}: it exited with "
                        f"status {EXIT_CONFIG} after saying why")
        child.process = None  # reaped; _stop_all has nothing to signal
        log.error("%s: not restarting it; stopping the cluster", self.failure)
        self._stop.set()

    def _stop_all(self) -> None:
        """SIGTERM the children in two waves, within the grace period; SIGKILL what is left.

        The frontend and workers go first and drain (finish the jobs they hold, answer the
        requests waiting for them) while the broker still relays; the broker goes last.
        """
        deadline = time.monotonic() + self.grace
        for last in (False, True):
            wave = [c.process for c in self._children if c.spec.stop_last is last and
                    c.process is not None and c.process.poll() is None]
            for process in wave:
                _signal(process, signal.SIGTERM)
            for process in wave:
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop in time; killing it", process.pid)
                    _signal(process, signal.SIGKILL)
                    process.wait()
        log.info("all processes stopped")


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        # Each child leads its own session: signal the group, so grandchildren go too.
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
