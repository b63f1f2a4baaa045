"""Broker overhead: what the broker path costs against a bare ZeroMQ round trip.

Three paths, each measured the same way by one client (a DEALER in this process):

  bare       a ROUTER (own process) that echoes every message straight back: the cost of one
             ZeroMQ round trip from Python, with no broker logic.
  reference  a minimal Python forwarder (own process) with the broker's message flow (SUBMIT ->
             ACCEPTED, JOBS to a worker, RESULT forwarded back) and none of its checks or
             bookkeeping: the floor for any Python broker with this topology.
  broker     the real broker.broker.Broker running run() in its own process.

The reference and broker paths use the same K no-op workers (real DEALER peers, in their own
process) that answer each JOBS at once with a RESULT carrying a payload frame.

For each path: closed-loop requests per second with C requests outstanding (after a warm-up),
then latency percentiles (submit -> RESULT) at C=1. Timings are printed, never asserted.

    .venv/bin/python bench/broker_overhead.py            # defaults: about 40 s
    .venv/bin/python bench/broker_overhead.py --seconds 1 --warmup 0.3   # quick

``_common`` (next to this file) puts the repository root on sys.path, so it is imported
before the ``broker`` packages.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import zmq
from _common import (
    MP,
    BrokerProcess,
    cpu_seconds,
    ms,
    percentile,
    print_header,
    print_profile,
    stop_process,
    table,
    wait_for_workers,
)

from broker import protocol
from broker.protocol import ImageInfo, JobSpec, MsgType

MODEL = "bench"
ANSWER_TIMEOUT = 5.0  # seconds without any answer before a measurement gives up


# ------------------------------------------------------------------------------ peers


def _echo_main(conn: Connection) -> None:
    """The bare path: a ROUTER that sends every message back to whoever sent it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    while True:  # ends with SIGTERM
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def _reference_main(conn: Connection) -> None:
    """A minimal forwarder: the broker's messages and routing, without its checks and state.

    SUBMIT -> ACCEPTED to the client and JOBS to the next worker (round-robin, no capacity);
    RESULT -> forwarded to the job's client with its payload frames untouched (no re-encode).
    """
    ctx = zmq.Context()
    clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (clients, workers):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
    c_port = clients.bind_to_random_port("tcp://127.0.0.1")
    w_port = workers.bind_to_random_port("tcp://127.0.0.1")
    conn.send((f"tcp://127.0.0.1:{c_port}", f"tcp://127.0.0.1:{w_port}"))
    ready: list[bytes] = []
    turn = itertools.count()
    owner: dict[str, bytes] = {}  # job id -> client identity
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    while True:  # ends with SIGTERM
        events = dict(poller.poll())
        if workers in events:
            while True:
                try:
                    frames = workers.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                header = msgpack.unpackb(frames[1].bytes)
                kind = header.get("t")
                if kind == "ready":
                    ready.append(frames[0].bytes)
                elif kind in ("result", "failed"):
                    client = owner.pop(header["job_id"], None)
                    if client is not None:
                        clients.send_multipart([client, *frames[1:]], copy=False)
        if clients in events:
            while True:
                try:
                    frames = clients.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                header = msgpack.unpackb(frames[1].bytes)
                if header.get("t") == "status":
                    reply = {"v": 1, "t": "status_reply", "workers": [{}] * len(ready),
                             "queues": {}}
                    clients.send_multipart([frames[0], msgpack.packb(reply)])
                    continue
                job = header["job"]
                owner[job["id"]] = frames[0].bytes
                clients.send_multipart([frames[0], msgpack.packb(
                    {"v": 1, "t": "accepted", "job_id": job["id"], "position": 0})])
                worker = ready[next(turn) % len(ready)]
                workers.send_multipart([worker, msgpack.packb({"v": 1, "t": "jobs",
                                                               "jobs": [job]})])


MAX_BATCH = 1  # the no-op workers take one job per JOBS, as the reference forwarder sends them
MAX_CAPACITY = 2 * MAX_BATCH  # the broker gives a worker no more room than this


