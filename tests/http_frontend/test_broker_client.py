"""The frontend's BrokerClient against a broker the test plays by hand on a real socket."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from broker import protocol
from broker.protocol import ImageInfo, JobSpec, Message, MsgType
from http_frontend import broker_client
from http_frontend.broker_client import BrokerClient
from http_frontend.errors import JobError
from http_frontend.pending import PendingJob
from tests.broker.fakes import make_spec
from tests.cluster import wait_until

PNG = b"\x89PNG\r\n\x1a\n" + b"rest of a png"

pytestmark = pytest.mark.timeout(30)


class HandBroker:
    """A ROUTER the test drives: it answers STATUS with its incarnation and records SUBMITs."""

    def __init__(self, ctx: zmq.Context, incarnation: str | None = "first", *,
                 endpoint: str = "tcp://127.0.0.1:*") -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.incarnation = incarnation
        self.client: bytes | None = None
        self.submitted: list[str] = []
        self.cancelled: list[tuple[str, str | None]] = []

    def pump(self, seconds: float = 0.05) -> None:
        """Read what arrives for ``seconds``, answering STATUS as a broker would."""
        deadline = time.monotonic() + seconds
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            identity, *frames = self.sock.recv_multipart()
            self.client = identity
            msg = protocol.decode(frames)
            if msg.type is MsgType.STATUS:
                self.send(MsgType.STATUS_REPLY, {"workers": [], "queues": {}})
            elif msg.type is MsgType.SUBMIT:
                self.submitted.append(msg["job"].id)
                self.send(MsgType.ACCEPTED, {"job_id": msg["job"].id, "position": 0})
            elif msg.type is MsgType.CANCEL:
                self.cancelled.append((msg["job_id"], msg.get("owner")))

    def send(self, msg_type: MsgType, fields: dict[str, Any], payloads: tuple = ()) -> None:
        assert self.client is not None
        self.send_frames(protocol.encode(msg_type, {**fields, "incarnation": self.incarnation},
                                         payloads))

    def send_frames(self, frames: list[Any]) -> None:
        self.sock.send_multipart([self.client, *frames])


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def hand(ctx: zmq.Context) -> HandBroker:
    return HandBroker(ctx)


@pytest.fixture
def client(ctx: zmq.Context, hand: HandBroker) -> Iterator[BrokerClient]:
    made = BrokerClient(hand.endpoint, owner="frontend-a", heartbeat=0.2, context=ctx)
    made.start()
    drive(hand, lambda: made.connected)
    yield made
    made.close()


def _try_bind(ctx: zmq.Context, endpoint: str) -> HandBroker | None:
    try:
        return HandBroker(ctx, endpoint=endpoint)
    except zmq.ZMQError:  # the closed socket lets go of its port in the background
        return None


def drive(hand: HandBroker, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Play the broker until ``condition`` holds."""
    wait_until(lambda: (hand.pump(0.02), condition())[1], timeout, "the broker client")


def result(spec: JobSpec, payloads: list[bytes], fmt: str = "png") -> list[Any]:
    images = [ImageInfo(seed=s, width=spec.width, height=spec.height, format=fmt)
              for s in spec.seeds]
    return protocol.result(spec.id, images, payloads)


def outcome(pending: PendingJob, timeout: float = 5.0) -> Any:
    """The job's RESULT or JobError, once it ends (a follower's wait, as request threads do)."""
    deadline, cursor = time.monotonic() + timeout, 0
    while not pending.done and time.monotonic() < deadline:
        _, cursor = pending.events_after(cursor, deadline - time.monotonic())
    assert pending.done, f"job {pending.job_id} did not end within {timeout} s"
    return pending.outcome


def test_a_job_that_cannot_be_encoded_is_answered_and_never_waits(
        client: BrokerClient, hand: HandBroker) -> None:
    bad = make_spec("bad", prompt="lone \ud800 surrogate")
    pending = client.submit(bad)
    assert pending.done and pending.error is not None and pending.error.code == "invalid_request"
    # It never joined the waiting jobs: a broker restart resubmits only the good one...
    good = client.submit(make_spec("good"))
    drive(hand, lambda: hand.submitted == ["good"])
    hand.incarnation = "second"
    hand.send(MsgType.STATUS_REPLY, {"workers": [], "queues": {}})
    drive(hand, lambda: hand.submitted == ["good", "good"])
    # ...and the connection thread lives on to deliver its answer.
    assert client.alive
    hand.send_frames(result(good.spec, [PNG]))
    assert outcome(good).type is MsgType.RESULT


def test_a_new_broker_incarnation_resubmits_every_waiting_job_at_once(
        client: BrokerClient, hand: HandBroker) -> None:
    jobs = [client.submit(make_spec(f"j{i}", timeout=60.0)) for i in range(3)]
    drive(hand, lambda: len(hand.submitted) == 3)
    answered = jobs[0]
    hand.send_frames(result(answered.spec, [PNG]))
    outcome(answered)
    # A broker restarted faster than any heartbeat could miss: only its id is new.
    hand.incarnation = "second"
    hand.send(MsgType.HEARTBEAT, {})
    drive(hand, lambda: sorted(hand.submitted[3:]) == ["j1", "j2"])
    assert client.connected


def test_the_same_incarnation_resubmits_nothing(client: BrokerClient, hand: HandBroker) -> None:
    client.submit(make_spec("j1"))
    drive(hand, lambda: hand.submitted == ["j1"])
    for _ in range(5):
        hand.send(MsgType.STATUS_REPLY, {"workers": [], "queues": {}})
    hand.pump(0.6)  # three status polls
    assert hand.submitted == ["j1"]


def test_a_reconnection_resubmits_waiting_jobs(ctx: zmq.Context) -> None:
    # The broker went away and came back at the same address (a new socket is a new TCP
    # connection): answers it sent meanwhile are lost, so waiting jobs go again.
    hand = HandBroker(ctx)
    endpoint = hand.endpoint
    client = BrokerClient(endpoint, owner="frontend-a", heartbeat=0.2, context=ctx)
    client.start()
    try:
        drive(hand, lambda: client.connected)
        client.submit(make_spec("j1", timeout=60.0))
        drive(hand, lambda: hand.submitted == ["j1"])
        hand.sock.close(linger=0)
        # A job that arrives while the broker is away (before it is missed) waits for it.
        late = client.submit(make_spec("j2", timeout=60.0))
        assert not late.done
        # The same id: an old broker, or one the network hid for a while.
        again = wait_until(lambda: _try_bind(ctx, endpoint), 5.0, "the port to be free")
        drive(again, lambda: sorted(again.submitted) == ["j1", "j2"])
    finally:
        client.close()


def test_cancel_names_the_owner(client: BrokerClient, hand: HandBroker) -> None:
    client.submit(make_spec("j1"))
    client.cancel("j1")
    drive(hand, lambda: hand.cancelled == [("j1", "frontend-a")])


def test_a_job_nobody_answers_is_answered_at_its_deadline(
        client: BrokerClient, hand: HandBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_client, "EXPIRY_SLACK", 0.1)
    pending = client.submit(make_spec("silent", timeout=0.3))
    drive(hand, lambda: pending.done)
    assert pending.error is not None
    assert (pending.error.code, pending.error.retryable) == ("timeout", False)


@pytest.mark.parametrize("fmt, payloads, why", [
    ("png", [b"GIF89a not a png"], "not png"),
    ("jpeg", [PNG], "not png"),  # the worker says jpeg for a png job
    ("png", [PNG, PNG], "2 image(s) for 1"),
])
def test_a_result_that_does_not_match_its_job_is_a_worker_error(
        client: BrokerClient, hand: HandBroker, fmt: str, payloads: list[bytes],
        why: str) -> None:
    spec = make_spec("j1")
    pending = client.submit(spec)
    drive(hand, lambda: hand.submitted == ["j1"])
    images = [ImageInfo(seed=7, width=64, height=64, format=fmt) for _ in payloads]
    hand.send_frames(protocol.result("j1", images, payloads))
    error = outcome(pending)
    assert isinstance(error, JobError) and error.code == "worker_error"
    assert why in error.message


def test_an_error_handling_one_message_does_not_end_the_thread(
        client: BrokerClient, hand: HandBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Message] = []
    original = client._deliver

    def fails_once(msg: Message) -> None:
        calls.append(msg)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        original(msg)

    monkeypatch.setattr(client, "_deliver", fails_once)
    pending = client.submit(make_spec("j1"))
    drive(hand, lambda: hand.submitted == ["j1"])  # its ACCEPTED hit the bug
    hand.send_frames(result(pending.spec, [PNG]))
    assert outcome(pending).type is MsgType.RESULT
    assert client.alive


def test_an_old_broker_without_incarnations_still_serves(ctx: zmq.Context) -> None:
    from tests.broker.test_mixed_versions import OLD

    hand = HandBroker(ctx, incarnation=None)
    client = BrokerClient(hand.endpoint, owner="frontend-a", heartbeat=0.2, context=ctx)
    client.start()
    try:
        drive(hand, lambda: client.connected)
        pending = client.submit(make_spec("old-job", timeout=300.0))
        drive(hand, lambda: hand.submitted == ["old-job"])
        hand.send_frames(OLD["broker_accepted"])
        hand.send_frames(OLD["worker_result"])  # the broker relays a worker's RESULT as it came
        assert outcome(pending).type is MsgType.RESULT
        hand.pump(0.6)
        assert hand.submitted == ["old-job"]  # no incarnation: nothing is taken for a restart
    finally:
        client.close()
