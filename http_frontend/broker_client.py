"""The frontend's connection to the broker: one I/O thread owns the DEALER socket.

Request threads call ``submit()`` and wait on the returned ``PendingJob``; the I/O thread sends
what they queue, routes each answer to the job waiting for it, and polls the broker's STATUS
every heartbeat, which doubles as the liveness check. Answers for jobs nobody waits on are
dropped.

When the broker comes back after being unreachable (restarted, or the network healed), every
job still waiting is submitted again under its own id with what is left of its deadline: a
broker that still has the job just takes note, one that lost it runs it again.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from broker import protocol
from broker.protocol import ErrorCode, JobSpec, Message, MsgType, ProtocolError

log = logging.getLogger(__name__)


class PendingJob:
    """A submitted job as its waiters see it: everything that happened so far, and its answer.

    The I/O thread records each message with ``update()``; any number of request threads
    wait for the answer (``wait``) or follow along (``events_after``).
    """

    def __init__(self, job_id: str, spec: JobSpec | None = None) -> None:
        self.job_id = job_id
        self.spec = spec
        self.submitted_at = time.monotonic()
        self.position: int | None = None
        self.step = 0
        self.steps = 0
        self.answer: Message | None = None  # the RESULT or FAILED, once it came
        self._history: list[Message] = []
        self._changed = threading.Condition()

    @property
    def done(self) -> bool:
        return self.answer is not None

    def update(self, msg: Message) -> None:
        """Record one message for this job; the first RESULT or FAILED is its answer."""
        with self._changed:
            if self.answer is not None:
                return  # exactly one answer: anything after it is dropped
            if msg.type is MsgType.ACCEPTED:
                self.position = msg["position"]
            elif msg.type is MsgType.PROGRESS:
                self.step, self.steps = msg["step"], msg["steps"]
            else:
                self.answer = msg
            self._history.append(msg)
            self._changed.notify_all()

    def wait(self, timeout: float) -> Message | None:
        """The RESULT or FAILED for this job, or None when ``timeout`` passes first."""
        with self._changed:
            self._changed.wait_for(lambda: self.answer is not None, max(0.0, timeout))
            return self.answer

    def events_after(self, seen: int, timeout: float) -> list[Message]:
        """Messages after the first ``seen`` ones, waiting up to ``timeout`` for one."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._history) > seen, max(0.0, timeout))
            return self._history[seen:]


@dataclass(frozen=True)
class ClusterStatus:
    """The broker's last STATUS_REPLY."""

    workers: list[dict[str, Any]]
    queues: dict[str, int]
    received_at: float

    def served_models(self) -> dict[str, list[dict[str, Any]]]:
        """Model name -> the ready workers serving it."""
        served: dict[str, list[dict[str, Any]]] = {}
        for worker in self.workers:
            if worker.get("state") != "ready":
                continue
            for model in worker.get("models", []):
                served.setdefault(model, []).append(worker)
        return served

    def model_info(self, model: str) -> dict[str, Any] | None:
        for worker in self.workers:
            info = (worker.get("model_info") or {}).get(model)
            if isinstance(info, dict):
                return info
        return None


