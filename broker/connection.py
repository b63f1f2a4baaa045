"""One DEALER connection to the broker, owned by one I/O thread: the transport of both peers.

A worker's link (``gpu_worker/link.py``) and a frontend's client
(``http_frontend/broker_client.py``) each keep one. It owns the socket and what keeps it up:
other threads queue messages and wake the I/O thread through a socketpair; it decodes what
arrives (garbage is dropped and logged, rate-limited), keeps the clock of when the broker last
spoke, heartbeats, replaces a socket the broker went silent on, and notices a broker that may
not know us (a new incarnation, or a connection made again) so the peer can register or
resubmit at once. What the messages mean is the peer's business: the ``Peer`` hooks, all
called on the I/O thread. It imports no torch: the frontend uses it too.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import defaults, protocol
from broker.auth import load_public, load_secret
from broker.protocol import Message, ProtocolError

log = logging.getLogger(__name__)

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass(frozen=True)
class CurveKeys:
    """A peer's CURVE identity and the broker key it trusts (all Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, broker_key: str, own_key: str) -> CurveKeys:
        public, secret = load_secret(own_key)
        return cls(load_public(broker_key), public, secret)

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveKeys(public={self.public.decode()})"


class Peer(Protocol):
    """What a connection asks of the program on top of it; every call is on the I/O thread."""

    def on_connect(self) -> None:
        """Greet a new socket: what this sends goes before anything queued."""

    def on_message(self, msg: Message) -> None:
        """Handle one message from the broker; an exception ends the I/O thread."""

    def on_new_broker(self) -> None:
        """Catch up with a broker that may not know us, before the message that showed it.

        Called once per new incarnation (a restart, however quick) and, with
        ``notice_reconnects``, once after a connection was made again.
        """

    def on_beat(self) -> list[Any]:
        """Return the heartbeat to send now; the messages queued before it go first."""

    def on_tick(self, now: float) -> float | None:
        """Do periodic work; return when it is next due (None: a heartbeat from now will do)."""


