"""Helpers shared by the benchmark scripts in bench/ (not a package: each script imports this
module from its own folder, which Python puts first on sys.path).

What is here: the repository root on sys.path, a description of the machine, percentiles, a
plain-text table, and a real ``broker.broker.Broker`` running ``run()`` in a child process on
ephemeral loopback ports.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402
import zmq  # noqa: E402

# "spawn": a child never inherits the parent's ZeroMQ context (contexts are not fork-safe).
MP = multiprocessing.get_context("spawn")


# ------------------------------------------------------------------------------ the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_lines() -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"machine: {platform.node()} {platform.system()} {platform.release()} {platform.machine()}",
        f"cpu:     {_cpu_model()}; {os.cpu_count()} cores, {usable} usable by this process; "
        f"load average {load}",
        f"python:  {platform.python_implementation()} {platform.python_version()}",
        f"zmq:     pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; "
        f"msgpack {'.'.join(map(str, msgpack.version))}",
    ]


def print_header(title: str) -> None:
    print(f"== {title}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    for line in machine_lines():
        print(line)
    print(flush=True)


# ------------------------------------------------------------------------------ numbers


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values. May return inf."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return "inf"
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


# ------------------------------------------------------------------------------ the broker


def _broker_main(conn: Connection, config: dict[str, Any], profile: str | None) -> None:
    """Child process: bind a real Broker on ephemeral ports, report them, run until SIGTERM."""
    import logging
    import signal

    from broker.broker import Broker, BrokerConfig

    logging.basicConfig(level=logging.WARNING, format="  [broker] %(levelname)s %(message)s")
    broker = Broker(BrokerConfig(**config))
    broker.bind()
    ticks = 0
    tick = broker.tick

    def counting_tick(*, timeout: float = 0.0) -> None:
        nonlocal ticks
        ticks += 1
        tick(timeout=timeout)

    broker.tick = counting_tick  # type: ignore[method-assign]
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    conn.send((broker.client_endpoint, broker.worker_endpoint))
    started = time.process_time()
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(broker.run)
        profiler.dump_stats(profile)
    else:
        broker.run()
    conn.send({"ticks": ticks, "cpu_s": time.process_time() - started,
               "threads": thread_cpu_seconds()})


class BrokerProcess:
    """``broker.broker.Broker`` in a child process, bound to tcp://127.0.0.1:* twice."""

    def __init__(self, *, profile: str | None = None, **config: Any) -> None:
        config = {"clients": "tcp://127.0.0.1:*", "workers": "tcp://127.0.0.1:*", **config}
        self._conn, child = MP.Pipe()
        self.proc = MP.Process(target=_broker_main, args=(child, config, profile),
                               name="bench-broker", daemon=True)
        self.proc.start()
        if not self._conn.poll(20):
            self.proc.kill()
            raise RuntimeError("the broker process did not start within 20 s")
        self.clients, self.workers = self._conn.recv()
        self.stats: dict[str, Any] = {}

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the broker finishes its tick and closes); return its tick count and CPU."""
        if self.proc.is_alive():
            self.proc.terminate()
        if self._conn.poll(10):
            self.stats = self._conn.recv()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        return self.stats


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads); Linux only.

    NaN where /proc is not there. Read it before stopping a process: a reaped one is gone.
    """
    if pid is None or pid == os.getpid():
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int | str = "self") -> dict[str, float]:
    """CPU seconds per thread name of a process (Linux only; {} elsewhere).

    Tells the Python thread from libzmq's background I/O thread ("ZMQbg/IO/0").
    """
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[name] = out.get(name, 0.0) + seconds
    return out


def stop_process(proc: Any) -> None:
    """Terminate a helper process started here (by its handle), killing it if it lingers."""
    if proc.is_alive():
        proc.terminate()
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def print_profile(path: str, limit: int = 25) -> None:
    import pstats

    print(f"\nbroker profile ({path}), top {limit} by own time; profiling slows the broker, "
          "so the figures of a profiled run are not comparable:")
    pstats.Stats(path, stream=sys.stdout).sort_stats("tottime").print_stats(limit)


def wait_for_workers(sock: zmq.Socket, count: int, timeout: float = 20.0) -> None:
    """Ask the broker for STATUS until ``count`` workers are registered (``sock``: a DEALER)."""
    from broker import protocol
    from broker.protocol import MsgType

    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        sock.send_multipart(protocol.encode(MsgType.STATUS))
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            if not sock.poll(50):
                continue
            header = msgpack.unpackb(sock.recv_multipart()[0])
            if header.get("t") == "status_reply":
                seen = len(header["workers"])
                if seen >= count:
                    return
                break
        time.sleep(0.05)
    raise RuntimeError(f"only {seen} of {count} workers registered with the broker in {timeout} s")
