"""The frontend's connection to the broker: pending jobs, status, resubmission and expiry.

The transport (``broker.connection``) owns the DEALER socket and its I/O thread. Request
threads call ``submit()`` and wait on the returned ``PendingJob``; the I/O thread sends what
they queue, routes each answer to the job waiting for it, and polls the broker's STATUS every
heartbeat, which doubles as the liveness check. Answers for jobs nobody waits on are dropped.

Every message the broker makes names its incarnation. The first message from a new one (the
broker restarted, however quickly, or came back after the network healed) makes the client
submit every job still waiting again, under its own id and this frontend's owner id, with
what is left of its deadline: a broker that still has the job just takes note, one that lost
it runs it again. A job nobody answered by its deadline is answered here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from broker import defaults, logs, protocol
from broker.connection import Connection, CurveKeys
from broker.protocol import (
    BrokerCounters,
    ErrorCode,
    IdentityLoad,
    JobSpec,
    Message,
    MsgType,
    ProtocolError,
)
from http_frontend.errors import BROKER_UNREACHABLE, JobError
from http_frontend.pending import PendingJob

log = logging.getLogger(__name__)

EXPIRY_SLACK = 5.0  # seconds past a job's deadline before this client answers it itself


@dataclass(frozen=True)
class ClusterStatus:
    """The broker's last STATUS_REPLY."""

    workers: list[dict[str, Any]]
    queues: dict[str, int]
    received_at: float
    # Seconds from the STATUS sent to this reply (None: not measured); includes the time
    # the broker took to answer it.
    round_trip: float | None = None
    counters: BrokerCounters | None = None  # None from brokers that send none (older ones)
    # Each identity's jobs per model, the busiest first (none from older brokers).
    identities: list[IdentityLoad] = dataclasses.field(default_factory=list)

    def served_models(self) -> dict[str, list[dict[str, Any]]]:
        """Model name -> the ready workers serving it."""
        served: dict[str, list[dict[str, Any]]] = {}
        for worker in self.workers:
            if worker.get("state") != "ready":
                continue
            for model in worker.get("models", []):
                served.setdefault(model, []).append(worker)
        return served


