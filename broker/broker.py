"""The broker loop: route jobs from frontends to workers that have room, and answers back.

One thread owns both ROUTER sockets, the job table, the worker registry and the leases
between them (broker/leases.py: the only code that changes who holds a job). ``run()`` calls
``tick()`` until stopped; each tick polls the sockets once and routes what arrived, then
purges what expired, sends heartbeats and dispatches, so tests can drive it step by step.
CURVE on both sockets (broker/auth.py) only adds sockets to the poll. Its status
reply carries each worker's last stats and the jobs it counted (broker/counters.py), which
every frontend exports as metrics.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from broker import defaults, logs, protocol
from broker.auth import CurveServer, is_loopback
from broker.counters import JobCounters
from broker.jobs import Job, JobState, JobTable
from broker.leases import Leases
from broker.protocol import ErrorCode, Message, MsgType, ProtocolError
from broker.quotas import Quotas
from broker.registry import WorkerRecord, WorkerRegistry, WorkerState

log = logging.getLogger(__name__)

POSITION_UPDATES = 32  # queued jobs per model told their new position
POSITION_INTERVAL = 0.5  # seconds between position announcements
LORA_LOOKAHEAD = 8  # free workers looked at for one with a job's adapters loaded
MAX_FAILURE_MESSAGE = 1000  # characters of a worker's failure message passed to the client
MAX_STEPS = 10_000
MAX_WATCHERS = 16  # other frontends' connections a job's progress is relayed to
# Plain ints, not zmq's IntFlag members: combining enum flags runs Python code on every frame.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE | zmq.NOBLOCK)


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    clients: str = defaults.CLIENTS_ENDPOINT
    workers: str = defaults.WORKERS_ENDPOINT
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS  # missed heartbeats: a peer is dead
    max_queue: int = defaults.MAX_QUEUE  # queued jobs per model
    max_attempts: int = 3  # workers lost running one job before it fails
    # Per frame from a frontend: an edit's input images travel as frames of their own.
    max_client_frame: int = defaults.MAX_CLIENT_FRAME
    # The edit frames all held jobs carry, together: past it, edits are refused (queue_full)
    # rather than let a burst of large uploads take the broker's memory.
    max_input_bytes: int = defaults.MAX_INPUT_BYTES
    max_worker_frame: int = 256 << 20  # a 4K PNG is tens of MB
    curve_dir: str | None = None  # CURVE keys (launch.py keys): both endpoints, each its own keys
    insecure: bool = False  # allow plain-TCP endpoints beyond loopback


class Broker:
    def __init__(self, config: BrokerConfig,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context.instance()
        # Each identity's limits (broker/quotas.py): an identity running as many jobs as it
        # may is passed over by dispatch until one of them ends.
        self.quotas = Quotas()
        self.jobs = JobTable(max_queue=config.max_queue, max_attempts=config.max_attempts,
                             usage=self.quotas)
        self.workers = WorkerRegistry(
            liveness=config.heartbeat_interval * config.heartbeat_liveness)
        self.counters = JobCounters(started=time.time())
        self.leases = Leases(self.jobs, self.workers, counters=self.counters)
        self._stop = threading.Event()
        # After a restart, workers need a heartbeat or two to register again; until then a
        # job for a model nobody has announced yet waits in its queue instead of failing.
        self._startup_grace_until = clock() + 2 * self.workers.liveness
        self._grace_over = False
        # Named in every message we make, so peers notice a restart of any length at once.
        self.incarnation = secrets.token_hex(8)
        self._asked: dict[bytes, float] = {}  # unknown peer -> when we last sent RECONNECT
        self._next_heartbeat = 0.0
        self._queue_moved: set[str] = set()  # models whose queue moved since the last announce
        self._next_announce = 0.0
        self._next_liveness_check = 0.0
        self._drop = protocol.DropLog(log)
        self._refused_peer = protocol.DropLog(log, "refused")
        self._bad_stats = protocol.DropLog(log, "dropped the stats of worker")
        self._status_cut = protocol.DropLog(log, "shortened the")
        self.client_socket = self._router(config.max_client_frame)
        self.worker_socket = self._router(config.max_worker_frame)
        self._poller = zmq.Poller()
        self._poller.register(self.client_socket, zmq.POLLIN)
        self._poller.register(self.worker_socket, zmq.POLLIN)
        self.curve: CurveServer | None = None
        if config.curve_dir:
            # Both endpoints: a frontend on another host must not be the way around the
            # workers' keys (an open client endpoint lets anyone submit and cancel jobs).
            self.curve = CurveServer(self._ctx, Path(config.curve_dir), self.worker_socket,
                                     frontends=self.client_socket)
            for sock in self.curve.sockets:
                self._poller.register(sock, zmq.POLLIN)

    def _router(self, max_frame: int) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        return sock

    def bind(self) -> None:
        """Bind both endpoints; refuse a plain one beyond loopback unless told."""
        self._check_exposure("worker", self.config.workers, "take jobs and send results")
        self._check_exposure("client", self.config.clients,
                             "submit jobs, and cancel any job whose id it learns")
        self.client_socket.bind(self.config.clients)
        self.worker_socket.bind(self.config.workers)
        log.info("broker: clients on %s, workers on %s%s", self.client_endpoint,
                 self.worker_endpoint, " (CURVE)" if self.curve else "")

    def _check_exposure(self, what: str, endpoint: str, harm: str) -> None:
        """Refuse a plain-TCP endpoint other hosts can reach, unless --insecure (warned).

        Loopback and ipc:// stay plain without keys: only this host's processes reach them
        (a single node, the tests)."""
        if is_loopback(endpoint) or self.curve is not None:
            return
        if not self.config.insecure:
            raise ValueError(f"the {what} endpoint {endpoint} is reachable from other hosts: "
                             "secure it with --curve DIR (see `launch.py keys`), or pass "
                             "--insecure on a network you trust")
        log.warning("the %s endpoint %s takes plain TCP from any host (--insecure): anyone "
                    "who reaches it can %s", what, endpoint, harm)

    @property
    def client_endpoint(self) -> str:
        return self.client_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def worker_endpoint(self) -> str:
        return self.worker_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def self_test(self, timeout: float = 3.0) -> None:
        """With CURVE on, prove that an allowed key gets in and an unknown one does not.

        Raises RuntimeError naming what failed (see ``CurveServer.self_test``).
        """
        if self.curve is not None:
            self.curve.self_test(self._poll, timeout=timeout)

    def request_reload(self) -> None:
        """Re-read the allow-lists at the next tick; safe from a signal handler."""
        if self.curve is not None:
            self.curve.request_reload()

    def stop(self) -> None:
        """Ask the loop to end; safe from any thread or signal handler."""
        self._stop.set()

    def close(self) -> None:
        if self.curve is not None:
            self.curve.close()
        self.client_socket.close(linger=0)
        self.worker_socket.close(linger=0)

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                self.tick(timeout=self.config.heartbeat_interval / 4)
        finally:
            self.close()

    def tick(self, *, timeout: float = 0.0) -> None:
        """One round: read what arrived, purge what expired, heartbeat, dispatch."""
        self._poll(timeout)
        now = self._clock()
        if self.curve is not None:
            self.curve.check_keys(now)
        self._end_startup_grace(now)
        self._purge_expired(now)
        self._send_heartbeats(now)
        self._dispatch(now)

    # ---------------------------------------------------------------------------- receiving

    def _poll(self, timeout: float) -> None:
        events = dict(self._poller.poll(int(timeout * 1000)))
        if self.curve is not None:
            self.curve.handle(events)
        # Drain in bounded bursts so neither side can starve the other.
        for _ in range(1000):
            got = False
            if self.worker_socket in events and self._recv(self.worker_socket,
                                                           self._on_worker_message):
                got = True
            if self.client_socket in events and self._recv(self.client_socket,
                                                           self._on_client_message):
                got = True
            if not got:
                return

    def _recv(self, sock: zmq.Socket[bytes],
              handler: Callable[[bytes, Message, float], None]) -> bool:
        try:
            frames = _recv_frames(sock)
        except zmq.Again:
            return False
        identity = frames[0].bytes
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError as exc:
            self._drop(identity.hex(), str(exc))
            return True
        try:
            handler(identity, msg, self._clock())
        except Exception:  # a bug handling one message must not take the broker down
            log.exception("error handling %s from %s", msg.type.value, identity.hex())
        return True

    # ---------------------------------------------------------------------------- frontends

    def _on_client_message(self, client: bytes, msg: Message, now: float) -> None:
        # Frontends that send no owner (old ones) share one, as before owners existed.
        owner = msg.get("owner") or ""
        if msg.type is MsgType.SUBMIT:
            self._on_submit(client, owner, msg["job"], now, msg.payloads)
        elif msg.type is MsgType.CANCEL:
            self._on_cancel(owner, msg["job_id"], now)
        elif msg.type is MsgType.STATUS:
            self._send(self.client_socket, client,
                       self._status_reply(now))
        elif msg.type is MsgType.WATCH:
            self._on_watch(client, msg["job_id"])
        else:
            self._drop(client.hex(), f"{msg.type.value} is not a client message")

    def _on_submit(self, client: bytes, owner: str, spec: protocol.JobSpec, now: float,
                   inputs: Sequence[Any] = ()) -> None:
        existing = self.jobs.get(spec.id)
        if existing is not None:
            self._reattach(client, owner, existing)
            return
        # An edit's input frames are kept as received (never decoded here) until a worker
        # has answered the job: a lost worker's jobs go out again with them.
        job = Job(spec=spec, client=client, owner=owner, deadline=now + spec.timeout,
                  inputs=tuple(inputs))
        if self.leases.take_claimed(job):
            # A worker re-registered holding this job (we restarted): it stays there.
            self.quotas.count_claimed(job, now)
            self._tell_position(client, spec.id, 0)
            return
        if not self.workers.serves(spec.model) and now >= self._startup_grace_until:
            self._refuse(client, spec, ErrorCode.NO_WORKER,
                         f"no worker serves model {spec.model!r} right now")
            return
        if spec.loras and not self.workers.can_run(spec) and now >= self._startup_grace_until:
            names = ", ".join(name for name, _ in spec.loras)
            self._refuse(client, spec, ErrorCode.NO_WORKER,
                         f"no worker of {spec.model!r} has all of these LoRA adapters: {names}")
            return
        if self.jobs.is_full(spec.model):
            self._refuse(client, spec, ErrorCode.QUEUE_FULL,
                         f"the queue for {spec.model!r} is full")
            return
        if job.input_bytes > self.config.max_input_bytes:  # never, however long it waited
            self._fail(client, spec, ErrorCode.INVALID_REQUEST,
                       "the edit's images are more than the broker holds for all its jobs "
                       "together (--max-input-mb)")
            return
        if inputs and self.jobs.input_bytes + job.input_bytes > self.config.max_input_bytes:
            self._refuse(client, spec, ErrorCode.QUEUE_FULL,
                         "the broker holds as many edit images as it may; try again shortly")
            return
        if self._over_quota(client, spec, now):
            return
        # Behind every job still queued, and every one a worker holds but has not started.
        held = self.leases.waiting(spec.model)
        work_ahead = (self._running_work(spec.model) + sum(j.spec.work for j in held)
                      + self.jobs.queued_work(spec.model))
        position = len(held) + self.jobs.add(job)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s queued at position %d", spec.id, position,
                      extra=logs.job_fields(spec))
        if self._tell_position(client, spec.id, position, work_ahead):
            job.told = position

    def _over_quota(self, client: bytes, spec: protocol.JobSpec, now: float) -> bool:
        """Refuse a new job over one of its identity's limits (broker/quotas.py); whether it
        was. Right after a start, while frontends send their waiting jobs again, nothing is
        refused: those are jobs admitted before the restart, which counted then."""
        enforce = now >= self._startup_grace_until
        refusal = self.quotas.admit(spec, now, enforce=enforce)
        if refusal is None:
            return False
        self._refuse(client, spec, ErrorCode.QUOTA_EXCEEDED, refusal.message,
                     retry_after=refusal.retry_after)
        return True

    def _reattach(self, client: bytes, owner: str, job: Job) -> None:
        """A resubmission: its owner's answers go to the connection it came from."""
        if job.owner != owner:
            self._refused_peer(client.hex(), f"job {job.id} belongs to another frontend")
            # Not the job's failure: it runs on for its owner, so neither counted nor logged.
            self._send(self.client_socket, client, protocol.failed(
                job.id, ErrorCode.INVALID_REQUEST, "that job id is in use by another frontend",
                incarnation=self.incarnation))
            return
        job.client = client
        position, work_ahead = self._place_of(job)
        if self._tell_position(client, job.id, position, work_ahead):
            job.told = position

    def _place_of(self, job: Job) -> tuple[int, float | None]:
        """(position, work ahead) of a job, for a frontend that asks anew."""
        places = list(self._places(job.model))
        # Not in the line: running (0), or queued deeper than the line is told (its end).
        return next(((place, ahead) for place, waiting, ahead in places if waiting is job),
                    (len(places) if job.state is JobState.QUEUED else 0, None))

    def _on_watch(self, client: bytes, job_id: str) -> None:
        """Another frontend follows a job (the jobs API on a shared database): relay its
        place in line and its progress there too. Any admitted frontend may, as any may
        cancel it; a job not here is ignored (the watcher follows its record)."""
        job = self.jobs.get(job_id)
        if job is None or client == job.client:
            return
        if client not in job.watchers:
            if len(job.watchers) >= MAX_WATCHERS:
                job.watchers.pop(0)  # the oldest: likely a connection gone since
            job.watchers.append(client)
        if not job.started:
            position, work_ahead = self._place_of(job)
            self._tell_position(client, job.id, position, work_ahead)

    def _relay(self, job: Job, frames: list[Any]) -> None:
        """Send a message about ``job`` to its watchers; one that is gone is forgotten."""
        for watcher in list(job.watchers):
            if not self._send(self.client_socket, watcher, frames):
                job.watchers.remove(watcher)

    def _on_cancel(self, owner: str, job_id: str, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.owner != owner:
            self._refused_peer(owner, f"a cancel of job {job_id} that it does not own")
            return
        self.jobs.finish(job_id)
        self._queue_moved.add(job.model)
        self._stop_running(job, now)
        self._fail(job.client, job.spec, ErrorCode.CANCELLED, "the job was cancelled")
        log.info("job %s cancelled by its client", job_id, extra=logs.job_fields(job.spec))

    def _stop_running(self, job: Job, now: float) -> None:
        """Tell the worker holding a job the broker dropped to stop it (its slot stays taken
        until it answers: ``Leases.stop``)."""
        self._cancel(self.leases.stop(job, now), job.id)

    def _cancel(self, worker: bytes | None, job_id: str) -> None:
        if worker is not None:
            self._send(self.worker_socket, worker, self._msg(MsgType.CANCEL, {"job_id": job_id}))

    # ---------------------------------------------------------------------------- workers

    def _on_worker_message(self, identity: bytes, msg: Message, now: float) -> None:
        if msg.type is MsgType.READY:
            self._on_ready(identity, msg, now)
            return
        worker = self.workers.touch(identity, now)
        if worker is None:
            # We do not know this worker (we restarted, or declared it dead): ask it to
            # register again. Whatever it sent is dropped; its jobs were already requeued.
            self._ask_to_register(identity, now)
        elif msg.type in (MsgType.PROGRESS, MsgType.RESULT, MsgType.FAILED):
            self._on_job_message(worker, msg, now)
        elif msg.type is MsgType.HEARTBEAT:
            self._on_heartbeat(worker, msg, now)
        elif msg.type is MsgType.BYE:
            self._on_bye(worker)
        else:
            self._drop(identity.hex(), f"{msg.type.value} is not a worker message")

    def _ask_to_register(self, identity: bytes, now: float) -> None:
        """RECONNECT, once per heartbeat interval per peer: after a restart every stale
        message would otherwise earn one, and every RECONNECT a READY."""
        if now - self._asked.get(identity, float("-inf")) < self.config.heartbeat_interval:
            return
        self._asked[identity] = now
        self._send(self.worker_socket, identity, self._msg(MsgType.RECONNECT))

    def _on_ready(self, identity: bytes, msg: Message, now: float) -> None:
        """Register a worker, or register it again: idempotent, never requeues or repeats.

        The same worker on a new connection (it reconnected) keeps the jobs it still holds;
        the ones it no longer lists go back to their queues. Jobs it lists that we do not
        lease to it (we restarted) become its leases when they are queued or submitted.
        """
        held = list(dict.fromkeys(msg.get("held", [])))
        known = self.workers.get(identity)
        moved = None if known else self._same_process(msg, now)
        previous = known or moved
        worker = self.workers.register(identity, msg, now, keep=previous)
        if "loras" in msg.fields:
            self._read_loras(worker, msg["loras"])
        self.counters.announce(worker.models)
        if known is not None:
            self.leases.keep(known, worker)
        elif moved is not None:
            self.leases.move(moved, worker, set(held))
        for job_id in held[:worker.capacity]:
            self._cancel(self.leases.claim(worker, job_id, now), job_id)
        self._asked.pop(identity, None)
        self._check_heartbeat(worker, msg.get("heartbeat"))
        if worker.capacity < msg.get("capacity", 1):
            log.warning("worker %s asked for room for %d jobs; it gets %d (2 x max_batch)",
                        worker.worker_id, msg["capacity"], worker.capacity)
        log.info("worker %s %s: host=%s device=%s models=%s capacity=%d max_batch=%d held=%d",
                 worker.worker_id, "registered again" if previous else "ready", worker.host,
                 worker.device, ",".join(worker.models), worker.capacity, worker.max_batch,
                 len(held))

    def _check_heartbeat(self, worker: WorkerRecord, interval: float | None) -> None:
        """Warn about a worker that heartbeats at another interval than ours (workers from
        before READY named it say nothing): each side declares the other dead by its own
        interval, so a slower worker is declared dead while it is well."""
        ours = self.config.heartbeat_interval
        if interval is not None and not math.isclose(interval, ours):
            log.warning("worker %s heartbeats every %g s, this broker every %g s: give every "
                        "program the same --heartbeat", worker.worker_id, interval, ours)

    def _same_process(self, ready: Message, now: float) -> WorkerRecord | None:
        """The record of the worker process that sent ``ready``, from an earlier connection.

        Its ``session`` (random per process) tells a reconnected socket from a restarted
        process that kept its worker_id (PID 1 in a container, an explicit --worker-id):
        the jobs of a process that died were lost with it, and count as attempts.
        """
        earlier = self.workers.find(ready["worker_id"])
        session = ready.get("session")
        if earlier is None or not session or not earlier.session:
            return None  # a worker without sessions (an old one): its old record expires
        if earlier.session == session:
            return earlier
        log.warning("worker %s restarted; the jobs it held are lost", earlier.worker_id)
        self._drop_worker(earlier, lost=True)
        return None

    def _on_heartbeat(self, worker: WorkerRecord, msg: Message, now: float) -> None:
        # Every heartbeat replaces the stats: a worker whose measuring failed sends none,
        # and the old ones must not be exported as if current.
        worker.stats = None
        if "stats" in msg.fields:
            try:
                worker.stats = protocol.WorkerStats.from_wire(msg["stats"])
            except ProtocolError as exc:  # the stats only: the heartbeat still counts
                self._bad_stats(worker.worker_id, str(exc))
        if "loras" in msg.fields:
            self._read_loras(worker, msg["loras"])
        if "running" in msg.fields:
            # A heartbeat sent before the CANCEL may still list the stopped job.
            self.leases.settle(worker, msg["running"], now,
                               after=2 * self.config.heartbeat_interval)

    def _read_loras(self, worker: WorkerRecord, data: Any) -> None:
        """The adapters a worker announced replace its last ones; a map that cannot be read
        costs only them (as bad stats do), and its jobs with adapters go elsewhere."""
        try:
            worker.loras = protocol.loras_from_wire(data)
        except ProtocolError as exc:
            worker.loras = {}
            self._bad_stats(worker.worker_id, str(exc))
        # What it can run may have grown: jobs waiting for an adapter may go now.
        self.workers.offer(worker)

    def _on_job_message(self, worker: WorkerRecord, msg: Message, now: float) -> None:
        job_id = msg["job_id"]
        job = self.leases.held(worker, job_id)
        if msg.type is MsgType.PROGRESS:
            if job is not None and self._progress_fits(job, msg):
                job.started = True  # out of the line: never told a place again, unless requeued
                if msg["steps"]:  # how much of its work is left, for the jobs behind it
                    share = msg["step"] / msg["steps"]
                    # A preview is encoded apart and may come after later steps: not back.
                    job.done_share = max(job.done_share, share) if msg.payloads else share
                self._forward(job.client, msg)
                if job.watchers:
                    self._relay(job, msg.frames())
            return
        self.leases.release(worker, job_id)  # a RESULT or FAILED: the worker is done with it
        # Its next batch starts: the jobs waiting behind this one move up.
        self._queue_moved.update(worker.models)
        if job is None:
            return  # dropped, so each job gets exactly one answer
        problem = _mismatch(job.spec, msg) if msg.type is MsgType.RESULT else None
        if msg.type is MsgType.RESULT and problem is None:
            self.jobs.finish(job_id)
            worker.jobs_done += 1
            self.workers.succeeded(worker)
            self._forward(job.client, msg)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("job %s done by worker %s", job_id, worker.worker_id,
                          extra=logs.job_fields(job.spec, worker_id=worker.worker_id))
            return
        if problem is not None:
            log.warning("worker %s answered job %s wrongly: %s", worker.worker_id, job_id,
                        problem, extra=logs.job_fields(job.spec, worker_id=worker.worker_id))
            message = f"the worker's answer did not match the job: {problem}"
        else:
            message = str(msg["message"])[:MAX_FAILURE_MESSAGE]
        self._job_failed(worker, job, message, now)

    def _job_failed(self, worker: WorkerRecord, job: Job, message: str, now: float) -> None:
        """A worker failed a job. Run it once more on another worker: a sick worker (a broken
        driver, a full disk) then costs no request, and is quarantined. A job that fails on
        two workers is the job's own fault: it fails, and counts against neither."""
        first = None if job.failed_on is None else self.workers.get(job.failed_on)
        if job.failed_on is not None and job.failed_on != worker.identity:
            if first is not None:
                self.workers.absolve(first)
        else:
            others = self.workers.others_serve(job.model, worker)
            was_quarantined = worker.state is WorkerState.QUARANTINED
            if self.workers.failed(worker, now, others_serve=others) and not was_quarantined:
                log.warning("worker %s failed %d job(s) in a row; no work for it for %.0f s",
                            worker.worker_id, worker.failures,
                            worker.quarantined_until - now)
            if others and job.failed_on is None:
                job.failed_on = worker.identity
                self.leases.hand_back(job)  # not an attempt: the worker may be to blame
                return
        self.jobs.finish(job.id)
        # Only our own code reaches the client: a worker's code could claim anything.
        self._fail(job.client, job.spec, ErrorCode.WORKER_ERROR, message)

    def _progress_fits(self, job: Job, msg: Message) -> bool:
        index = msg.get("image_index")
        fits = (0 <= msg["step"] <= msg["steps"] <= MAX_STEPS
                and (index is None or 0 <= index < job.spec.n)
                and (index is not None or not msg.payloads))
        if not fits:
            self._drop(job.id, "a progress message that does not fit its job")
        return fits

    def _on_bye(self, worker: WorkerRecord) -> None:
        log.info("worker %s said goodbye", worker.worker_id)
        self._drop_worker(worker, lost=False)

    def _drop_worker(self, worker: WorkerRecord, *, lost: bool) -> None:
        """Remove a worker; its jobs go back to their queues, or fail when out of attempts."""
        self._queue_moved.update(worker.models)
        for job in self.leases.drop_worker(worker, lost=lost):
            self._fail(job.client, job.spec, ErrorCode.WORKER_LOST,
                       f"the job was lost with {job.attempt} workers that ran it")

    # ---------------------------------------------------------------------------- timers

    def _purge_expired(self, now: float) -> None:
        # Scanning workers costs O(workers): a few times a heartbeat, not on every message.
        if now >= self._next_liveness_check:
            self._next_liveness_check = now + self.config.heartbeat_interval / 4
            self._purge_dead_workers(now)
            self.quotas.forget_idle(now)
        for job in self.jobs.expired(now):
            self._queue_moved.add(job.model)
            self._stop_running(job, now)
            self._fail(job.client, job.spec, ErrorCode.TIMEOUT,
                       "the job passed its deadline before it finished")

    def _purge_dead_workers(self, now: float) -> None:
        for worker in self.workers.expired(now):
            log.warning("worker %s missed its heartbeats; declaring it dead", worker.worker_id)
            self._drop_worker(worker, lost=True)
        for worker in self.workers.end_quarantines(now):
            log.info("worker %s takes work again after its quarantine", worker.worker_id)
        interval = self.config.heartbeat_interval
        self._asked = {peer: at for peer, at in self._asked.items() if now - at < interval}

    def _end_startup_grace(self, now: float) -> None:
        """Once the grace is over, fail at once the jobs of models nobody ever announced."""
        if self._grace_over or now < self._startup_grace_until:
            return
        self._grace_over = True
        for model in self.jobs.models_waiting():
            if self.workers.serves(model):
                continue
            for job in self.jobs.drop_queue(model):
                self._fail(job.client, job.spec, ErrorCode.NO_WORKER,
                           f"no worker serves model {model!r} right now", retryable=True)

    def _send_heartbeats(self, now: float) -> None:
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.heartbeat_interval
        beat = self._msg(MsgType.HEARTBEAT)
        for worker in self.workers:
            self._send(self.worker_socket, worker.identity, beat)

    # ---------------------------------------------------------------------------- dispatch

    def _dispatch(self, now: float) -> None:
        for model in self.jobs.models_waiting():
            # Lease until the queue is empty or no worker has room for another batch.
            while self._lease_round(model, now):
                self._queue_moved.add(model)
        self._announce_positions(now)

    def _lease_round(self, model: str, now: float) -> bool:
        """Lease one batch of ``model`` to the best worker with room; whether one was."""
        if not self.jobs.queue_depth(model):
            return False
        # Only room for a whole batch counts (next_free): answers free a batching worker's
        # slots one job at a time, and leasing into each freed slot would split every later
        # batch into batches of one. The worker is busy with the batch it holds meanwhile.
        passed_over: list[WorkerRecord] = []  # none of the queued jobs can go to them
        try:
            while (worker := self._next_worker(model, passed_over)) is not None:
                batch = self.jobs.take_batch(model, worker.identity,
                                             min(worker.max_batch, worker.capacity),
                                             runnable=worker.can_run)
                if batch:
                    self._lease(worker, batch, now)
                    return True
                passed_over.append(worker)
            return False
        finally:
            for worker in passed_over:
                self.workers.offer(worker)  # they stay candidates

    def _next_worker(self, model: str, passed_over: list[WorkerRecord]) -> WorkerRecord | None:
        """The next worker with room for a batch of ``model``: the least loaded, unless the
        first queued job applies LoRA adapters that another free worker has in memory
        already (loading them costs the first one seconds). Never waits for such a worker:
        one that can load them gets the job when none has them loaded."""
        worker = self.workers.next_free(model)
        head = self.jobs.head(model, 1)
        if worker is None or not head or not head[0].spec.loras \
                or worker.has_loaded(head[0].spec):
            return worker
        looked: list[WorkerRecord] = [worker]
        while len(looked) < LORA_LOOKAHEAD and (other := self.workers.next_free(model)):
            looked.append(other)
            if other.has_loaded(head[0].spec):
                break
        best = next((w for w in looked if w.has_loaded(head[0].spec)), worker)
        for other in looked:
            if other is not best:
                passed_over.append(other)  # offered again when this round ends
        return best

    def _lease(self, worker: WorkerRecord, batch: list[Job], now: float) -> None:
        specs = [_with_attempt(job) for job in batch]
        inputs = [frame for job in batch for frame in job.inputs]
        if self._send(self.worker_socket, worker.identity,
                      protocol.jobs(specs, self.incarnation, inputs)):
            self.leases.lease(worker, batch, now)
            self.counters.dispatched(batch[0].model, len(batch))
            for spec in specs:
                log.info("job %s dispatched to worker %s (attempt %d)", spec.id,
                         worker.worker_id, spec.attempt + 1,
                         extra=logs.job_fields(spec, worker_id=worker.worker_id))
            return
        # The worker is gone (ROUTER_MANDATORY): the batch never left, so it goes back as it
        # was; what the worker already held is lost with it.
        for job in reversed(batch):
            self.leases.hand_back(job)
        self._drop_worker(worker, lost=True)

    def _announce_positions(self, now: float) -> None:
        """Tell the jobs still waiting where they now stand (ACCEPTED with a position).

        At most every POSITION_INTERVAL per model whose line moved, only to the jobs that
        workers hold but have not started and the first POSITION_UPDATES queued ones, and only
        to those whose place changed, so a busy queue costs a bounded number of messages.
        """
        if not self._queue_moved or now < self._next_announce:
            return
        self._next_announce = now + POSITION_INTERVAL
        for model in self._queue_moved:
            for position, job, work_ahead in self._places(model):
                if job.told != position and self._tell_position(job.client, job.id, position,
                                                                work_ahead):
                    job.told = position  # a message that did not go out is tried again
                    if job.watchers:
                        self._relay(job, self._position(job.id, position, work_ahead))
        self._queue_moved.clear()

    def _line(self, model: str) -> list[Job]:
        """The jobs of ``model`` waiting to start, in the order they will: those workers
        hold but have not started, then the first POSITION_UPDATES queued."""
        return self.leases.waiting(model) + self.jobs.head(model, POSITION_UPDATES)

    def _places(self, model: str) -> Iterator[tuple[int, Job, float]]:
        """(position, job, work ahead of it) for each job of ``model``'s line (``_line``)."""
        ahead = self._running_work(model)
        for position, job in enumerate(self._line(model)):
            yield position, job, ahead
            ahead += job.spec.work

    def _running_work(self, model: str) -> float:
        """Megapixel-steps left of the batches that the workers of ``model`` run now, by how
        far each has got (its last PROGRESS)."""
        return sum(job.spec.work * (1.0 - job.done_share)
                   for job in self.leases.running(model))

    # ---------------------------------------------------------------------------- sending

    def _send(self, sock: zmq.Socket[bytes], identity: bytes, frames: list[Any]) -> bool:
        # Frame by frame rather than send_multipart, which type-checks every frame and ORs
        # enum flags in Python. Bytes (our small headers) are copied, which costs less than
        # wrapping them in a zmq.Frame; received frames (payloads) still go on without a copy.
        try:
            sock.send(identity, _SNDMORE)
            for frame in frames[:-1]:
                sock.send(frame, _SNDMORE)
            sock.send(frames[-1], _NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                raise
            log.info("could not send to %s: %s", identity.hex(), exc.strerror)
            return False

    def _forward(self, client: bytes, msg: Message) -> None:
        # The worker's header frame goes on as it came (already validated): no re-encoding.
        self._send(self.client_socket, client, msg.frames())

    def _fail(self, client: bytes, spec: protocol.JobSpec, code: ErrorCode, message: str, *,
              retryable: bool = False) -> None:
        """End a job the broker accepted: count it, log it, tell its client."""
        self.counters.failed(spec.model, code)
        log.info("job %s failed: %s: %s", spec.id, code.value, message,
                 extra=logs.job_fields(spec))
        self._send(self.client_socket, client, protocol.failed(
            spec.id, code, message, retryable=retryable, incarnation=self.incarnation))

    def _refuse(self, client: bytes, spec: protocol.JobSpec, code: ErrorCode,
                message: str, *, retry_after: float | None = None) -> None:
        """Turn a submission away (no worker, a full queue, a quota): counted, and worth
        retrying, after ``retry_after`` seconds where the broker knows. Logged at DEBUG: under
        overload every refused submit would cost the broker thread a log write, and the
        frontend logs the job's end anyway."""
        self.counters.failed(spec.model, code)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s refused: %s: %s", spec.id, code.value, message,
                      extra=logs.job_fields(spec))
        self._send(self.client_socket, client, protocol.failed(
            spec.id, code, message, retryable=True, incarnation=self.incarnation,
            retry_after=retry_after))

    def _tell_position(self, client: bytes, job_id: str, position: int,
                       work_ahead: float | None = None) -> bool:
        """ACCEPTED: the job is held here, ``position`` jobs waiting to start ahead of it,
        queued or held by a worker that has not started them (0 when it is next or running),
        and ``work_ahead`` megapixel-steps before it starts, where known.
        Sent when a job is taken, and again when its place changes:
        one message, one meaning, whether the frontend has heard of the job before or not.
        True when it went out."""
        return self._send(self.client_socket, client,
                          self._position(job_id, position, work_ahead))

    def _position(self, job_id: str, position: int, work_ahead: float | None) -> list[Any]:
        """The ACCEPTED that tells a job's place (``_tell_position``)."""
        fields: dict[str, Any] = {"job_id": job_id, "position": position}
        if work_ahead is not None:
            fields["work_ahead"] = round(work_ahead, 3)
        return self._msg(MsgType.ACCEPTED, fields)

    def _msg(self, msg_type: MsgType, fields: dict[str, Any] | None = None) -> list[Any]:
        """A message of ours: it names this broker's incarnation."""
        return protocol.encode(msg_type, {**(fields or {}), "incarnation": self.incarnation})

    def status(self, now: float | None = None, *, stats: bool = True) -> dict[str, Any]:
        now = self._clock() if now is None else now
        return {
            "workers": [w.describe(now, stats=stats) for w in self.workers],
            "queues": self.jobs.depths(),
            "counters": self.counters.snapshot(),
            "identities": self.jobs.load_by_identity(protocol.MAX_IDENTITIES_LISTED),
        }

    def _status_reply(self, now: float) -> list[Any]:
        """STATUS_REPLY, kept within the header limit its receivers enforce: past it (some
        700 workers with stats), the workers' stats are left out, and past that again the
        workers listed last. A reply its frontends refuse would make the broker look down."""
        frames = self._msg(MsgType.STATUS_REPLY, self.status(now))
        if len(frames[0]) <= protocol.MAX_HEADER_BYTES:
            return frames
        status = self.status(now, stats=False)
        frames = self._msg(MsgType.STATUS_REPLY, status)
        while len(frames[0]) > protocol.MAX_HEADER_BYTES and status["workers"]:
            status["workers"] = status["workers"][:len(status["workers"]) * 9 // 10]
            frames = self._msg(MsgType.STATUS_REPLY, status)
        self._status_cut("status", f"the reply would pass {protocol.MAX_HEADER_BYTES} bytes; "
                         f"sent without worker stats, listing {len(status['workers'])} of "
                         f"{len(self.workers)} workers")
        return frames


def _recv_frames(sock: zmq.Socket[bytes]) -> list[zmq.Frame]:
    """One whole message, without copies; raises zmq.Again when none is waiting.

    Like recv_multipart, which asks the socket after every frame whether more follow (a
    getsockopt call each); a received Frame already knows (``more``).
    """
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:  # the rest of a message arrives with its first frame
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def _mismatch(spec: protocol.JobSpec, result: Message) -> str | None:
    """What is wrong with a RESULT for ``spec``, or None: a worker's answer is checked."""
    images: list[protocol.ImageInfo] = result["images"]
    if len(images) != spec.n:
        return f"{len(images)} image(s) for {spec.n}"
    for info, seed in zip(images, spec.seeds, strict=True):
        if info.seed != seed:
            return f"seed {info.seed} where {seed} was asked"
        if info.format != spec.output_format:
            return f"{info.format!r} where {spec.output_format!r} was asked"
        if (info.width, info.height) != (spec.width, spec.height):
            return f"{info.width}x{info.height} where {spec.width}x{spec.height} was asked"
    return None


def _with_attempt(job: Job) -> protocol.JobSpec:
    if job.spec.attempt == job.attempt:  # nearly always: a copy costs more than encoding it
        return job.spec
    return dataclasses.replace(job.spec, attempt=job.attempt)


__all__ = ["Broker", "BrokerConfig", "WorkerState"]

