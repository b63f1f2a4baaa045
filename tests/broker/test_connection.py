"""The transport both peers share, against a real ROUTER the test plays by hand.

Its users' tests (tests/gpu_worker/test_link.py, tests/http_frontend/test_broker_client.py)
cover what they build on it: READY and its rate limit, CURVE refusals, resubmission, expiry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from broker import protocol
from broker.connection import Connection
from broker.protocol import Message, MsgType
from tests.cluster import wait_until

pytestmark = pytest.mark.timeout(30)


class RecordingPeer:
    """A peer that greets with HELLO (a STATUS), beats with HEARTBEAT and records its hooks."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.connects = 0
        self.messages: list[Message] = []
        self.new_brokers = 0
        self.threads: set[str] = set()
        self.due: float | None = None  # what on_tick returns
        self.ticks: list[float] = []
        self.fail_on: MsgType | None = None
        self.send_while_beating: list[Any] | None = None  # what on_beat queues, once

    def on_connect(self) -> None:
        assert self.conn is not None
        self.connects += 1
        self.conn.send_now(protocol.encode(MsgType.STATUS))

    def on_message(self, msg: Message) -> None:
        self.threads.add(threading.current_thread().name)
        if msg.type is self.fail_on:
            raise RuntimeError("a bug in the peer")
        self.messages.append(msg)

    def on_new_broker(self) -> None:
        self.new_brokers += 1

    def on_beat(self) -> list[Any]:
        if self.send_while_beating is not None:
            assert self.conn is not None
            self.conn.send(self.send_while_beating)
            self.send_while_beating = None
        return protocol.encode(MsgType.HEARTBEAT, {"running": []})

    def on_tick(self, now: float) -> float | None:
        self.ticks.append(now)
        if self.due is not None and now >= self.due:
            self.due = None  # done: the loop must not spin on a time gone by
        return self.due


class Router:
    """A ROUTER the test drives by hand, as a broker (or a restarted one) would."""

    def __init__(self, ctx: zmq.Context, endpoint: str = "tcp://127.0.0.1:*") -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer: bytes | None = None  # who spoke last
        self.peers: list[bytes] = []  # routing ids, in the order they first spoke

    def recv(self, timeout: float = 5.0) -> Message | None:
        """The next message, or None after ``timeout``."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        self.peer, *frames = self.sock.recv_multipart()
        if self.peer not in self.peers:
            self.peers.append(self.peer)
        return protocol.decode(frames)

    def expect(self, msg_type: MsgType, timeout: float = 5.0) -> Message:
        """The next message of ``msg_type``, past others."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None and msg.type is msg_type:
                return msg
        raise AssertionError(f"no {msg_type.value} within {timeout} s")

    def collect(self, msg_type: MsgType, seconds: float) -> list[Message]:
        """Every message of ``msg_type`` in the next ``seconds``."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None and msg.type is msg_type:
                got.append(msg)
        return got

    def send(self, msg_type: MsgType, fields: dict[str, Any] | None = None) -> None:
        self.send_frames(protocol.encode(msg_type, fields))

    def send_frames(self, frames: list[Any]) -> None:
        assert self.peer is not None, "nobody has spoken yet"
        self.sock.send_multipart([self.peer, *frames])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def router(zmq_ctx: zmq.Context) -> Iterator[Router]:
    made = Router(zmq_ctx)
    yield made
    made.close()


@pytest.fixture
def connect(zmq_ctx: zmq.Context) -> Iterator[Callable[..., tuple[Connection, RecordingPeer]]]:
    made: list[Connection] = []

    def start(endpoint: str, **options: Any) -> tuple[Connection, RecordingPeer]:
        peer = RecordingPeer()
        options.setdefault("context", zmq_ctx)
        conn = peer.conn = Connection(endpoint, peer, name="test-conn", **options)
        made.append(conn)
        conn.start()
        return conn, peer

    yield start
    for conn in made:
        conn.stop(timeout=2.0)


def test_sends_from_other_threads_arrive_in_order_without_waiting_for_a_beat(
        router: Router, connect) -> None:
    conn, _ = connect(router.endpoint, heartbeat=30.0)
    router.expect(MsgType.STATUS)  # on_connect's greeting goes first

    def sender(name: str) -> None:
        for i in range(20):
            conn.send(protocol.encode(MsgType.CANCEL, {"job_id": f"{name}-{i}"}))

    started = time.monotonic()
    threads = [threading.Thread(target=sender, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = [router.expect(MsgType.CANCEL)["job_id"] for _ in range(40)]
    assert time.monotonic() - started < 5.0  # the wake-up pipe, not a 30 s heartbeat
    for name in "ab":
        assert [job for job in got if job.startswith(name)] == [f"{name}-{i}" for i in range(20)]


def test_heartbeats_go_every_interval_after_what_was_queued(router: Router, connect) -> None:
    _, peer = connect(router.endpoint, heartbeat=0.2, redial=False)  # nobody answers
    router.expect(MsgType.STATUS)
    router.expect(MsgType.HEARTBEAT)
    started = time.monotonic()
    router.expect(MsgType.HEARTBEAT)
    router.expect(MsgType.HEARTBEAT)
    assert 0.2 <= time.monotonic() - started < 1.5
    # Queued while the heartbeat was made (a worker's answer as it lists its jobs): the
    # broker must read it before the heartbeat.
    peer.send_while_beating = protocol.encode(MsgType.CANCEL, {"job_id": "answered"})
    got = [router.recv(), router.recv()]
    assert [m.type for m in got if m] == [MsgType.CANCEL, MsgType.HEARTBEAT]


def test_messages_reach_the_peer_on_the_io_thread_and_push_the_liveness_clock(
        router: Router, connect) -> None:
    conn, peer = connect(router.endpoint, heartbeat=0.3)
    router.expect(MsgType.STATUS)
    assert not conn.connected and not conn.answered.is_set()
    router.send(MsgType.HEARTBEAT)
    wait_until(lambda: peer.messages, 5.0, "the heartbeat to reach the peer")
    assert conn.connected and conn.answered.is_set()
    assert peer.threads == {"test-conn"}
    wait_until(lambda: not conn.connected, 5.0, "three silent heartbeats")


def test_garbage_is_dropped_and_logged_and_proves_nothing(router: Router, connect,
                                                          caplog) -> None:
    conn, peer = connect(router.endpoint, heartbeat=0.3)
    router.expect(MsgType.STATUS)
    with caplog.at_level(logging.WARNING, logger="broker.connection"):
        router.send_frames([b"\xc1 not msgpack"])
        router.send(MsgType.HEARTBEAT, {"incarnation": "after-garbage"})
        wait_until(lambda: peer.messages, 5.0, "the valid message after the garbage")
    assert "dropped a message from the broker" in caplog.text
    assert [m.type for m in peer.messages] == [MsgType.HEARTBEAT] and conn.alive


def test_a_silent_broker_gets_a_fresh_socket_after_liveness_heartbeats(
        router: Router, connect, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="broker.connection"):
        conn, peer = connect(router.endpoint, heartbeat=0.2, liveness=2)
        router.expect(MsgType.STATUS)
        router.send(MsgType.HEARTBEAT)
        wait_until(lambda: conn.answered.is_set(), 5.0, "the broker's answer")
        silent_from = time.monotonic()
        router.expect(MsgType.STATUS, timeout=5.0)  # greeted again, on a new socket
    assert time.monotonic() - silent_from >= 0.4 - 0.05  # two heartbeats, then a back-off
    assert peer.connects == 2 and len(router.peers) == 2  # another routing id: a new socket
    assert not conn.answered.is_set()
    assert "broker silent for 0.4 s; reconnecting to" in caplog.text


def test_without_redial_the_socket_stays(router: Router, connect) -> None:
    _, peer = connect(router.endpoint, heartbeat=0.1, liveness=1, redial=False)
    router.expect(MsgType.STATUS)
    for _ in range(5):
        router.expect(MsgType.HEARTBEAT)
    assert peer.connects == 1 and len(router.peers) == 1


def test_a_new_incarnation_is_noticed_once(router: Router, connect) -> None:
    _, peer = connect(router.endpoint, heartbeat=5.0)
    router.expect(MsgType.STATUS)
    for incarnation in ["first", "first", None, "second", "second", None, "second"]:
        router.send(MsgType.HEARTBEAT, {"incarnation": incarnation} if incarnation else {})
    wait_until(lambda: len(peer.messages) == 7, 5.0, "every message")
    assert peer.new_brokers == 1  # the first seen is no restart; no incarnation is none


def test_a_connection_made_again_asks_at_once_and_is_noticed_once(zmq_ctx: zmq.Context,
                                                                  connect) -> None:
    router = Router(zmq_ctx)
    endpoint = router.endpoint
    conn, peer = connect(endpoint, heartbeat=3.0, redial=False, notice_reconnects=True,
                         reconnect_max=0.2)
    router.expect(MsgType.HEARTBEAT)  # asked at once when the connection is made
    router.send(MsgType.HEARTBEAT, {"incarnation": "same"})
    wait_until(lambda: peer.messages, 5.0, "the answer")
    assert peer.new_brokers == 0  # the first connection: nothing lost yet
    router.close()

    def rebind() -> Router | None:
        try:
            return Router(zmq_ctx, endpoint)
        except zmq.ZMQError:  # the closed socket lets go of its port in the background
            return None

    again = wait_until(rebind, 5.0, "the port to be free")
    try:
        again.expect(MsgType.HEARTBEAT, timeout=1.5)  # not at the next beat, 3 s on
        again.send(MsgType.HEARTBEAT, {"incarnation": "same"})
        again.send(MsgType.HEARTBEAT, {"incarnation": "same"})
        wait_until(lambda: len(peer.messages) == 3, 5.0, "the answers")
        assert peer.new_brokers == 1 and peer.connects == 1
    finally:
        conn.stop()
        again.close()


def test_the_peer_sets_when_its_periodic_work_is_due(router: Router, connect) -> None:
    _, peer = connect(router.endpoint, heartbeat=30.0)
    router.expect(MsgType.STATUS)
    due = peer.due = time.monotonic() + 0.3
    # The loop learns the due time at its next wake-up (this message); then it wakes for it,
    # long before the next heartbeat.
    router.send(MsgType.HEARTBEAT)
    wait_until(lambda: peer.due is None, 5.0, "a tick at the due time")
    assert any(due <= tick < due + 1.0 for tick in peer.ticks)


def test_stop_sends_what_is_queued_even_to_a_broker_that_comes_late(
        zmq_ctx: zmq.Context) -> None:
    # Only a connection with its own context waits (up to ``linger``) for the last messages.
    router = zmq_ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    router.unbind(f"tcp://127.0.0.1:{port}")
    peer = RecordingPeer()
    conn = peer.conn = Connection(f"tcp://127.0.0.1:{port}", peer, name="test-conn",
                                  heartbeat=5.0, linger=1.0)
    conn.start()
    for i in range(3):
        conn.send(protocol.encode(MsgType.CANCEL, {"job_id": f"last-{i}"}))
    binder = threading.Timer(0.3, router.bind, args=(f"tcp://127.0.0.1:{port}",))
    binder.start()
    started = time.monotonic()
    conn.stop(timeout=3.0)
    assert time.monotonic() - started < 2.5  # bounded by the linger, not a hang
    binder.join()
    got = []
    while len(got) < 4 and router.poll(2000):
        got.append(protocol.decode(router.recv_multipart()[1:]))
    assert [(m.type, m.get("job_id")) for m in got] == [
        (MsgType.STATUS, None), *((MsgType.CANCEL, f"last-{i}") for i in range(3))]
    router.close(linger=0)


def test_stop_interrupts_the_back_off_before_a_redial(caplog) -> None:
    peer = RecordingPeer()
    conn = peer.conn = Connection("tcp://127.0.0.1:1", peer, name="test-conn", heartbeat=2.0,
                                  liveness=1, linger=1.0)
    with caplog.at_level(logging.WARNING, logger="broker.connection"):
        conn.start()
        wait_until(lambda: "reconnecting to tcp://127.0.0.1:1" in caplog.text, 6.0,
                   "the silence")
    started = time.monotonic()
    conn.stop()  # the back-off is 1-2 s and nothing is flushed: the broker is away
    assert time.monotonic() - started < 0.8 and not conn.alive


def test_a_peer_error_is_logged_and_ends_the_thread(router: Router, connect, caplog) -> None:
    conn, peer = connect(router.endpoint, heartbeat=0.3)
    peer.fail_on = MsgType.CANCEL
    router.expect(MsgType.STATUS)
    with caplog.at_level(logging.ERROR, logger="broker.connection"):
        router.send(MsgType.CANCEL, {"job_id": "a"})
        wait_until(lambda: not conn.alive, 5.0, "the I/O thread to end")
    assert f"the link to the broker {router.endpoint} failed" in caplog.text
    assert "a bug in the peer" in caplog.text


def test_an_endpoint_that_cannot_be_dialled_ends_the_thread_and_stop_still_returns(
        caplog) -> None:
    peer = RecordingPeer()
    conn = peer.conn = Connection("not-an-endpoint", peer, name="test-conn", linger=1.0)
    with caplog.at_level(logging.ERROR, logger="broker.connection"):
        conn.start()
        wait_until(lambda: not conn.alive, 5.0, "the I/O thread to end")
    assert "the link to the broker not-an-endpoint failed" in caplog.text
    started = time.monotonic()
    conn.stop()  # terminates its own context: no socket may be left open in it
    assert time.monotonic() - started < 1.0


def test_stop_before_start_is_harmless() -> None:
    Connection("tcp://127.0.0.1:1", RecordingPeer(), name="test-conn").stop()