class BrokerClient:
    """The frontend's one connection to the broker.

    ``owner`` is this frontend's stable id (kept across its restarts): the broker lets only
    the owner of a job re-attach to it or cancel it. ``curve``: this frontend's key pair and
    the broker's public key, for a broker whose client endpoint requires CURVE.
    """

    def __init__(self, endpoint: str, *, owner: str | None = None,
                 heartbeat: float = defaults.HEARTBEAT_INTERVAL,
                 liveness: int = defaults.HEARTBEAT_LIVENESS,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.heartbeat = heartbeat
        self.liveness = liveness
        self._pending: dict[str, PendingJob] = {}
        # Jobs another frontend submitted that a stream here follows (watch): only their
        # place in line and progress come here, never their outcome.
        self._watching: dict[str, PendingJob] = {}
        self._lock = threading.Lock()  # guards _pending and _status
        self._status: ClusterStatus | None = None
        self._was_connected = False  # I/O thread only
        self._status_sent: float | None = None  # I/O thread only: the STATUS awaiting reply
        # One socket for the process's life, on the shared context, which nobody terminates:
        # ZeroMQ reconnects it (100 ms, backing off to 2 s), and each new connection gets a
        # STATUS at once, whose reply names the broker's incarnation. Nothing is queued while
        # no broker is connected: a job stays waiting and goes again with the others when one
        # comes back (see on_new_broker); a cancel is moot by then.
        self._conn = Connection(
            endpoint, self, name="broker-client", heartbeat=heartbeat, liveness=liveness,
            context=context or zmq.Context.instance(), redial=False, immediate=True,
            reconnect_max=2.0, notice_reconnects=True, curve=curve,
            on_refused=self._explain_refusal)
        # A refused handshake looks like a broker that is down (503s); the log says why.
        self._refused = protocol.DropLog(log, "the broker refused this frontend at")

    # ---------------------------------------------------------------- called from any thread

    def start(self) -> None:
        self._conn.start()

    def close(self) -> None:
        self._conn.stop(timeout=2.0)

    @property
    def alive(self) -> bool:
        """Whether the I/O thread runs; the frontend cannot serve without it."""
        return self._conn.alive or not self._conn.started

    @property
    def connected(self) -> bool:
        """Whether the broker answered within the last ``liveness`` heartbeats."""
        return self._conn.connected

    def status(self) -> ClusterStatus | None:
        """The broker's last status, or None when the broker is not reachable."""
        with self._lock:
            return self._status if self.connected else None

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: Sequence[bytes] = ()) -> PendingJob:
        """Send ``job`` (and an edit's ``inputs`` frames); its answer comes to the returned
        PendingJob, which keeps the inputs for a resubmission until the job ends.

        ``owner``: the broker owner to submit under, when not this frontend's own: a job
        taken over from a frontend that stopped keeps the owner it was first submitted
        under, so the broker lets this connection re-attach to it.

        A job whose fields cannot be encoded is answered at once and never joins the jobs
        waiting for the broker: a resubmission after a reconnect would fail the same way.
        """
        pending = PendingJob(job.id, job, owner=owner or self.owner, inputs=tuple(inputs))
        try:
            frames = protocol.submit(job, pending.owner, pending.inputs)
        except ProtocolError as exc:
            pending.fail(JobError(ErrorCode.INVALID_REQUEST,
                                  f"the request cannot be sent on: {exc}"))
            return pending
        if not self.connected:
            pending.fail(BROKER_UNREACHABLE)
            return pending
        with self._lock:
            self._pending[job.id] = pending
        self._conn.send(frames)
        return pending

    def cancel(self, job_id: str, *, owner: str | None = None, forget: bool = True) -> None:
        """Cancel a job; ``owner``: the broker owner it was submitted under, when that is
        not this frontend (another frontend sharing the job records submitted it).

        ``forget``: nobody here waits for its answer any more (the usual case: its client
        left). Without it, a request here that waits for the job gets the broker's
        "cancelled" as its answer."""
        with self._lock:
            pending = self._pending.pop(job_id, None) if forget else \
                self._pending.get(job_id)
        owner = owner or (pending.owner if pending is not None else self.owner)
        self._conn.send(protocol.encode(MsgType.CANCEL, {"job_id": job_id, "owner": owner}))

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._pending.pop(job_id, None)

    def watch(self, job_id: str) -> PendingJob:
        """Follow a job another frontend submitted (one sharing the job records): the broker
        relays its place in line and its progress to the returned PendingJob, which never
        ends (the job's record says when it did); ``unwatch`` when done with it. A broker
        that does not have the job, or predates WATCH, sends nothing."""
        with self._lock:
            watched = self._watching.setdefault(job_id, PendingJob(job_id))
        self._conn.send(protocol.encode(MsgType.WATCH, {"job_id": job_id}))
        return watched

    def unwatch(self, job_id: str) -> None:
        """Stop taking in a watched job's news (the broker forgets the watcher with the
        job)."""
        with self._lock:
            self._watching.pop(job_id, None)

    # ---------------------------------------------------------------- the transport's hooks

    def on_connect(self) -> None:
        self._conn.send_now(self.on_beat())  # the first STATUS, without waiting a heartbeat

    def on_message(self, msg: Message) -> None:
        try:
            if msg.type is MsgType.STATUS_REPLY:
                sent, self._status_sent = self._status_sent, None
                received = self._conn.last_heard
                with self._lock:
                    self._status = ClusterStatus(
                        msg["workers"], msg["queues"], received,
                        round_trip=received - sent if sent is not None else None,
                        counters=msg.get("counters"),
                        identities=msg.get("identities") or [])
            elif msg.type in (MsgType.ACCEPTED, MsgType.PROGRESS, MsgType.RESULT,
                              MsgType.FAILED):
                self._deliver(msg)
            else:
                log.warning("dropped unexpected %s from the broker", msg.type.value)
        except Exception:  # one bad message must not end the thread every request needs
            log.exception("error handling %s from the broker", msg.type.value)

    def on_new_broker(self) -> None:
        """Submit every waiting job again.

        A broker we have not heard from before (a restart, however quick) knows none of our
        jobs; the same broker after a cut connection may have answered into the void.
        """
        try:
            self._resubmit()
            self._watch_again()
        except Exception:  # as in on_message: the thread every request needs lives on
            log.exception("error resubmitting the waiting jobs to broker %s", self.endpoint)

    def on_beat(self) -> list[Any]:
        self._status_sent = time.monotonic()  # sent at once (Connection._beat, on_connect)
        return protocol.encode(MsgType.STATUS)  # the poll that doubles as the liveness check

    def on_tick(self, now: float) -> float | None:
        self._expire(now)
        connected = self.connected
        if self._was_connected and not connected:
            log.warning("broker %s stopped answering; %d job(s) wait for it to return",
                        self.endpoint, len(self._pending))
        self._was_connected = connected
        return None

    def _explain_refusal(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = (f"our key {self.curve.public.decode() if self.curve else ''} is not on "
                      "its allow-list (copy NAME.key into the broker's keys/frontends/; a "
                      "worker's key does not open the client endpoint)")
        elif self.curve is None:
            reason = "it probably requires CURVE: pass --broker-key and --key"
        else:
            reason = "the CURVE handshake failed: check --broker-key is the broker's broker.key"
        self._refused(self.endpoint, reason)

    def _resubmit(self) -> None:
        """Send every waiting job again, with the time it has left."""
        now = time.monotonic()
        with self._lock:
            waiting = list(self._pending.values())
        sent = 0
        for job in waiting:
            if job.spec is None:
                continue
            left = job.spec.timeout - (now - job.submitted_at)
            if left <= 0:
                continue
            try:
                frames = protocol.submit(dataclasses.replace(job.spec, timeout=left), job.owner,
                                         job.inputs)
            except ProtocolError:  # cannot happen for a job submit() took; never fatal
                log.exception("could not resubmit job %s", job.job_id,
                              extra=logs.job_fields(job.spec))
                continue
            sent += self._conn.send_now(frames)
        if sent:
            log.info("resubmitted %d waiting job(s) to broker %s", sent, self.endpoint)

    def _watch_again(self) -> None:
        """Ask again for the jobs watched here: a new connection is a new watcher."""
        with self._lock:
            watched = list(self._watching)
        for job_id in watched:
            self._conn.send_now(protocol.encode(MsgType.WATCH, {"job_id": job_id}))

    def _deliver(self, msg: Message) -> None:
        final = msg.type in (MsgType.RESULT, MsgType.FAILED)
        with self._lock:
            pending = self._pending.pop(msg["job_id"], None) if final else \
                self._pending.get(msg["job_id"])
            watched = None if final else self._watching.get(msg["job_id"])
        if watched is not None and pending is None:
            watched.update(msg)
        if pending is None:
            return
        if msg.type is MsgType.RESULT and pending.spec is not None:
            problem = answer_mismatch(pending.spec, msg)
            if problem is not None:
                log.warning("job %s: the worker's answer did not match the job: %s",
                            pending.job_id, problem, extra=logs.job_fields(
                                pending.spec, worker_id=msg.get("worker_id")))
                pending.fail(JobError(ErrorCode.WORKER_ERROR,
                                      f"the worker's answer did not match the job: {problem}"))
                return
        pending.update(msg)

    def _expire(self, now: float) -> None:
        """Answer jobs the broker never answered by their deadline (and a little more), so
        every waiter, the jobs API's records included, reaches an end."""
        with self._lock:
            late = [p for p in self._pending.values() if p.spec is not None
                    and now - p.submitted_at > p.spec.timeout + EXPIRY_SLACK]
            for pending in late:
                del self._pending[pending.job_id]
        for pending in late:
            if self.connected:
                timeout = pending.spec.timeout if pending.spec else 0.0
                pending.fail(JobError(ErrorCode.TIMEOUT,
                                      f"no answer within the {timeout:.0f} s deadline"))
            else:
                pending.fail(JobError(ErrorCode.BROKER_UNAVAILABLE, "lost contact with the "
                                      "broker and it did not come back in time",
                                      retryable=True))


_MAGIC: dict[str, tuple[bytes, ...]] = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "webp": (b"RIFF",),
}


def answer_mismatch(spec: JobSpec, result: Message) -> str | None:
    """What is wrong with a RESULT for ``spec``, or None; checks what the broker cannot (it
    never reads payloads): each image is in the format asked for."""
    images = result["images"]
    if len(images) != spec.n or len(result.payloads) != spec.n:
        return f"{len(images)} image(s) for {spec.n}"
    for info, frame in zip(images, result.payloads, strict=True):
        head = _bytes(frame)[:12]
        if info.format != spec.output_format or not head.startswith(
                _MAGIC.get(spec.output_format, (b"",))):
            return f"an image that is not {spec.output_format}"
        if spec.output_format == "webp" and head[8:12] != b"WEBP":
            return "an image that is not webp"
    return None


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