def _ready_fields(worker_id: str, capacity: int) -> dict[str, Any]:
    return {"worker_id": worker_id, "host": "bench", "device": "none", "models": [MODEL],
            "max_batch": MAX_BATCH, "capacity": capacity, "version": "bench"}


def _result(job: dict[str, Any], payload: bytes, worker_id: str) -> list[Any]:
    """A RESULT as a real worker makes it: one image per seed, in the size and format asked.

    The broker checks every answer against its job and fails a job answered wrongly.
    """
    images = [ImageInfo(seed=seed, width=job["width"], height=job["height"],
                        format=job.get("output_format", "png")) for seed in job["seeds"]]
    return protocol.result(job["id"], images, [payload] * len(images), worker_id=worker_id)


def _workers_main(endpoint: str, ids: list[str], capacity: int, payload_size: int,
                  heartbeat: float) -> None:
    """K no-op workers on one thread: each a DEALER that answers every job at once.

    Headers from the broker are read with plain msgpack (no validation) so that the workers
    cost as little as possible; RESULT is built with broker.protocol.result.
    """
    ctx = zmq.Context()
    payload = os.urandom(payload_size)
    socks: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    for worker_id in ids:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.connect(endpoint)
        sock.send_multipart(protocol.encode(MsgType.READY, _ready_fields(worker_id, capacity)))
        poller.register(sock, zmq.POLLIN)
        socks[sock] = worker_id
    beat = protocol.encode(MsgType.HEARTBEAT, {"running": []})
    next_beat = time.monotonic() + heartbeat
    while True:  # ends with SIGTERM
        timeout = max(0.0, next_beat - time.monotonic())
        for sock, _ in poller.poll(int(timeout * 1000) + 1):
            worker_id = socks[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                header = msgpack.unpackb(frames[0].bytes)
                kind = header.get("t")
                if kind == "jobs":
                    for job in header["jobs"]:
                        sock.send_multipart(_result(job, payload, worker_id), copy=False)
                elif kind == "reconnect":
                    sock.send_multipart(protocol.encode(MsgType.READY,
                                                        _ready_fields(worker_id, capacity)))
        if time.monotonic() >= next_beat:  # the broker drops a worker silent for 3 beats
            for sock in socks:
                sock.send_multipart(beat)
            next_beat = time.monotonic() + heartbeat


# ------------------------------------------------------------------------------ the client


@dataclass
class Measurement:
    concurrency: int
    seconds: float = 0.0
    completed: int = 0
    latencies: list[float] = field(default_factory=list)
    answered: int = 0  # jobs answered, warm-up and drain included
    extra_messages: int = 0  # answers that were not the final one (ACCEPTED), same span
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds, same span

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


def _submit_template() -> dict[str, Any]:
    spec = JobSpec(id="x", model=MODEL, prompt="a lighthouse at dusk, oil on canvas",
                   width=512, height=512, steps=20, seeds=(1,))
    return spec.to_wire()


def _reply_to_bare(frames: list[Any]) -> str | None:
    return msgpack.unpackb(frames[0].bytes)["job"]["id"]


def _reply_to_broker(frames: list[Any]) -> str | None:
    header = msgpack.unpackb(frames[0].bytes)
    kind = header["t"]
    if kind == "result":
        return header["job_id"]
    if kind == "failed":
        raise RuntimeError(f"job {header['job_id']} failed: {header['code']} {header['message']}")
    return None  # ACCEPTED (and its position updates)


def closed_loop(sock: zmq.Socket, reply_id: Callable[[list[Any]], str | None], *,
                concurrency: int, warmup: float, seconds: float, prefix: str) -> Measurement:
    """Keep ``concurrency`` jobs outstanding; count those answered inside the measured window.

    Each answer immediately submits the next job. Answers during ``warmup`` are not counted;
    jobs still outstanding at the end are drained before returning.
    """
    template = _submit_template()
    pending: dict[str, float] = {}
    numbers = itertools.count()
    clock = time.perf_counter

    def submit() -> None:
        job_id = f"{prefix}{next(numbers)}"
        frames = protocol.encode(MsgType.SUBMIT, {"job": {**template, "id": job_id}})
        pending[job_id] = clock()
        sock.send_multipart(frames, copy=False)

    result = Measurement(concurrency)
    begin = clock()
    start, end = begin + warmup, begin + warmup + seconds
    for _ in range(concurrency):
        submit()
    while pending:
        if not sock.poll(int(ANSWER_TIMEOUT * 1000)):
            raise RuntimeError(f"no answer for {ANSWER_TIMEOUT} s with {len(pending)} "
                               "job(s) outstanding")
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            job_id = reply_id(frames)
            if job_id is None:
                result.extra_messages += 1
                continue
            now = clock()
            sent = pending.pop(job_id)
            result.answered += 1
            if start <= now < end:
                result.completed += 1
                result.latencies.append(now - sent)
            if now < end:
                submit()
    result.seconds = seconds
    return result


@dataclass
class Row:
    name: str
    rate: Measurement
    latency: Measurement
    rates: list[float] = field(default_factory=list)  # one per round

    def __post_init__(self) -> None:
        self.rates = self.rates or [self.rate.rate]

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)

    def merge(self, other: Row) -> None:
        """Add another round: rates are kept apart (median shown), latencies pooled."""
        self.rates.append(other.rate.rate)
        for mine, theirs in ((self.rate, other.rate), (self.latency, other.latency)):
            mine.latencies.extend(theirs.latencies)
            mine.completed += theirs.completed
            mine.answered += theirs.answered
            mine.extra_messages += theirs.extra_messages
            for role, seconds in theirs.cpu.items():
                mine.cpu[role] = mine.cpu.get(role, 0.0) + seconds

    def cells(self) -> list[str]:
        lat = self.latency.latencies
        hi = self.rate.latencies
        per_job = self.rate.extra_messages / max(1, self.rate.answered)
        return [self.name, f"{self.median_rate:,.0f}", ms(percentile(hi, 50)),
                ms(percentile(hi, 99)), ms(percentile(lat, 50)), ms(percentile(lat, 99)),
                f"{len(lat):,}", f"{per_job:.2f}",
                *(self.cpu_per_job(role) for role in CPU_ROLES)]

    def cpu_per_job(self, role: str) -> str:
        """Microseconds of CPU per answered job in the rate measurement, "-" where none."""
        seconds = self.rate.cpu.get(role)
        if seconds is None or math.isnan(seconds):
            return "-"
        return f"{seconds / max(1, self.rate.answered) * 1e6:.0f}"