class BrokerClient:
    def __init__(self, endpoint: str, *, heartbeat: float = 1.0, liveness: int = 3,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.heartbeat = heartbeat
        self.liveness = liveness
        self._ctx = context or zmq.Context.instance()
        self._pending: dict[str, PendingJob] = {}
        self._lock = threading.Lock()  # guards _pending and _status
        self._status: ClusterStatus | None = None
        self._last_heard = 0.0
        self._outbox: queue.Queue[list[Any]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._drop = protocol.DropLog(log)
        self._thread = threading.Thread(target=self._run, name="broker-client", daemon=True)

    # ---------------------------------------------------------------- called from any thread

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(2.0)

    @property
    def connected(self) -> bool:
        """Whether the broker answered within the last ``liveness`` heartbeats."""
        return time.monotonic() - self._last_heard < self.heartbeat * self.liveness

    def status(self) -> ClusterStatus | None:
        """The broker's last status, or None when the broker is not reachable."""
        with self._lock:
            return self._status if self.connected else None

    def submit(self, job: JobSpec) -> PendingJob:
        pending = PendingJob(job.id, job)
        with self._lock:
            self._pending[job.id] = pending
        if not self.connected:
            self.forget(job.id)
            pending.update(_failure(job.id, ErrorCode.BROKER_UNAVAILABLE,
                                        "the broker is not reachable"))
            return pending
        self._queue(protocol.submit(job))
        return pending

    def cancel(self, job_id: str) -> None:
        self.forget(job_id)
        self._queue(protocol.encode(MsgType.CANCEL, {"job_id": job_id}))

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._pending.pop(job_id, None)

    def _queue(self, frames: list[Any]) -> None:
        self._outbox.put(frames)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # ---------------------------------------------------------------- the I/O thread

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # do not queue for a broker that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(self.endpoint)
        return sock

    def _run(self) -> None:
        sock = self._socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_status = 0.0
        was_connected = False
        self._ever_connected = False
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_status:
                self._send(sock, protocol.encode(MsgType.STATUS))
                next_status = now + self.heartbeat
            events = dict(poller.poll(int(max(0.0, next_status - time.monotonic()) * 1000)))
            if sock in events:
                while self._recv(sock):
                    pass
            if self._wake_r.fileno() in events:
                _drain(self._wake_r)
            self._flush(sock)
            if was_connected and not self.connected:
                log.warning("broker %s stopped answering; %d job(s) wait for it to return",
                            self.endpoint, len(self._pending))
            elif self.connected and not was_connected and self._ever_connected:
                self._resubmit(sock)
            self._ever_connected |= self.connected
            was_connected = self.connected
        sock.close(linger=0)

    def _flush(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not self._send(sock, frames):
                self._fail_unsent(frames)

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _fail_unsent(self, frames: list[Any]) -> None:
        try:
            msg = protocol.decode(frames)
        except ProtocolError:
            return
        if msg.type is MsgType.SUBMIT:
            self._deliver(_failure(msg["job"].id, ErrorCode.BROKER_UNAVAILABLE,
                                   "the broker is not reachable"))

    def _recv(self, sock: zmq.Socket) -> bool:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        try:
            msg = protocol.decode(frames)
        except ProtocolError as exc:
            self._drop("the broker", str(exc))
            return True
        self._last_heard = time.monotonic()
        if msg.type is MsgType.STATUS_REPLY:
            with self._lock:
                self._status = ClusterStatus(msg["workers"], msg["queues"], self._last_heard)
        elif msg.type in (MsgType.ACCEPTED, MsgType.PROGRESS, MsgType.RESULT, MsgType.FAILED):
            self._deliver(msg)
        else:
            log.warning("dropped unexpected %s from the broker", msg.type.value)
        return True

    def _deliver(self, msg: Message) -> None:
        final = msg.type in (MsgType.RESULT, MsgType.FAILED)
        with self._lock:
            pending = self._pending.pop(msg["job_id"], None) if final else \
                self._pending.get(msg["job_id"])
        if pending is not None:
            pending.update(msg)

    def _resubmit(self, sock: zmq.Socket) -> None:
        """Send every waiting job again, with the time it has left."""
        now = time.monotonic()
        with self._lock:
            waiting = list(self._pending.values())
        for job in waiting:
            if job.spec is None:
                continue
            left = job.spec.timeout - (now - job.submitted_at)
            if left > 0:
                self._send(sock, protocol.submit(dataclasses.replace(job.spec, timeout=left)))
        log.info("broker %s is back; resubmitted %d waiting job(s)", self.endpoint, len(waiting))


def _failure(job_id: str, code: ErrorCode, message: str) -> Message:
    return Message(MsgType.FAILED, {"job_id": job_id, "code": code.value, "message": message,
                                    "retryable": True})


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass
