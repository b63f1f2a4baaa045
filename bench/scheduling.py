"""Scheduling efficiency: the broker against round-robin PUSH/PULL under open-loop load.

For each worker count N and each job-size mix, the same Poisson arrival sequence (same seed)
is offered to two schedulers:

  broker       the real broker.broker.Broker (own process) with N simulated workers: each is
               the real worker I/O thread (gpu_worker.link.BrokerLink: READY, heartbeats, JOBS)
               plus a job thread whose "work" is a sleep, announcing capacity 1 as a GPU
               worker does. The N workers live in a few helper processes.
  round-robin  what the project this replaces did: the client's PUSH socket deals jobs to the
               N connected PULL workers in turn, whatever their load; workers answer on their
               own PUSH socket to the client's PULL.

The client (this process) submits job i at its scheduled arrival time and records when its
result comes back. Latency = completion - scheduled arrival, so a client that falls behind its
schedule shows up as latency instead of being hidden (no coordinated omission).

    .venv/bin/python bench/scheduling.py                 # defaults: about 80-90 s
    .venv/bin/python bench/scheduling.py --workers 4,64 --duration 2 --warmup 0.5   # quick
    .venv/bin/python bench/scheduling.py --dispatch-only     # fair sharing's cost, seconds

Then, in-process, the broker's dispatch cost under fair sharing (broker/fair_queue.py): the
same number of queued jobs held by one identity and by many (``--users``, 1,000 by default),
dispatched one batch at a time as the broker's lease round does (``JobTable.head`` for the
next job, then ``take_batch``). It prints microseconds per job and the ratio to one identity;
the many identities once more split between both priority classes (every other identity's
key ``class=batch``), so the minimum share's turns come throughout.

``_common`` (next to this file) puts the repository root on sys.path, so it is imported
before the ``broker`` and ``gpu_worker`` packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from _common import (
    MP,
    BrokerProcess,
    cpu_seconds,
    percentile,
    print_header,
    print_profile,
    stop_process,
    table,
    wait_for_workers,
)

from broker import protocol
from broker.jobs import Job, JobTable
from broker.protocol import ErrorCode, ImageInfo, JobSpec, MsgType

MODEL = "bench"
PING_PREFIX = "ping"


# ------------------------------------------------------------------------------ job sizes


@dataclass(frozen=True)
class Mix:
    """A job-size distribution: ``long`` seconds with probability ``long_frac``, else ``short``."""

    name: str
    short: float
    long: float = 0.0
    long_frac: float = 0.0

    @property
    def mean(self) -> float:
        return (1 - self.long_frac) * self.short + self.long_frac * self.long

    def draw(self, rng: random.Random) -> float:
        return self.long if self.long_frac and rng.random() < self.long_frac else self.short

    def describe(self) -> str:
        if not self.long_frac:
            return f"{self.name}: every job {self.short * 1000:g} ms"
        return (f"{self.name}: {(1 - self.long_frac) * 100:g}% {self.short * 1000:g} ms, "
                f"{self.long_frac * 100:g}% {self.long * 1000:g} ms "
                f"(mean {self.mean * 1000:g} ms)")


@dataclass
class Plan:
    """One run's arrivals: offsets from the start (s) and each job's service time (s)."""

    workers: int
    mix: Mix
    rate: float  # offered jobs/s = utilisation * workers / mix.mean
    arrivals: list[float]
    services: list[float]


def make_plan(workers: int, mix: Mix, args: argparse.Namespace) -> Plan:
    rate = args.utilisation * workers / mix.mean
    rng = random.Random(f"{args.seed}-{workers}-{mix.name}")
    # A Poisson process on [0, D) given its count: that many uniform points, sorted. Fixing the
    # count at rate * D keeps small-N runs from offering 20% more or less than planned by luck.
    count = round(rate * args.duration)
    arrivals = sorted(rng.uniform(0, args.duration) for _ in range(count))
    services = [mix.draw(rng) for _ in arrivals]
    return Plan(workers, mix, rate, arrivals, services)


def _job_frames(template: dict[str, Any], job_id: str, service: float) -> list[Any]:
    # The service time rides in the prompt: the broker re-encodes JobSpecs, dropping unknown keys.
    return protocol.encode(MsgType.SUBMIT,
                           {"job": {**template, "id": job_id, "prompt": f"sleep {service!r}"}})


def _service_of(job: JobSpec) -> float:
    return float(job.prompt.split()[1])


def _template() -> dict[str, Any]:
    return JobSpec(id="x", model=MODEL, prompt="sleep 0", width=512, height=512, steps=20,
                   seeds=(1,)).to_wire()


# ------------------------------------------------------------------------------ workers


class _SleepWorker:
    """What gpu_worker.worker.Worker does with each job, with a sleep for the pipeline: the
    link's handler (batches in, cancels, what it holds) and a job thread."""

    def __init__(self, worker_id: str, payload: bytes) -> None:
        self.worker_id = worker_id
        self.payload = payload
        self.link: Any = None
        self._batches: queue.Queue[list[JobSpec]] = queue.Queue()
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._cancelled: set[str] = set()

    def on_jobs(self, batch: list[JobSpec], inputs: Any = ()) -> None:
        with self._lock:
            self._held.update(job.id for job in batch)
        self._batches.put(batch)

    def on_cancel(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._held:
                self._cancelled.add(job_id)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def run(self) -> None:
        image = [ImageInfo(seed=1, width=512, height=512, format="png")]
        while True:
            for job in self._batches.get():
                with self._lock:
                    cancelled = job.id in self._cancelled
                if not cancelled:
                    time.sleep(_service_of(job))
                    frames = protocol.result(job.id, image, [self.payload],
                                             worker_id=self.worker_id)
                else:
                    frames = protocol.failed(job.id, ErrorCode.CANCELLED, "cancelled")
                with self._lock:
                    self._held.discard(job.id)
                    self._cancelled.discard(job.id)
                self.link.send(frames)


def _broker_workers_main(endpoint: str, ids: list[str], heartbeat: float,
                         payload_size: int) -> None:
    """Simulated GPU workers for the broker: a BrokerLink and a job thread each."""
    from gpu_worker.link import BrokerLink

    payload = bytes(payload_size)
    context = zmq.Context.instance()  # one I/O thread for all the process's workers
    for worker_id in ids:
        worker = _SleepWorker(worker_id, payload)
        worker.link = BrokerLink(endpoint, {
            "worker_id": worker_id, "host": "bench", "device": "sleep", "models": [MODEL],
            "max_batch": 1, "capacity": 1, "version": "bench"}, handler=worker,
            heartbeat=heartbeat, context=context)
        worker.link.start()
        threading.Thread(target=worker.run, daemon=True).start()
    threading.Event().wait()  # until SIGTERM


def _rr_worker(ctx: zmq.Context, jobs: str, results: str, worker_id: str,
               payload: bytes) -> None:
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(jobs)
    push.connect(results)
    image = [ImageInfo(seed=1, width=512, height=512, format="png")]
    push.send_multipart(protocol.encode(MsgType.HEARTBEAT))  # hello: connected
    while True:
        job = protocol.decode(pull.recv_multipart(copy=False))["job"]
        time.sleep(_service_of(job))
        push.send_multipart(protocol.result(job.id, image, [payload], worker_id=worker_id),
                            copy=False)


def _rr_workers_main(jobs: str, results: str, ids: list[str], payload_size: int) -> None:
    """Round-robin workers: a PULL for jobs and a PUSH for results, on a thread each."""
    ctx: zmq.Context = zmq.Context()
    payload = bytes(payload_size)
    for worker_id in ids:
        threading.Thread(target=_rr_worker, args=(ctx, jobs, results, worker_id, payload),
                         daemon=True).start()
    threading.Event().wait()  # until SIGTERM


def _spread(prefix: str, count: int, procs: int) -> list[list[str]]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    return [group for group in (ids[i::procs] for i in range(procs)) if group]


# ------------------------------------------------------------------------------ schedulers


class Scheduler:
    """The client's side of one scheduler: submit a job, read what came back."""

    name = ""
    sock: zmq.Socket

    def submit(self, job_id: str, service: float) -> None:
        raise NotImplementedError

    def read(self) -> list[tuple[str, str]]:
        """Drain what arrived: (kind, job id) with kind "done", "extra" or a failure code."""
        out: list[tuple[str, str]] = []
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            header = msgpack.unpackb(frames[0].bytes)
            kind = header.get("t")
            if kind == "result":
                out.append(("done", header["job_id"]))
            elif kind == "failed":
                out.append((header["code"], header["job_id"]))
            elif kind == "accepted":
                out.append(("extra", header["job_id"]))

    def cancel(self, job_ids: list[str]) -> None:
        """Give up on jobs still running at the end of a run (where the scheduler can)."""

    def pids(self) -> dict[str, list[int | None]]:
        """The helper processes, by role, whose CPU time the report shows (None: this one)."""
        return {}

    def close(self) -> dict[str, Any]:
        return {}


class BrokerScheduler(Scheduler):
    name = "broker"

    def __init__(self, workers: int, args: argparse.Namespace) -> None:
        self.broker = BrokerProcess(profile=args.profile_broker,
                                    heartbeat_interval=args.heartbeat,
                                    max_queue=args.max_queue)
        self.procs = []
        for group in _spread("w", workers, min(workers, args.worker_procs)):
            proc = MP.Process(target=_broker_workers_main, daemon=True, name="bench-workers",
                              args=(self.broker.workers, group, args.heartbeat, args.payload))
            proc.start()
            self.procs.append(proc)
        self.template = _template()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(self.broker.clients)
        wait_for_workers(self.sock, workers, timeout=30)

    def submit(self, job_id: str, service: float) -> None:
        self.sock.send_multipart(_job_frames(self.template, job_id, service), copy=False)

    def pids(self) -> dict[str, list[int | None]]:
        return {"broker": [self.broker.proc.pid], "workers": [p.pid for p in self.procs]}

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.sock.send_multipart(protocol.encode(MsgType.CANCEL, {"job_id": job_id}))

    def close(self) -> dict[str, Any]:
        self.sock.close(linger=0)
        for proc in self.procs:
            stop_process(proc)
        return self.broker.stop()


class RoundRobinScheduler(Scheduler):
    name = "round-robin"

    def __init__(self, workers: int, args: argparse.Namespace) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        self.push, self.sock = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for sock in (self.push, self.sock):
            sock.setsockopt(zmq.LINGER, 0)
        jobs = f"tcp://127.0.0.1:{self.push.bind_to_random_port('tcp://127.0.0.1')}"
        results = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.procs = []
        for group in _spread("rr", workers, min(workers, args.worker_procs)):
            proc = MP.Process(target=_rr_workers_main, daemon=True, name="bench-rr",
                              args=(jobs, results, group, args.payload))
            proc.start()
            self.procs.append(proc)
        self.template = _template()
        self._await_connected(workers)

    def _await_connected(self, workers: int, timeout: float = 30.0) -> None:
        """Wait for every worker's hello, then until N pings reach N different workers.

        PUSH deals only among the PULL peers connected so far; a worker that connects late
        would miss its turns, so the run starts only once all of them take part.
        """
        deadline = time.monotonic() + timeout
        hellos = 0
        while hellos < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {hellos} of {workers} round-robin workers connected")
            if self.sock.poll(100):
                self.sock.recv_multipart()
                hellos += 1
        for attempt in range(100):
            for i in range(workers):
                self.submit(f"{PING_PREFIX}{attempt}-{i}", 0.0)
            answered: set[str] = set()
            for _ in range(workers):
                if not self.sock.poll(5000):
                    raise RuntimeError("round-robin workers stopped answering pings")
                answered.add(msgpack.unpackb(self.sock.recv_multipart()[0])["worker_id"])
            if len(answered) == workers:
                return
            time.sleep(0.1)
        raise RuntimeError("round-robin workers never all took part in the rotation")

    def pids(self) -> dict[str, list[int | None]]:
        return {"workers": [p.pid for p in self.procs]}

    def submit(self, job_id: str, service: float) -> None:
        self.push.send_multipart(_job_frames(self.template, job_id, service), copy=False)

    def close(self) -> dict[str, Any]:
        for proc in self.procs:
            stop_process(proc)
        self.push.close(linger=0)
        self.sock.close(linger=0)
        return {}


# ------------------------------------------------------------------------------ one run


@dataclass
class Outcome:
    plan: Plan
    scheduler: str
    window: tuple[float, float]  # measured span of arrivals and completions (s from start)
    done_at: list[float]  # completion offset per job; NaN: not answered, inf: failed
    failures: dict[str, int] = field(default_factory=dict)
    extra: int = 0  # ACCEPTED answers (first and position updates)
    lags: list[float] = field(default_factory=list)  # how late each submission went out
    censored_after: float = 0.0  # when the run stopped waiting (s from start)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> share of one core in the run

    @property
    def span(self) -> float:
        return self.window[1] - self.window[0]

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    @property
    def ideal(self) -> float:
        return self.plan.rate

    @property
    def offered(self) -> float:
        return sum(map(self.in_window, self.plan.arrivals)) / self.span

    @property
    def throughput(self) -> float:
        return sum(1 for t in self.done_at if not math.isnan(t) and self.in_window(t)) / self.span

    def latencies(self, *, short_only: bool = False) -> tuple[list[float], int]:
        """Latencies of jobs that arrived in the window, inf for those never answered."""
        out: list[float] = []
        short = self.plan.mix.short
        for arrival, done, service in zip(self.plan.arrivals, self.done_at, self.plan.services,
                                          strict=True):
            if self.in_window(arrival) and (service == short or not short_only):
                out.append(math.inf if math.isnan(done) else done - arrival)  # inf - x: inf
        return out, sum(math.isinf(x) for x in out)


def _cpu(pids: list[int | None]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def run_plan(sched: Scheduler, plan: Plan, tag: str, args: argparse.Namespace) -> Outcome:
    """Submit ``plan`` open-loop on its schedule; wait up to ``--drain`` s for the stragglers."""
    clock = time.perf_counter
    arrivals, services = plan.arrivals, plan.services
    n = len(arrivals)
    outcome = Outcome(plan, sched.name, (args.warmup, args.duration), [math.nan] * n)
    prefix = f"{tag}-"
    roles: dict[str, list[int | None]] = {**sched.pids(), "client": [None]}
    before = {role: _cpu(pids) for role, pids in roles.items()}
    t0 = clock() + 0.05
    stop_at = t0 + args.duration + args.drain
    sent = outstanding = 0
    while True:
        now = clock()
        while sent < n and t0 + arrivals[sent] <= now:
            sched.submit(f"{prefix}{sent}", services[sent])
            outcome.lags.append(now - t0 - arrivals[sent])
            sent += 1
            outstanding += 1
        if sent == n and (outstanding == 0 or now >= stop_at):
            break
        wake = t0 + arrivals[sent] if sent < n else stop_at
        if sched.sock.poll(max(0, math.ceil((wake - clock()) * 1000))):
            now = clock()
            for kind, job_id in sched.read():
                if not job_id.startswith(prefix):
                    continue  # a straggler from an earlier run
                index = int(job_id[len(prefix):])
                if kind == "extra":
                    outcome.extra += 1
                    continue
                if not math.isnan(outcome.done_at[index]):
                    continue
                outstanding -= 1
                if kind == "done":
                    outcome.done_at[index] = now - t0
                else:
                    outcome.failures[kind] = outcome.failures.get(kind, 0) + 1
                    outcome.done_at[index] = math.inf  # never completes
    outcome.censored_after = clock() - t0
    outcome.cpu = {role: (_cpu(pids) - before[role]) / outcome.censored_after
                   for role, pids in roles.items()}
    left = [f"{prefix}{i}" for i, t in enumerate(outcome.done_at) if math.isnan(t)]
    if left:
        sched.cancel(left)
    return outcome


# ------------------------------------------------------------------------------ report


def _ms(seconds: float, censored_after: float = 0.0) -> str:
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return f">{censored_after:.1f}s"
    return f"{seconds * 1000:.1f}" if seconds < 1 else f"{seconds * 1000:.0f}"


def notes(out: Outcome, args: argparse.Namespace) -> list[str]:
    found: list[str] = []
    ratio = out.throughput / out.ideal if out.ideal else 0.0
    lag99 = percentile(out.lags, 99)
    if out.failures:
        found.append("failed: " + ", ".join(f"{k} x{v}" for k, v in out.failures.items()))
    lat, censored = out.latencies()
    if censored:
        found.append(f"{censored} of the window's jobs failed or had no answer after "
                     f"{out.censored_after:.1f} s")
    if lag99 > args.lag_limit / 1000:
        found.append(f"client fell behind (submit lag p99 {lag99 * 1000:.1f} ms)")
    if ratio < 0.95 and out.offered >= 0.97 * out.ideal:
        found.append("done/s below offered/s: the backlog grew during the window "
                     "(saturated, or not yet steady)")
    if len(lat) < 100:
        found.append(f"only {len(lat)} jobs: noisy")
    return found


def row_cells(out: Outcome) -> list[str]:
    lat, _ = out.latencies()
    per_job = out.extra / max(1, len(out.plan.arrivals))
    return [str(out.plan.workers), out.plan.mix.name, out.scheduler, f"{out.ideal:,.1f}",
            f"{out.offered:,.1f}", f"{out.throughput:,.1f}",
            f"{out.throughput / out.ideal:.3f}",
            _ms(percentile(lat, 50), out.censored_after),
            _ms(percentile(lat, 95), out.censored_after),
            _ms(percentile(lat, 99), out.censored_after),
            _ms(percentile(out.latencies(short_only=True)[0], 95), out.censored_after),
            f"{len(lat):,}",
            f"{percentile(out.lags, 99) * 1000:.1f}",
            f"{per_job:.2f}" if out.scheduler == "broker" else "-",
            "/".join(f"{100 * out.cpu[r]:.0f}" if r in out.cpu else "-"
                     for r in ("broker", "workers", "client"))]


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    if math.isinf(a):
        return ">" if not math.isinf(b) else "-"
    return f"{a / b:.2f}"


def report(outcomes: list[Outcome], args: argparse.Namespace,
           broker_cpu: dict[int, tuple[float, float]]) -> None:
    print("\ndefinitions:")
    print("  ideal/s   = utilisation x N / mean service time: the offered rate of the plan, "
          f"i.e. {args.utilisation:g} of what N workers can do at best")
    print(f"  offered/s = jobs whose scheduled arrival fell in the measured window "
          f"[{args.warmup:g} s, {args.duration:g} s), per second (arrivals: a Poisson process "
          "given its count, ideal/s x duration)")
    print("  done/s    = results that came back inside that window, per second; "
          "done/ideal = done/s / ideal/s")
    print("  p50/p95/p99 = latency from scheduled arrival to result at the client, over jobs "
          "that arrived in the window (\">Ns\": not answered when the run stopped waiting)")
    print("  short p95 = p95 of the short jobs alone (in the mixed mix the overall p95 falls "
          "among the long jobs, whose own service time sets it)")
    print("  lag p99   = how late the client sent a job after its scheduled time (ms)")
    print("  acc/job   = ACCEPTED messages the broker sent per job (1 + position updates)")
    print("  CPU% b/w/c = CPU of the broker process / all worker processes / this client "
          "during the run, in % of one core (threads included; the machine has "
          f"{os.cpu_count()} cores)")
    print()
    headers = ["N", "mix", "scheduler", "ideal/s", "offered/s", "done/s", "done/ideal",
               "p50 ms", "p95 ms", "p99 ms", "short p95", "jobs", "lag p99", "acc/job",
               "CPU% b/w/c"]
    print(table(headers, [row_cells(o) for o in outcomes]))
    for o in outcomes:
        found = notes(o, args)
        if found:
            print(f"  N={o.plan.workers} {o.plan.mix.name} {o.scheduler}: {'; '.join(found)}")
    for n, (cpu, wall) in sorted(broker_cpu.items()):
        print(f"  broker process at N={n}: {cpu:.1f} s CPU in {wall:.1f} s "
              f"({100 * cpu / wall:.0f}% of one core, setup included)")
    compare(outcomes)


def simulate(out: Outcome) -> Outcome:
    """The same plan through a zero-overhead model of the run's policy.

    broker: one FIFO, each job to the first worker free (what a perfect broker does);
    round-robin: job i to worker i mod N, FIFO on each worker.
    """
    plan = out.plan
    done: list[float] = []
    if out.scheduler == "broker":
        free = [0.0] * plan.workers  # a heap of the times workers become free
        for arrival, service in zip(plan.arrivals, plan.services, strict=True):
            start = max(heapq.heappop(free), arrival)
            heapq.heappush(free, start + service)
            done.append(start + service)
    else:
        busy_until = [0.0] * plan.workers
        for i, (arrival, service) in enumerate(zip(plan.arrivals, plan.services, strict=True)):
            start = max(busy_until[i % plan.workers], arrival)
            busy_until[i % plan.workers] = start + service
            done.append(start + service)
    return Outcome(plan, f"{out.scheduler} (sim)", out.window, done)


def against_model(outcomes: list[Outcome]) -> None:
    rows = []
    for out in outcomes:
        sim = simulate(out)
        lat, sim_lat = out.latencies()[0], sim.latencies()[0]
        m50, s50 = percentile(lat, 50), percentile(sim_lat, 50)
        m95, s95 = percentile(lat, 95), percentile(sim_lat, 95)
        rows.append([str(out.plan.workers), out.plan.mix.name, out.scheduler,
                     _ms(m50, out.censored_after), _ms(s50), _ms(m50 - s50),
                     _ms(m95, out.censored_after), _ms(s95), _ms(m95 - s95)])
    print("\nmeasured against a zero-overhead simulation of the same arrivals and policy "
          "(FIFO to the first free worker for the broker, i mod N for round-robin):")
    print(table(["N", "mix", "scheduler", "p50 ms", "sim p50", "added", "p95 ms", "sim p95",
                 "added"], rows))


def compare(outcomes: list[Outcome]) -> None:
    against_model(outcomes)
    by_key = {(o.plan.workers, o.plan.mix.name, o.scheduler): o for o in outcomes}
    rows = []
    for (n, mix, sched), broker in by_key.items():
        rr = by_key.get((n, mix, "round-robin"))
        if sched != "broker" or rr is None:
            continue
        b_lat, rr_lat = broker.latencies()[0], rr.latencies()[0]
        b_short, rr_short = (broker.latencies(short_only=True)[0],
                             rr.latencies(short_only=True)[0])
        rows.append([str(n), mix, f"{broker.throughput / broker.ideal:.3f}",
                     f"{rr.throughput / rr.ideal:.3f}",
                     _ratio(percentile(rr_lat, 50), percentile(b_lat, 50)),
                     _ratio(percentile(rr_lat, 95), percentile(b_lat, 95)),
                     _ratio(percentile(rr_short, 95), percentile(b_short, 95))])
    if not rows:
        return
    print("\nbroker against round-robin (ratios > 1: the broker is faster):")
    print(table(["N", "mix", "broker done/ideal", "rr done/ideal", "p50 rr/broker",
                 "p95 rr/broker", "short p95 rr/broker"], rows))
    targets(by_key)


def targets(by_key: dict[tuple[int, str, str], Outcome]) -> None:
    top = max(n for n, _, _ in by_key)
    print(f"\ntargets (at the largest N = {top}):")
    for (n, mix, sched), out in sorted(by_key.items()):
        if n != top or sched != "broker":
            continue
        ratio = out.throughput / out.ideal
        print(f"  broker done/ideal, {mix}: {ratio:.3f}   target >= 0.95: "
              f"{'met' if ratio >= 0.95 else 'NOT met'}")
        rr = by_key.get((n, mix, "round-robin"))
        if rr is None or mix == "fixed":
            continue
        for label, short in (("p95", False), ("short-job p95", True)):
            b95 = percentile(out.latencies(short_only=short)[0], 95)
            rr95 = percentile(rr.latencies(short_only=short)[0], 95)
            far = rr95 >= 2 * b95
            print(f"  {label}, {mix}: broker {_ms(b95, out.censored_after)} ms, round-robin "
                  f"{_ms(rr95, rr.censored_after)} ms, round-robin/broker {_ratio(rr95, b95)}"
                  f"   target \"far below\" (taken as: at most half): "
                  f"{'met' if far else 'NOT met'}")


# ------------------------------------------------------------------------------ main


# ------------------------------------------------------------------------------ fair sharing


def _dispatch_cost(identities: int, jobs: int, max_batch: int,
                   classes: int = 1) -> tuple[float, int, float]:
    """Microseconds per job to dispatch ``jobs`` queued jobs spread over ``identities`` (in
    the first ``classes`` of PRIORITIES, identity by identity), the batches it took, and
    microseconds per job to queue them (``add`` tells each its fair place): JobTable alone,
    as the broker thread drives it."""
    table = JobTable(max_queue=jobs, max_attempts=3)
    spec = JobSpec(id="x", model=MODEL, prompt="p", width=512, height=512, steps=20,
                   seeds=(1,))
    queued = time.perf_counter()
    for i in range(jobs):  # round-robin arrivals: every identity has jobs queued throughout
        tenant = f"user-{i % identities}"
        priority = protocol.PRIORITIES[i % identities % classes]
        table.add(Job(spec=dataclasses.replace(spec, id=f"j{i}", tenant=tenant,
                                               priority=priority),
                      client=b"c", deadline=1e9))
    add_cost = (time.perf_counter() - queued) / jobs * 1e6
    batches = 0
    started = time.perf_counter()
    while table.queue_depth(MODEL):
        table.head(MODEL, 1)  # _next_worker looks at the next job's adapters first
        table.take_batch(MODEL, b"w", max_batch)
        batches += 1
    return (time.perf_counter() - started) / jobs * 1e6, batches, add_cost


def dispatch_report(args: argparse.Namespace) -> None:
    """Print the dispatch cost with many identities queued against one identity."""
    print(f"\nbroker dispatch cost under fair sharing ({args.fair_jobs:,} queued jobs, "
          f"in-process JobTable, best of 3):")
    rows = []
    for max_batch in (1, 4):
        base = 0.0
        cases = [(identities, 1) for identities in sorted({1, 10, args.users})]
        for identities, classes in [*cases, (max(args.users, 2), 2)]:
            cost, batches, add_cost = min(
                _dispatch_cost(identities, args.fair_jobs, max_batch, classes)
                for _ in range(3))
            base = base or cost
            rows.append([identities, classes, max_batch, batches, f"{cost:.1f}",
                         f"{cost / base:.2f}", f"{add_cost:.1f}"])
    print(table(["identities", "classes", "max_batch", "batches", "dispatch us/job",
                 "vs 1 identity", "queue us/job"], rows))
    print("  dispatch us/job = JobTable.head(model, 1) + take_batch per batch, over the jobs "
          "it took; the ratio is the price of sharing among that many identities")
    print("  queue us/job = JobTable.add, which finds the job's place in fair order among "
          "the first 32 (the broker tells it on ACCEPTED)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Scheduling efficiency: throughput and latency of the broker against "
                    "round-robin PUSH/PULL, with simulated workers under open-loop Poisson load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workers", default="1,4,16,64",
                        help="comma-separated worker counts N to sweep")
    parser.add_argument("--mix", default="fixed,mixed",
                        help="comma-separated job-size mixes: fixed, mixed")
    parser.add_argument("--schedulers", default="broker,round-robin",
                        help="comma-separated: broker, round-robin")
    parser.add_argument("--service", type=float, default=0.05,
                        help="service time of a short job (s), before --scale")
    parser.add_argument("--long", type=float, default=1.0,
                        help="service time of a long job in the mixed mix (s), before --scale")
    parser.add_argument("--long-frac", type=float, default=0.1,
                        help="fraction of long jobs in the mixed mix")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every service time (below 1: more jobs/s, runs "
                             "settle faster; above 1: fewer messages per second)")
    parser.add_argument("-u", "--utilisation", type=float, default=0.8,
                        help="offered load as a fraction of N / mean service time")
    parser.add_argument("--duration", type=float, default=4.0,
                        help="seconds of arrivals per run")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds at the start of each run left out of the figures")
    parser.add_argument("--drain", type=float, default=3.0,
                        help="seconds to wait after the last arrival for outstanding results")
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrival sequences")
    parser.add_argument("--worker-procs", type=int, default=4,
                        help="processes the simulated workers are spread over")
    parser.add_argument("--payload", type=int, default=1024,
                        help="bytes in each result's payload frame")
    parser.add_argument("--heartbeat", type=float, default=1.0,
                        help="broker and worker heartbeat interval (s)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="the broker's queue limit per model (its default: 256)")
    parser.add_argument("--lag-limit", type=float, default=5.0,
                        help="flag runs whose submit lag p99 exceeds this many ms")
    parser.add_argument("--users", type=int, default=1000,
                        help="identities with jobs queued in the dispatch-cost case")
    parser.add_argument("--fair-jobs", type=int, default=20_000,
                        help="queued jobs in the dispatch-cost case")
    parser.add_argument("--dispatch-only", action="store_true",
                        help="only measure the dispatch cost under fair sharing (seconds)")
    parser.add_argument("--profile-broker", metavar="FILE",
                        help="run the broker under cProfile (the last N's stats end up in "
                             "FILE) and print its top functions; figures not comparable")
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(x) for x in args.workers.split(",") if x]
    except ValueError:
        parser.error("--workers takes comma-separated integers")
    mixes = {
        "fixed": Mix("fixed", args.service * args.scale),
        "mixed": Mix("mixed", args.service * args.scale, args.long * args.scale, args.long_frac),
    }
    try:
        args.mixes = [mixes[m] for m in args.mix.split(",") if m]
    except KeyError as exc:
        parser.error(f"unknown mix {exc}; choose from {', '.join(mixes)}")
    args.scheduler_names = [s for s in args.schedulers.split(",") if s]
    if not set(args.scheduler_names) <= {"broker", "round-robin"}:
        parser.error("--schedulers takes broker and/or round-robin")
    if args.users < 1 or args.fair_jobs < args.users:
        parser.error("--users must be at least 1 and at most --fair-jobs")
    if min(args.worker_counts, default=0) < 1 or args.utilisation <= 0:
        parser.error("worker counts and --utilisation must be positive")
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be shorter than --duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_header("scheduling efficiency")
    if args.dispatch_only:
        dispatch_report(args)
        return 0
    print(f"settings: N in {args.worker_counts}; utilisation {args.utilisation:g}; "
          f"{args.duration:g} s of arrivals per run, the first {args.warmup:g} s left out; "
          f"up to {args.drain:g} s drain; seed {args.seed}")
    for mix in args.mixes:
        print(f"  mix {mix.describe()}")
    peak = args.utilisation * max(args.worker_counts) / min(m.mean for m in args.mixes)
    print(f"  busiest run offers {peak:,.0f} jobs/s (each job: SUBMIT, ACCEPTED, JOBS, "
          "RESULT twice through the broker)")
    print("note: the client, the broker and all simulated workers share this machine's "
          "cores; a sleeping worker costs no CPU, but every message does.\n", flush=True)
    outcomes: list[Outcome] = []
    broker_cpu: dict[int, tuple[float, float]] = {}
    for n in args.worker_counts:
        for name in args.scheduler_names:
            started = time.monotonic()
            sched: Scheduler = (BrokerScheduler(n, args) if name == "broker"
                                else RoundRobinScheduler(n, args))
            try:
                for mix in args.mixes:
                    plan = make_plan(n, mix, args)
                    print(f"  N={n} {mix.name} {name}: {len(plan.arrivals)} jobs at "
                          f"{plan.rate:,.1f}/s ...", flush=True)
                    outcomes.append(run_plan(sched, plan, f"{n}{mix.name}{name[0]}", args))
            finally:
                stats = sched.close()
            if stats:
                broker_cpu[n] = (stats.get("cpu_s", 0.0), time.monotonic() - started)
    report(outcomes, args, broker_cpu)
    dispatch_report(args)
    if args.profile_broker and "broker" in args.scheduler_names:
        print_profile(args.profile_broker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