CPU_ROLES = ("server", "workers", "client")


def cpu_by_role(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each role's processes (the client is this process)."""
    out = {role: sum(cpu_seconds(pid) for pid in role_pids) for role, role_pids in pids.items()}
    out["client"] = cpu_seconds()
    return out


def measure(name: str, endpoint: str, reply_id: Callable[[list[Any]], str | None],
            args: argparse.Namespace, *, workers: int = 0,
            pids: dict[str, list[int]] | None = None) -> Row:
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.connect(endpoint)
    try:
        if workers:
            wait_for_workers(sock, workers)
        print(f"  {name}: C={args.concurrency} for {args.seconds:g} s ...", flush=True)
        before = cpu_by_role(pids or {})
        rate = closed_loop(sock, reply_id, concurrency=args.concurrency, warmup=args.warmup,
                           seconds=args.seconds, prefix=f"{name}-c-")
        after = cpu_by_role(pids or {})
        rate.cpu = {role: after[role] - before[role] for role in after}
        print(f"  {name}: C=1 for {args.seconds:g} s ...", flush=True)
        latency = closed_loop(sock, reply_id, concurrency=1, warmup=args.warmup,
                              seconds=args.seconds, prefix=f"{name}-l-")
    finally:
        sock.close(linger=0)
    return Row(name, rate, latency)


def start_workers(endpoint: str, args: argparse.Namespace) -> list[Any]:
    ids = [f"noop-{i}" for i in range(args.workers)]
    groups = [ids[i::args.worker_procs] for i in range(args.worker_procs)]
    procs = []
    for group in filter(None, groups):
        proc = MP.Process(target=_workers_main, daemon=True, name="bench-workers",
                          args=(endpoint, group, args.capacity, args.payload, args.heartbeat))
        proc.start()
        procs.append(proc)
    return procs


def run_bare(args: argparse.Namespace) -> Row:
    parent, child = MP.Pipe()
    echo = MP.Process(target=_echo_main, args=(child,), daemon=True, name="bench-echo")
    echo.start()
    try:
        endpoint = parent.recv()
        return measure("bare", endpoint, _reply_to_bare, args, pids={"server": [echo.pid]})
    finally:
        stop_process(echo)


def run_reference(args: argparse.Namespace) -> Row:
    parent, child = MP.Pipe()
    forwarder = MP.Process(target=_reference_main, args=(child,), daemon=True,
                           name="bench-forwarder")
    forwarder.start()
    procs: list[Any] = []
    try:
        clients, workers = parent.recv()
        procs = start_workers(workers, args)
        return measure("reference", clients, _reply_to_broker, args, workers=args.workers,
                       pids={"server": [forwarder.pid], "workers": [p.pid for p in procs]})
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(forwarder)


def run_broker(args: argparse.Namespace) -> tuple[Row, dict[str, Any]]:
    broker = BrokerProcess(profile=args.profile_broker, heartbeat_interval=args.heartbeat,
                           max_queue=max(256, 4 * args.concurrency))
    procs: list[Any] = []
    try:
        procs = start_workers(broker.workers, args)
        row = measure("broker", broker.clients, _reply_to_broker, args, workers=args.workers,
                      pids={"server": [broker.proc.pid], "workers": [p.pid for p in procs]})
    finally:
        for proc in procs:
            stop_process(proc)
        stats = broker.stop()
    return row, stats


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Broker overhead: closed-loop rate and latency of the real broker against "
                    "a bare ZeroMQ DEALER<->ROUTER echo (and a minimal Python forwarder).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=8,
                        help="requests outstanding during the rate measurement")
    parser.add_argument("-t", "--seconds", type=float, default=5.0,
                        help="length of each measurement (rate, then latency at C=1)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds before each measurement whose answers are not counted")
    parser.add_argument("-k", "--workers", type=int, default=4, help="no-op workers")
    parser.add_argument("--worker-procs", type=int, default=1,
                        help="processes the no-op workers are spread over (each polls its "
                             "workers' sockets on one thread)")
    parser.add_argument("--capacity", type=int, default=MAX_CAPACITY,
                        help="capacity each worker announces in READY: 1 or 2 (the broker "
                             f"gives a worker at most 2 x max_batch, and max_batch is "
                             f"{MAX_BATCH}); with fewer slots than --concurrency the rest of "
                             "the jobs wait in the broker's queue")
    parser.add_argument("--payload", type=int, default=1024,
                        help="bytes in each RESULT's payload frame")
    parser.add_argument("--heartbeat", type=float, default=1.0,
                        help="broker and worker heartbeat interval (s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every path this many times, alternating them; the table "
                             "shows the median rate and pooled latencies")
    parser.add_argument("--skip", choices=["bare", "reference", "broker"], action="append",
                        default=[], help="leave a path out (repeatable)")
    parser.add_argument("--profile-broker", metavar="FILE",
                        help="run the broker under cProfile, save the stats to FILE and print "
                             "the top functions (slows the broker: figures not comparable)")
    args = parser.parse_args(argv)
    if min(args.concurrency, args.workers, args.worker_procs, args.rounds) < 1:
        parser.error("--concurrency, --workers, --worker-procs and --rounds must be at least 1")
    if not 1 <= args.capacity <= MAX_CAPACITY:
        parser.error(f"--capacity must be 1..{MAX_CAPACITY} (2 x max_batch {MAX_BATCH})")
    return args


