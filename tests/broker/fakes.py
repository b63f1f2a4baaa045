"""Fakes for the broker tests: a fake clock, fake workers and clients on real sockets."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from broker import protocol
from broker.broker import Broker, BrokerConfig
from broker.protocol import JobSpec, Message, MsgType

MODEL = "tiny"


def make_spec(job_id: str = "job-1", **overrides: Any) -> JobSpec:
    """Return a small valid JobSpec; keyword arguments override its fields."""
    values: dict[str, Any] = dict(id=job_id, model=MODEL, prompt="a lighthouse", width=64,
                                  height=64, steps=2, seeds=(7,))
    values.update(overrides)
    return JobSpec(**values)


def plain(msg: Message) -> dict[str, Any]:
    """A message's fields without the broker's incarnation, which is random per broker."""
    return {k: v for k, v in msg.fields.items() if k != "incarnation"}


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Peer:
    """A DEALER socket that speaks the protocol to the broker, as a frontend or a worker does."""

    def __init__(self, ctx: zmq.Context, endpoint: str, pump: Callable[[], None], *,
                 identity: bytes | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)
        self.identity = identity
        self._pump = pump

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames)

    def send_msg(self, msg_type: MsgType, fields: dict[str, Any] | None = None,
                 payloads: list[bytes] | tuple[bytes, ...] = ()) -> None:
        self.send(protocol.encode(msg_type, fields, payloads))

    def poll_msg(self) -> Message | None:
        """Return a message if one is waiting, without driving the broker."""
        try:
            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        return protocol.decode(frames)

    def recv(self, timeout: float = 5.0, *, skip: tuple[MsgType, ...] = (MsgType.HEARTBEAT,),
             between: Callable[[], None] | None = None) -> Message:
        """Return the next message not in ``skip``, driving the broker while waiting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump()
            if between is not None:
                between()
            msg = self.poll_msg()
            if msg is None:
                self.sock.poll(5)
            elif msg.type not in skip:
                return msg
        raise AssertionError(f"no message within {timeout} s")

    def expect(self, msg_type: MsgType, timeout: float = 5.0, **kwargs: Any) -> Message:
        """The next message of ``msg_type``, past queue-position updates (repeat ACCEPTEDs)."""
        msg = self.recv(timeout, **kwargs)
        while msg.type is MsgType.ACCEPTED and msg_type is not MsgType.ACCEPTED:
            msg = self.recv(timeout, **kwargs)
        assert msg.type is msg_type, f"expected {msg_type.value}, got {msg}"
        return msg

    def assert_silent(self, wait: float = 0.1, *,
                      skip: tuple[MsgType, ...] = (MsgType.HEARTBEAT,)) -> None:
        """Drive the broker for ``wait`` seconds and fail on any message not in ``skip``."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self._pump()
            msg = self.poll_msg()
            if msg is None:
                self.sock.poll(5)
            else:
                assert msg.type in skip, f"unexpected {msg}"

    def close(self) -> None:
        self.sock.close(linger=0)


class FakeClient(Peer):
    """A frontend: submits jobs and reads the answers. ``owner`` is its stable id (None: an
    old frontend that sends none, whose jobs belong to its connection)."""

    owner: str | None = None

    def submit(self, spec: JobSpec, inputs: list[bytes] | None = None, **recv: Any) -> Message:
        """Submit ``spec`` (with an edit's ``inputs`` frames) and return the broker's first
        answer (ACCEPTED or FAILED)."""
        self.send(protocol.submit(spec, self.owner, inputs or ()))
        msg = self.recv(**recv)
        assert msg.type in (MsgType.ACCEPTED, MsgType.FAILED), msg
        assert msg["job_id"] == spec.id
        return msg

    def cancel(self, job_id: str) -> None:
        self.send_msg(MsgType.CANCEL, {"job_id": job_id, "owner": self.owner})


class FakeWorker(Peer):
    """A GPU worker without a GPU: the test decides what it answers and when."""

    def ready(self, worker_id: str = "w", *, models: tuple[str, ...] = (MODEL,),
              capacity: int = 1, max_batch: int = 1, held: list[str] | None = None,
              heartbeat: float | None = None, loras: dict[str, Any] | None = None) -> None:
        self.worker_id = worker_id
        fields: dict[str, Any] = {
            "worker_id": worker_id, "host": "testhost", "device": "cpu",
            "models": list(models), "capacity": capacity, "max_batch": max_batch,
            "version": "test", "model_info": {m: {"max_steps": 50} for m in models},
            "session": f"session-of-{worker_id}",
        }
        if held is not None:
            fields["held"] = held
        if heartbeat is not None:
            fields["heartbeat"] = heartbeat
        if loras is not None:
            fields["loras"] = loras
        self.send_msg(MsgType.READY, fields)

    def take(self, timeout: float = 5.0, **kwargs: Any) -> list[JobSpec]:
        """Wait for the next JOBS message and return its job specs."""
        return list(self.expect(MsgType.JOBS, timeout, **kwargs)["jobs"])

    def result(self, spec: JobSpec, payloads: list[bytes] | None = None, **kwargs: Any) -> None:
        payloads = payloads if payloads is not None else [f"png:{s}".encode() for s in spec.seeds]
        images = [protocol.ImageInfo(seed=s, width=spec.width, height=spec.height, format="png")
                  for s in spec.seeds]
        self.send(protocol.result(spec.id, images, payloads, **kwargs))

    def heartbeat(self, **fields: Any) -> None:
        self.send_msg(MsgType.HEARTBEAT, {"running": [], **fields})


class BrokerHarness:
    """A real Broker on ephemeral TCP ports, driven with ``tick()`` and a fake clock."""

    def __init__(self, ctx: zmq.Context, **config: Any) -> None:
        self.ctx = ctx
        self.clock = FakeClock()
        config = {"clients": "tcp://127.0.0.1:*", "workers": "tcp://127.0.0.1:*", **config}
        self.broker = Broker(BrokerConfig(**config), ctx, clock=self.clock)
        self.broker.bind()
        self.clients_endpoint = self.broker.client_endpoint
        self.workers_endpoint = self.broker.worker_endpoint
        self.consumed: Counter[str] = Counter()  # messages the broker read, handled or dropped
        self._peers: list[Peer] = []
        self._count_consumed()

    def _count_consumed(self) -> None:
        """Wrap the broker's receive step so tests can wait until it has read a message."""
        original = self.broker._recv

        def counting(sock: zmq.Socket, handler: Any) -> bool:
            got = original(sock, handler)
            if got:
                self.consumed["workers" if sock is self.broker.worker_socket else "clients"] += 1
            return got

        self.broker._recv = counting  # type: ignore[method-assign]

    def pump(self) -> None:
        self.broker.tick(timeout=0.002)

    def client(self, owner: str | None = None) -> FakeClient:
        peer = FakeClient(self.ctx, self.clients_endpoint, self.pump)
        peer.owner = owner
        self._peers.append(peer)
        return peer

    def worker(self, worker_id: str = "w", **ready: Any) -> FakeWorker:
        """Connect a fake worker, send READY and wait until the broker has registered it."""
        peer = self.raw_worker(worker_id.encode())
        peer.ready(worker_id, **ready)
        self.wait_for(lambda: self.broker.workers.get(peer.identity) is not None)
        return peer

    def raw_worker(self, identity: bytes) -> FakeWorker:
        peer = FakeWorker(self.ctx, self.workers_endpoint, self.pump, identity=identity)
        self._peers.append(peer)
        return peer

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            self.pump()

    @contextlib.contextmanager
    def consumes(self, *, workers: int = 0, clients: int = 0) -> Iterator[None]:
        """Wait on exit until the broker has read this many more messages on each socket."""
        want = Counter(workers=self.consumed["workers"] + workers,
                       clients=self.consumed["clients"] + clients)
        yield
        self.wait_for(lambda: all(self.consumed[k] >= n for k, n in want.items()))

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
        self.broker.close()


class LiveBroker:
    """A real Broker running ``run()`` in a background thread on the real clock."""

    def __init__(self, ctx: zmq.Context, **config: Any) -> None:
        self.ctx = ctx
        config = {"clients": "tcp://127.0.0.1:*", "workers": "tcp://127.0.0.1:*", **config}
        self.broker = Broker(BrokerConfig(**config), ctx)
        self.broker.bind()
        self.clients_endpoint = self.broker.client_endpoint
        self.workers_endpoint = self.broker.worker_endpoint
        self.thread = threading.Thread(target=self.broker.run, name="broker", daemon=True)
        self._peers: list[Peer] = []
        self.thread.start()

    def client(self) -> FakeClient:
        peer = FakeClient(self.ctx, self.clients_endpoint, lambda: None)
        self._peers.append(peer)
        return peer

    def worker(self, identity: bytes) -> FakeWorker:
        peer = FakeWorker(self.ctx, self.workers_endpoint, lambda: None, identity=identity)
        self._peers.append(peer)
        return peer

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(5.0)
        assert not self.thread.is_alive(), "broker loop did not stop"
        for peer in self._peers:
            peer.close()
