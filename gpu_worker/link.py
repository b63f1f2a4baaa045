"""The worker's link to the broker: READY, held jobs, CURVE and its handler, on the transport.

The transport (``broker.connection``) owns the DEALER socket and its I/O thread: it heartbeats
while the main thread runs long jobs, reconnects with capped back-off when the broker goes
silent, and notices a broker restart. On top of it the link registers (READY, with the jobs
the handler holds) on every new socket and at once with a restarted broker, explains a broker
that refuses it, hands what the broker sends to a handler, and sends what other threads queue.
It only carries messages: which jobs the worker holds, and which are cancelled, is the
handler's business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from broker import defaults, protocol
from broker.connection import Connection, CurveKeys
from broker.protocol import JobSpec, Message, MsgType, WorkerStats

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # at stop, how long the last answers and BYE may take to reach the broker


class LinkHandler(Protocol):
    """What the link tells the worker, and asks it; called on the link's I/O thread."""

    def on_jobs(self, batch: list[JobSpec], inputs: Sequence[Any] = ()) -> None:
        """Take a batch the broker leased to this worker (a JOBS message), with its edits'
        input frames."""

    def on_cancel(self, job_id: str) -> None:
        """Note that the broker cancelled a job (a CANCEL message)."""

    def held(self) -> list[str]:
        """Return the ids of every job received and not yet answered, running or waiting."""


class BrokerLink:
    def __init__(self, endpoint: str, ready_fields: dict[str, Any], *, handler: LinkHandler,
                 heartbeat: float = defaults.HEARTBEAT_INTERVAL,
                 liveness: int = defaults.HEARTBEAT_LIVENESS, max_frame: int = 1 << 20,
                 curve: CurveKeys | None = None,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 stats: Callable[[], WorkerStats | None] | None = None,
                 loras: Callable[[], dict[str, Any]] | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.ready_fields = ready_fields  # READY is these plus `held`, built at each send
        self.handler = handler
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_frame = max_frame
        self.stats = stats  # the worker's measurements, taken for each heartbeat
        self.loras = loras  # the LoRA adapters it can apply, as they are when READY or beating
        self._last_ready = float("-inf")  # when READY was last sent (monotonic)
        self._ready_due: float | None = None  # when a READY held back by the rate limit is due
        self._refused = protocol.DropLog(log, "the broker refused this worker at")
        # Without a context the link owns one: stop() terminates it, which is what waits for
        # the last answers and BYE to leave. The broker must get them: a BYE hands back held
        # jobs at once, not after missed heartbeats.
        self._conn = Connection(
            endpoint, self, name="broker-link", heartbeat=heartbeat, liveness=liveness,
            max_frame=max_frame, curve=curve, context=context, linger=FLUSH_SECONDS,
            on_refused=self._explain_refusal)
        self.connected = self._conn.answered  # set once the broker answered the current socket

    # ---------------------------------------------------------------- called from any thread

    def start(self) -> None:
        self._conn.start()

    def stop(self, *, bye: bool = True, timeout: float = 2.0) -> None:
        if bye:
            self.send(protocol.encode(MsgType.BYE))
        self._conn.stop(timeout=timeout)

    @property
    def alive(self) -> bool:
        """Whether the I/O thread runs (it ends at stop(), or on an error it logged)."""
        return self._conn.alive

    def send(self, frames: list[Any]) -> None:
        self._conn.send(frames)

    # ---------------------------------------------------------------- the transport's hooks

    def on_connect(self) -> None:
        self._register(force=True)  # a new socket: nobody has heard from it yet

    def on_message(self, msg: Message) -> None:
        if msg.type is MsgType.JOBS:
            self.handler.on_jobs(list(msg["jobs"]), msg.payloads)
        elif msg.type is MsgType.CANCEL:
            self.handler.on_cancel(msg["job_id"])
        elif msg.type is MsgType.RECONNECT:
            log.info("broker asked us to register again")
            self._register()
        elif msg.type is not MsgType.HEARTBEAT:
            log.warning("dropped unexpected %s from the broker", msg.type.value)

    def on_new_broker(self) -> None:
        """Register at once with a broker that restarted, rather than after its silence."""
        log.info("registering again with broker %s", self.endpoint)
        self._register(owed=True)

    def on_beat(self) -> list[Any]:
        """A HEARTBEAT listing the jobs held; the transport sends the answers queued before
        the list first, so a job missing from it was answered, and the broker has that answer
        before it reads the list. With the worker's stats, measured now."""
        fields: dict[str, Any] = {"running": self.handler.held()}
        stats = self.stats() if self.stats is not None else None
        if stats is not None:
            fields["stats"] = stats
        return protocol.encode(MsgType.HEARTBEAT, {**fields, **self._loras()})

    def _loras(self) -> dict[str, Any]:
        """``{"loras": ...}`` for READY and heartbeats; nothing when the worker has no LoRA
        folder, or its listing failed (logged: a heartbeat without it beats none)."""
        if self.loras is None:
            return {}
        try:
            return {"loras": self.loras()}
        except Exception:
            log.exception("listing the LoRA adapters failed")
            return {}

    def on_tick(self, now: float) -> float | None:
        if self._ready_due is not None and now >= self._ready_due:
            self._register(owed=True)
        return self._ready_due

    def _explain_refusal(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = (f"our key {self.curve.public.decode() if self.curve else ''} is not on "
                      "its allow-list (copy NAME.key into the broker's keys/workers/)")
        elif self.curve is None:
            reason = "it probably requires CURVE: pass --broker-key and --key"
        else:
            reason = "the CURVE handshake failed: check --broker-key is the broker's broker.key"
        self._refused(self.endpoint, reason)

    def _register(self, *, force: bool = False, owed: bool = False) -> None:
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
        # Sent at once, before any queued answers: a broker drops answers from a worker it
        # does not know.
        fields = {**self.ready_fields, "held": self.handler.held(), **self._loras()}
        self._conn.send_now(protocol.encode(MsgType.READY, fields))