def report(rows: dict[str, Row], args: argparse.Namespace, stats: dict[str, Any]) -> None:
    c = args.concurrency
    print()
    print(table(["path", f"req/s C={c}", f"p50 C={c} ms", f"p99 C={c} ms", "p50 C=1 ms",
                 "p99 C=1 ms", "n C=1", "extra msg/job", "server µs/job", "workers µs/job",
                 "client µs/job"],
                [row.cells() for row in rows.values()]))
    print("\nextra msg/job: answers besides RESULT the client read per job (ACCEPTED); "
          "bare echoes the SUBMIT itself.")
    print("µs/job: CPU (user + system, all threads) per answered job during the rate "
          "measurement: server = the echo, the forwarder or the broker; workers = the no-op "
          "workers; client = this process. They depend less than req/s on how the "
          f"{os.cpu_count()} cores are shared (though wake-ups cost more when processes take "
          "turns on few cores).")
    if args.rounds > 1:
        for row in rows.values():
            print(f"{row.name} req/s per round: " + ", ".join(f"{r:,.0f}" for r in row.rates))
    if stats and "broker" in rows:
        jobs = rows["broker"].rate.answered + rows["broker"].latency.answered
        threads = ", ".join(f"{name} {sec:.1f} s"
                            for name, sec in sorted(stats.get("threads", {}).items()) if sec)
        print(f"broker process: {stats.get('ticks', 0):,} loop ticks, "
              f"{stats.get('cpu_s', 0):.1f} s CPU over the whole run "
              f"({jobs:,} jobs); by thread: {threads or '-'}")
    bare, broker = rows.get("bare"), rows.get("broker")
    if bare is None or broker is None:
        return
    ratio = broker.median_rate / bare.median_rate if bare.median_rate else float("nan")
    added50 = percentile(broker.latency.latencies, 50) - percentile(bare.latency.latencies, 50)
    added99 = percentile(broker.latency.latencies, 99) - percentile(bare.latency.latencies, 99)
    print()
    print(f"broker rate / bare rate (C={c}):  {ratio:.3f}   "
          f"target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'}")
    print(f"added latency at C=1, p50:       {added50 * 1000:+.3f} ms   "
          f"target < 0.5 ms: {'met' if added50 < 0.0005 else 'NOT met'}")
    print(f"added latency at C=1, p99:       {added99 * 1000:+.3f} ms")
    ref = rows.get("reference")
    if ref is not None and ref.median_rate:
        print(f"broker rate / reference rate:    {broker.median_rate / ref.median_rate:.3f}   "
              "(how much of the gap is the broker's own per-message work; the rest is the "
              "extra hops and messages of any Python broker)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_header("broker overhead")
    print(f"settings: C={args.concurrency}, {args.seconds:g} s per measurement after "
          f"{args.warmup:g} s warm-up; {args.workers} no-op worker(s) in "
          f"{min(args.worker_procs, args.workers)} process(es), capacity {args.capacity} each, "
          f"{args.payload} B result payload")
    print(f"note: the client, the broker (or echo/forwarder) and the workers share the "
          f"{os.cpu_count()} cores of this machine; every path competes with the client and "
          "workers for CPU, so the figures are an upper bound on overhead, not a broker "
          "in isolation.\n", flush=True)
    rows: dict[str, Row] = {}
    stats: dict[str, Any] = {}
    for round_no in range(args.rounds):
        if args.rounds > 1:
            print(f" round {round_no + 1} of {args.rounds}", flush=True)
        got: dict[str, Row] = {}
        if "bare" not in args.skip:
            got["bare"] = run_bare(args)
        if "reference" not in args.skip:
            got["reference"] = run_reference(args)
        if "broker" not in args.skip:
            got["broker"], round_stats = run_broker(args)
            for key, value in round_stats.items():
                if key == "threads":
                    merged = stats.setdefault("threads", {})
                    for name, sec in value.items():
                        merged[name] = merged.get(name, 0.0) + sec
                else:
                    stats[key] = stats.get(key, 0) + value
        for name, row in got.items():
            if name in rows:
                rows[name].merge(row)
            else:
                rows[name] = row
    report(rows, args, stats)
    if args.profile_broker and "broker" in rows:
        print_profile(args.profile_broker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
