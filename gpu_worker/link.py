"""The worker's link to the broker: one I/O thread owns the DEALER socket.

It registers (READY), heartbeats while the main thread runs long jobs, reconnects with capped
back-off when the broker goes silent, registers again at once when the broker restarted, hands
what the broker sends to a handler and sends what other threads queue for it. It only carries
messages: which jobs the worker holds, and which are cancelled, is the handler's business.
Other threads never touch the socket.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol
from broker.auth import load_public, load_secret
from broker.protocol import JobSpec, Message, MsgType, ProtocolError

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # at stop, how long the last answers and BYE may take to reach the broker


@dataclass(frozen=True)
class CurveKeys:
    """A worker's CURVE identity and the broker key it trusts (all Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, broker_key: str, own_key: str) -> CurveKeys:
        public, secret = load_secret(own_key)
        return cls(load_public(broker_key), public, secret)

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveKeys(public={self.public.decode()})"


class LinkHandler(Protocol):
    """What the link tells the worker, and asks it; called on the link's I/O thread."""

    def on_jobs(self, batch: list[JobSpec]) -> None:
        """Take a batch the broker leased to this worker (a JOBS message)."""

    def on_cancel(self, job_id: str) -> None:
        """Note that the broker cancelled a job (a CANCEL message)."""

    def held(self) -> list[str]:
        """Return the ids of every job received and not yet answered, running or waiting."""