class Connection:
    """A DEALER to ``endpoint`` that one I/O thread owns; other threads only ``send()``.

    ``context``: without one the connection makes its own and ``stop()`` terminates it, which
    is what waits up to ``linger`` seconds for the last messages to leave (closing a socket does
    not). ``redial``: after ``liveness`` silent heartbeats, close the socket and dial a fresh
    one after a jittered back-off that doubles up to ten heartbeats; without it the one socket
    stays and ZeroMQ reconnects it underneath. ``immediate``: never queue for a broker that is
    not connected (a message sent meanwhile is dropped, as the peer expects, so quietly).
    ``reconnect_max`` caps ZeroMQ's own reconnect back-off (None: every 100 ms).
    ``notice_reconnects``: a connection made again may have lost answers the broker sent, so
    heartbeat at once and call ``on_new_broker`` with the next message. ``on_refused`` gets
    each failed handshake, which otherwise looks like a silent network.
    """

    def __init__(self, endpoint: str, peer: Peer, *, name: str,
                 heartbeat: float = defaults.HEARTBEAT_INTERVAL,
                 liveness: int = defaults.HEARTBEAT_LIVENESS, max_frame: int | None = None,
                 curve: CurveKeys | None = None,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None, linger: float = 0.0,
                 redial: bool = True, immediate: bool = False,
                 reconnect_max: float | None = None, notice_reconnects: bool = False,
                 on_refused: Callable[[int], None] | None = None) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.linger = linger
        self.redial = redial
        self.immediate = immediate
        self.on_refused = on_refused
        self._options = _socket_options(max_frame, curve, immediate, reconnect_max)
        self._watch = (zmq.EVENT_CONNECTED if notice_reconnects else 0) | \
            (HANDSHAKE_FAILED if on_refused is not None else 0)
        self._own_context = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self._outbox: queue.Queue[list[Any]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._drop = protocol.DropLog(log)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Only the I/O thread touches these.
        self._sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()
        self._incarnation: str | None = None  # the broker's, as last heard
        self._rejoined = False  # a connection made again since the last message
        self._connections = 0  # made by the current socket
        self._dialed_at = 0.0
        self._next_beat = 0.0
        self._due: float | None = None  # when the peer's periodic work is next due
        self._backoff = heartbeat
        # Written by the I/O thread, read by any.
        self.last_heard = float("-inf")  # when the broker last sent a valid message
        self.answered = threading.Event()  # the broker answered the current socket

    # ---------------------------------------------------------------- called from any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout: float = 2.0) -> None:
        """End the I/O thread, which sends what is queued first (see ``linger``)."""
        self._stop.set()
        self._wake()
        if self.started:
            self._thread.join(timeout)
        if self._thread.is_alive():
            return  # it still uses the context and the wake-up pair
        if self._own_context:
            # The thread closed its sockets on the way out, so this returns once the queued
            # messages are sent, or after ``linger``.
            self._ctx.term()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def alive(self) -> bool:
        """Whether the I/O thread runs (it ends at stop(), or on an error it logged)."""
        return self._thread.is_alive()

    @property
    def connected(self) -> bool:
        """Whether the broker spoke within the last ``liveness`` heartbeats."""
        return time.monotonic() - self.last_heard < self.heartbeat * self.liveness

    def send(self, frames: list[Any]) -> None:
        """Queue a message for the I/O thread to send."""
        self._outbox.put(frames)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    # ---------------------------------------------------------------- the I/O thread

    def send_now(self, frames: list[Any]) -> bool:
        """Send on the socket at once, from a hook; False when the message was dropped."""
        assert self._sock is not None, "send_now() is for the I/O thread's hooks"
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            if not self.immediate:
                log.warning("broker %s not reachable; dropped an outgoing message",
                            self.endpoint)
            return False

    def _run(self) -> None:
        try:
            self._next_beat = time.monotonic() + self.heartbeat  # on_connect() greets first
            self._dial()
            if self._serve():
                self._flush()
                self._close(linger=self.linger)
        except Exception:
            log.exception("the link to the broker %s failed", self.endpoint)
        finally:
            self._close(linger=0)  # after an error: a context with open sockets never ends

    def _serve(self) -> bool:
        """Exchange messages until stop(). False when stopped while waiting to redial: the
        broker is unreachable, so there is nothing to flush."""
        while not self._stop.is_set():
            events = self._poll()
            now = time.monotonic()
            if self._monitor is not None and self._monitor in events:
                self._read_monitor()  # first: a reconnection colours the messages after it
            if self._sock in events:
                self._receive()
            if self._wake_r.fileno() in events:
                _drain(self._wake_r)
            self._flush()
            self._due = self.peer.on_tick(now)
            if now >= self._next_beat:
                self._beat(now)
            if self.redial and now >= self._silent_at() and not self._redial():
                return False
        return True

    def _poll(self) -> dict[Any, int]:
        """Wait for a message, a wake-up, or the next thing due."""
        until = min(self._next_beat, math.inf if self._due is None else self._due,
                    self._silent_at() if self.redial else math.inf)
        wait_ms = math.ceil(max(0.0, until - time.monotonic()) * 1000)
        return dict(self._poller.poll(wait_ms))

    def _dial(self) -> None:
        """Open a fresh socket to the broker and let the peer greet it."""
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        for option, value in self._options.items():
            sock.setsockopt(option, value)
        if self._watch:
            self._monitor = sock.get_monitor_socket(self._watch)
        self._connections = 0
        sock.connect(self.endpoint)
        self._poller = zmq.Poller()
        for watched in (sock, self._wake_r, self._monitor):
            if watched is not None:
                self._poller.register(watched, zmq.POLLIN)
        self._dialed_at = time.monotonic()
        self.peer.on_connect()

    def _close(self, *, linger: float) -> None:
        """Close the socket and its monitor: a context with open sockets never terminates."""
        if self._monitor is not None:
            if self._sock is not None and not self._sock.closed:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=int(linger * 1000))
            self._sock = None

    def _silent_at(self) -> float:
        """When the broker will have been silent too long on the current socket."""
        return max(self.last_heard, self._dialed_at) + self.heartbeat * self.liveness

    def _redial(self) -> bool:
        """Give up the socket the broker went silent on and dial again after a back-off;
        False when stopped meanwhile."""
        log.warning("broker silent for %.1f s; reconnecting to %s",
                    self.heartbeat * self.liveness, self.endpoint)
        self._close(linger=0)
        self.answered.clear()
        # stop() interrupts the back-off, so a peer stopping while the broker is away still
        # ends within stop()'s timeout.
        if self._stop.wait(self._backoff * random.uniform(0.5, 1.0)):
            return False
        self._backoff = min(self._backoff * 2, 10 * self.heartbeat)
        self._dial()
        return True

    def _read_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_CONNECTED:
                # Ask at once: the answer names the broker's incarnation. A connection made
                # again lost whatever the broker sent while we were cut off.
                self._connections += 1
                self._next_beat = 0.0
                self._rejoined = self._rejoined or self._connections > 1
            elif self.on_refused is not None:
                self.on_refused(event)

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames)
            except ProtocolError as exc:  # garbage proves nothing about the broker
                self._drop("the broker", str(exc))
                continue
            self._heard(msg.get("incarnation"))
            self.peer.on_message(msg)

    def _heard(self, incarnation: str | None) -> None:
        """Push the liveness clock; tell the peer once about a broker that may not know it."""
        self.last_heard = time.monotonic()
        self._backoff = self.heartbeat
        self.answered.set()
        # A broker from before incarnations names none: that is never taken for a restart.
        restarted = None not in (incarnation, self._incarnation) and \
            incarnation != self._incarnation
        if restarted:
            log.warning("broker %s restarted (incarnation %s, was %s)",
                        self.endpoint, incarnation, self._incarnation)
        if incarnation is not None:
            self._incarnation = incarnation
        if restarted or self._rejoined:
            self._rejoined = False
            self.peer.on_new_broker()

    def _beat(self, now: float) -> None:
        frames = self.peer.on_beat()
        self._flush()
        self.send_now(frames)
        self._next_beat = now + self.heartbeat

    def _flush(self) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            self.send_now(frames)


def _socket_options(max_frame: int | None, curve: CurveKeys | None, immediate: bool,
                    reconnect_max: float | None) -> dict[int, int | bytes]:
    """The options of every socket a connection opens."""
    options: dict[int, int | bytes] = {zmq.LINGER: 0}
    if max_frame is not None:
        options[zmq.MAXMSGSIZE] = max_frame
    if immediate:
        options[zmq.IMMEDIATE] = 1
    if reconnect_max is not None:
        options[zmq.RECONNECT_IVL_MAX] = int(reconnect_max * 1000)
    if curve is not None:
        options[zmq.CURVE_SERVERKEY] = curve.server_public
        options[zmq.CURVE_PUBLICKEY] = curve.public
        options[zmq.CURVE_SECRETKEY] = curve.secret
    return options


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass
