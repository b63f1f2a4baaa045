"""The frontend's connection to the broker: one I/O thread owns the DEALER socket.

Request threads call ``submit()`` and wait on the returned ``PendingJob``; the I/O thread sends
what they queue, routes each answer to the job waiting for it, and polls the broker's STATUS
every heartbeat, which doubles as the liveness check. Answers for jobs nobody waits on are
dropped.

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
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from broker import protocol
from broker.protocol import ErrorCode, JobSpec, Message, MsgType, ProtocolError
from http_frontend.pending import PendingJob

log = logging.getLogger(__name__)

EXPIRY_SLACK = 5.0  # seconds past a job's deadline before this client answers it itself


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


class BrokerClient:
    """The frontend's one connection to the broker.

    ``owner`` is this frontend's stable id (kept across its restarts): the broker lets only
    the owner of a job re-attach to it or cancel it.
    """

    def __init__(self, endpoint: str, *, owner: str | None = None, heartbeat: float = 1.0,
                 liveness: int = 3, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.heartbeat = heartbeat
        self.liveness = liveness
        self._ctx = context or zmq.Context.instance()
        self._pending: dict[str, PendingJob] = {}
        self._lock = threading.Lock()  # guards _pending and _status
        self._status: ClusterStatus | None = None
        self._last_heard = 0.0
        self._incarnation: str | None = None  # the broker's, as last heard; I/O thread only
        self._reconnected = False  # a new connection since the last message; I/O thread only
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
    def alive(self) -> bool:
        """Whether the I/O thread runs; the frontend cannot serve without it."""
        return self._thread.is_alive() or not self._thread.ident

    @property
    def connected(self) -> bool:
        """Whether the broker answered within the last ``liveness`` heartbeats."""
        return time.monotonic() - self._last_heard < self.heartbeat * self.liveness

    def status(self) -> ClusterStatus | None:
        """The broker's last status, or None when the broker is not reachable."""
        with self._lock:
            return self._status if self.connected else None

    def submit(self, job: JobSpec) -> PendingJob:
        """Send ``job``; its answer comes to the returned PendingJob.

        A job whose fields cannot be encoded is answered at once and never joins the jobs
        waiting for the broker: a resubmission after a reconnect would fail the same way.
        """
        pending = PendingJob(job.id, job)
        try:
            frames = protocol.submit(job, self.owner)
        except ProtocolError as exc:
            pending.update(_failure(job.id, ErrorCode.INVALID_REQUEST,
                                    f"the request cannot be sent on: {exc}", retryable=False))
            return pending
        if not self.connected:
            pending.update(_failure(job.id, ErrorCode.BROKER_UNAVAILABLE,
                                    "the broker is not reachable"))
            return pending
        with self._lock:
            self._pending[job.id] = pending
        self._queue(frames)
        return pending

    def cancel(self, job_id: str) -> None:
        self.forget(job_id)
        self._queue(protocol.encode(MsgType.CANCEL, {"job_id": job_id, "owner": self.owner}))

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
        return sock

    def _run(self) -> None:
        sock = self._socket()
        # A new connection (a restarted broker, a healed network) is asked for its status at
        # once: its reply names its incarnation, and a new one means resubmitting.
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        next_status = 0.0
        was_connected = False
        connections = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_status:
                    self._send(sock, protocol.encode(MsgType.STATUS))
                    next_status = now + self.heartbeat
                events = dict(poller.poll(int(max(0.0, next_status - time.monotonic()) * 1000)))
                if monitor in events:
                    connections += _drain_monitor(monitor)
                    if connections > 1:  # answers sent while we were cut off are lost
                        self._reconnected = True
                    next_status = 0.0
                if sock in events:
                    while self._recv(sock):
                        pass
                if self._wake_r.fileno() in events:
                    _drain(self._wake_r)
                self._flush(sock)
                self._expire(time.monotonic())
                if was_connected and not self.connected:
                    log.warning("broker %s stopped answering; %d job(s) wait for it to return",
                                self.endpoint, len(self._pending))
                was_connected = self.connected
        except Exception:
            log.exception("the connection to the broker failed; the frontend cannot serve")
            raise
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _flush(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            # No connection right now (the broker is restarting): a job stays waiting and
            # goes out with the others when one comes back; a cancel is moot by then.
            self._send(sock, frames)

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

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
        try:
            self._handle(sock, msg)
        except Exception:  # one bad message must not end the thread every request needs
            log.exception("error handling %s from the broker", msg.type.value)
        return True

    def _handle(self, sock: zmq.Socket, msg: Message) -> None:
        self._last_heard = time.monotonic()
        self._notice_broker(sock, msg.get("incarnation"))
        if msg.type is MsgType.STATUS_REPLY:
            with self._lock:
                self._status = ClusterStatus(msg["workers"], msg["queues"], self._last_heard)
        elif msg.type in (MsgType.ACCEPTED, MsgType.PROGRESS, MsgType.RESULT, MsgType.FAILED):
            self._deliver(msg)
        else:
            log.warning("dropped unexpected %s from the broker", msg.type.value)

    def _notice_broker(self, sock: zmq.Socket, incarnation: str | None) -> None:
        """Submit every waiting job again after a reconnection or a broker restart.

        A broker we have not heard from before (a restart, however quick) knows none of our
        jobs; the same broker after a cut connection may have answered into the void.
        """
        restarted = None not in (incarnation, self._incarnation) and \
            incarnation != self._incarnation
        if incarnation is not None:
            self._incarnation = incarnation
        if restarted:
            log.warning("broker %s restarted (incarnation %s)", self.endpoint, incarnation)
        if restarted or self._reconnected:
            self._reconnected = False
            self._resubmit(sock)

    def _deliver(self, msg: Message) -> None:
        final = msg.type in (MsgType.RESULT, MsgType.FAILED)
        with self._lock:
            pending = self._pending.pop(msg["job_id"], None) if final else \
                self._pending.get(msg["job_id"])
        if pending is None:
            return
        if msg.type is MsgType.RESULT and pending.spec is not None:
            problem = answer_mismatch(pending.spec, msg)
            if problem is not None:
                log.warning("job %s: the worker's answer did not match the job: %s",
                            pending.job_id, problem)
                msg = _failure(pending.job_id, ErrorCode.WORKER_ERROR,
                               f"the worker's answer did not match the job: {problem}",
                               retryable=False)
        pending.update(msg)

    def _resubmit(self, sock: zmq.Socket) -> None:
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
                frames = protocol.submit(dataclasses.replace(job.spec, timeout=left), self.owner)
            except ProtocolError:  # cannot happen for a job submit() took; never fatal
                log.exception("could not resubmit job %s", job.job_id)
                continue
            sent += self._send(sock, frames)
        if sent:
            log.info("resubmitted %d waiting job(s) to broker %s", sent, self.endpoint)

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
                pending.update(_failure(pending.job_id, ErrorCode.TIMEOUT,
                                        f"no answer within the {timeout:.0f} s deadline",
                                        retryable=False))
            else:
                pending.update(_failure(pending.job_id, ErrorCode.BROKER_UNAVAILABLE,
                                        "lost contact with the broker and it did not come "
                                        "back in time"))


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


def _failure(job_id: str, code: ErrorCode, message: str, *, retryable: bool = True) -> Message:
    return Message(MsgType.FAILED, {"job_id": job_id, "code": code.value, "message": message,
                                    "retryable": retryable})


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _drain_monitor(monitor: zmq.Socket) -> int:
    """Read every pending monitor event; return how many there were."""
    count = 0
    while True:
        try:
            monitor.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return count
        count += 1