class BrokerLink:
    def __init__(self, endpoint: str, ready_fields: dict[str, Any], *, handler: LinkHandler,
                 heartbeat: float = 1.0, liveness: int = 3, max_frame: int = 1 << 20,
                 curve: CurveKeys | None = None, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.ready_fields = ready_fields  # READY is these plus `held`, built at each send
        self.handler = handler
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_frame = max_frame
        # A link owns its context unless given one: stop() terminates it, which is what waits
        # for the last answers and BYE to leave (closing a socket does not).
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._outbox: queue.Queue[list[Any]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # The broker's incarnation as last seen: another one means it restarted.
        self._incarnation: str | None = None
        self._last_ready = float("-inf")  # when READY was last sent (monotonic)
        self._ready_due: float | None = None  # when a READY held back by the rate limit is due
        self._stop = threading.Event()
        self._drop = protocol.DropLog(log)
        self._refused = protocol.DropLog(log, "the broker refused this worker at")
        self._monitor: zmq.Socket | None = None
        self._sock: zmq.Socket | None = None  # the DEALER; only the I/O thread touches it
        self._thread = threading.Thread(target=self._run, name="broker-link", daemon=True)
        self.connected = threading.Event()  # set after the broker first answered us

    # ---------------------------------------------------------------- called from any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, bye: bool = True, timeout: float = 2.0) -> None:
        if bye:
            self.send(protocol.encode(MsgType.BYE))
        self._stop.set()
        self._wake()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        if self._own_context and not self._thread.is_alive():
            # The thread closed its sockets on the way out, so this returns once the queued
            # messages are sent, or after FLUSH_SECONDS.
            self._ctx.term()

    @property
    def alive(self) -> bool:
        """Whether the I/O thread runs (it ends at stop(), or on an error it logged)."""
        return self._thread.is_alive()

    def send(self, frames: list[Any]) -> None:
        self._outbox.put(frames)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    # ---------------------------------------------------------------- the I/O thread

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve.server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
        try:
            self._watch_handshakes(sock)
            sock.connect(self.endpoint)
            self._register(sock, force=True)  # a new socket: nobody has heard from it yet
        except BaseException:
            self._close(sock, linger=0)
            raise
        return sock

    def _close(self, sock: zmq.Socket | None, *, linger: float) -> None:
        """Close the socket and its monitor: a context with open sockets never terminates."""
        if self._monitor is not None:
            if sock is not None and not sock.closed:
                sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if sock is not None:
            sock.close(linger=int(linger * 1000))

    def _watch_handshakes(self, sock: zmq.Socket) -> None:
        """Watch for the broker refusing us, which otherwise looks like a silent network."""
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def _explain_refusal(self) -> None:
        assert self._monitor is not None
        try:
            event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = (f"our key {self.curve.public.decode() if self.curve else ''} is not on "
                      "its allow-list (copy NAME.key into the broker's keys/workers/)")
        elif self.curve is None:
            reason = "it probably requires CURVE: pass --broker-key and --key"
        else:
            reason = "the CURVE handshake failed: check --broker-key is the broker's broker.key"
        self._refused(self.endpoint, reason)

    def _run(self) -> None:
        try:
            self._sock = self._connect()
            if self._serve():
                self._flush(self._sock)
                # Not linger 0: the last RESULTs and the BYE were only queued, and the broker
                # must get them (a BYE hands back held jobs at once, not after missed
                # heartbeats).
                self._close(self._sock, linger=FLUSH_SECONDS)
        except Exception:
            log.exception("the link to the broker %s failed", self.endpoint)
        finally:
            self._close(self._sock, linger=0)  # after an error; a closed socket stays closed
            self._sock = None

    def _serve(self) -> bool:
        """Exchange messages until stop(). False when stopped while waiting to reconnect: the
        broker is unreachable, so there is nothing to flush."""
        sock = self._sock
        assert sock is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        now = time.monotonic()
        broker_deadline = now + self.heartbeat * self.liveness
        next_beat = now + self.heartbeat
        backoff = self.heartbeat
        while not self._stop.is_set():
            events = dict(poller.poll(self._poll_ms()))
            now = time.monotonic()
            if sock in events:
                while self._recv(sock):
                    broker_deadline = now + self.heartbeat * self.liveness
                    backoff = self.heartbeat
            if self._wake_r.fileno() in events:
                self._drain_wake()
            if self._monitor is not None and self._monitor in events:
                self._explain_refusal()
            self._flush(sock)
            if self._ready_due is not None and now >= self._ready_due:
                self._register(sock, owed=True)
            if now >= next_beat:
                self._beat(sock)
                next_beat = now + self.heartbeat
            if now >= broker_deadline:
                log.warning("broker silent for %.1f s; reconnecting to %s",
                            self.heartbeat * self.liveness, self.endpoint)
                poller.unregister(sock)
                poller.unregister(self._monitor)
                self._close(sock, linger=0)
                self.connected.clear()
                # stop() interrupts the back-off, so a worker stopping while the broker is
                # away still ends within stop()'s timeout.
                if self._stop.wait(backoff * random.uniform(0.5, 1.0)):
                    return False
                backoff = min(backoff * 2, 10 * self.heartbeat)
                sock = self._sock = self._connect()
                poller.register(sock, zmq.POLLIN)
                poller.register(self._monitor, zmq.POLLIN)
                broker_deadline = time.monotonic() + self.heartbeat * self.liveness
        return True

    def _poll_ms(self) -> int:
        """How long to wait for a message: a quarter heartbeat, or until a READY is due."""
        wait = self.heartbeat / 4
        if self._ready_due is not None:
            wait = min(wait, self._ready_due - time.monotonic())
        return max(0, int(wait * 1000))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send(sock, frames)

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("broker not reachable; dropped an outgoing message")

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
        self.connected.set()
        self._note_incarnation(sock, msg.get("incarnation"))
        self._handle(sock, msg)
        return True

    def _handle(self, sock: zmq.Socket, msg: Message) -> None:
        if msg.type is MsgType.JOBS:
            self.handler.on_jobs(list(msg["jobs"]))
        elif msg.type is MsgType.CANCEL:
            self.handler.on_cancel(msg["job_id"])
        elif msg.type is MsgType.RECONNECT:
            log.info("broker asked us to register again")
            self._register(sock)
        elif msg.type is not MsgType.HEARTBEAT:
            log.warning("dropped unexpected %s from the broker", msg.type.value)

    def _note_incarnation(self, sock: zmq.Socket, incarnation: str | None) -> None:
        """Register at once with a broker that restarted, rather than after its silence."""
        if incarnation is None:  # a broker from before incarnations
            return
        previous, self._incarnation = self._incarnation, incarnation
        if previous is not None and previous != incarnation:
            log.info("broker %s restarted (incarnation %s, was %s); registering again",
                     self.endpoint, incarnation, previous)
            self._register(sock, owed=True)

    def _register(self, sock: zmq.Socket, *, force: bool = False, owed: bool = False) -> None:
        """Send READY, at most once per half heartbeat unless forced.

        A restarted broker answers every stale message with RECONNECT (40 in 15 ms were seen);
        one READY answers them all, and registering again is idempotent, so the rest are waste
        and are dropped. An ``owed`` READY (the broker restarted: the last one may have gone to
        its previous incarnation) is only put off until the rate limit allows it.
        """
        now = time.monotonic()
        allowed_at = self._last_ready + self.heartbeat / 2
        if not force and now < allowed_at:
            if owed:
                self._ready_due = allowed_at
            else:
                log.debug("READY sent %.3f s ago; not again yet", now - self._last_ready)
            return
        self._last_ready, self._ready_due = now, None
        # Before any queued answers: a broker drops answers from a worker it does not know.
        fields = {**self.ready_fields, "held": self.handler.held()}
        self._send(sock, protocol.encode(MsgType.READY, fields))

    def _beat(self, sock: zmq.Socket) -> None:
        """Send a HEARTBEAT listing the jobs held, after the answers queued before the list.

        So a job missing from the list was answered, and the broker has that answer before it
        reads the list.
        """
        running = self.handler.held()
        self._flush(sock)
        self._send(sock, protocol.encode(MsgType.HEARTBEAT, {"running": running}))
