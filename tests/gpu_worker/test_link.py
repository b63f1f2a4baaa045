"""The worker's link: it explains a refusal instead of looking like a silent network, its last
messages reach the broker when it stops, it registers again at once with a restarted broker
(but not once per RECONNECT of a flood), and it hands what it receives to its handler."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import protocol
from broker.auth import create_keys, load_public, load_secret
from broker.connection import CurveKeys
from broker.protocol import ImageInfo, JobSpec, Message, MsgType
from gpu_worker.link import BrokerLink
from tests.broker.fakes import LiveBroker, make_spec
from tests.broker.test_connection import Router

READY = {"worker_id": "w", "host": "h", "device": "cpu", "models": ["tiny"]}


class FakeHandler:
    """The worker's side of the link: records what it is handed, and on which thread."""

    def __init__(self, held: list[str] | None = None) -> None:
        self.held_ids = list(held or [])
        self.batches: list[list[str]] = []
        self.cancels: list[str] = []
        self.threads: set[str] = set()
        self.got = threading.Event()

    def on_jobs(self, batch: list[JobSpec], inputs: Any = ()) -> None:
        self.threads.add(threading.current_thread().name)
        self.batches.append([job.id for job in batch])
        self.got.set()

    def on_cancel(self, job_id: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.cancels.append(job_id)
        self.got.set()

    def held(self) -> list[str]:
        return list(self.held_ids)


class BareBroker(Router):
    """A ROUTER the test drives by hand, counting the worker's READYs."""

    def readies_within(self, seconds: float) -> list[Message]:
        """Every READY the worker sends in the next ``seconds``."""
        return self.collect(MsgType.READY, seconds)


@pytest.fixture
def bare(ctx: zmq.Context) -> Iterator[BareBroker]:
    broker = BareBroker(ctx)
    yield broker
    broker.close()


@pytest.fixture
def start_link(ctx: zmq.Context) -> Iterator:
    links: list[BrokerLink] = []

    def start(endpoint: str, handler: FakeHandler, **kwargs) -> BrokerLink:
        links.append(BrokerLink(endpoint, READY, handler=handler, context=ctx, **kwargs))
        links[-1].start()
        return links[-1]

    yield start
    for link in links:
        link.stop(bye=False)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def wait_for_log(caplog, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in caplog.text:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("who, expected", [
    ("stranger", "is not on its allow-list"),
    ("plain", "requires CURVE"),
    ("alpha", None),
])
# The transport's own behaviour (back-off, redial, stop during a back-off) is tested in
# tests/broker/test_connection.py; these check what the link builds on it.


def test_refusals_are_explained(ctx: zmq.Context, tmp_path: Path, caplog, who: str,
                                expected: str | None) -> None:
    keys = tmp_path / "keys"
    create_keys(keys, ["alpha"])
    live = LiveBroker(ctx, curve_dir=str(keys), heartbeat_interval=0.2)
    server = load_public(keys / "broker.key")
    curve = {
        "alpha": CurveKeys(server, *load_secret(keys / "workers" / "alpha.key_secret")),
        "stranger": CurveKeys(server, *zmq.curve_keypair()),
        "plain": None,
    }[who]
    link = BrokerLink(live.workers_endpoint, READY, handler=FakeHandler(), heartbeat=0.2,
                      curve=curve, context=ctx)
    with caplog.at_level(logging.WARNING, logger="gpu_worker.link"):
        link.start()
        try:
            if expected is None:
                assert link.connected.wait(5), "an allowed key must get in"
                assert "refused" not in caplog.text
            else:
                assert wait_for_log(caplog, expected), caplog.text
                assert not link.connected.is_set()
        finally:
            link.stop(bye=False)
            live.stop()


def test_stop_delivers_the_last_answer_and_bye_even_to_a_slow_broker(ctx: zmq.Context) -> None:
    # A draining worker queues its last RESULT and BYE, then stops. Closing the socket must not
    # throw them away: here the broker binds only after stop() was called, so they can only
    # arrive if the link waits for them to leave.
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    router.unbind(f"tcp://127.0.0.1:{port}")
    link = BrokerLink(f"tcp://127.0.0.1:{port}", READY, handler=FakeHandler(),
                      heartbeat=5.0)  # its own context
    link.start()
    last = protocol.result("job-1", [ImageInfo(seed=1, width=8, height=8, format="png")],
                           [b"png bytes"])
    link.send(last)
    binder = threading.Timer(0.3, router.bind, args=(f"tcp://127.0.0.1:{port}",))
    binder.start()
    started = time.monotonic()
    link.stop(bye=True)
    assert time.monotonic() - started < 3.0  # bounded by FLUSH_SECONDS, not a hang
    binder.join()
    got = []
    while router.poll(2000):
        got.append(protocol.decode(router.recv_multipart()[1:]))
        if got[-1].type is MsgType.BYE:
            break
    assert [m.type for m in got] == [MsgType.READY, MsgType.RESULT, MsgType.BYE]
    assert got[1]["job_id"] == "job-1" and got[1].payloads[0] == b"png bytes"
    router.close(linger=0)


def test_stop_gives_up_after_a_while_when_the_broker_never_comes(ctx: zmq.Context) -> None:
    # Nothing listens on port 1.
    link = BrokerLink("tcp://127.0.0.1:1", READY, handler=FakeHandler(), heartbeat=5.0)
    link.start()
    started = time.monotonic()
    link.stop(bye=True)
    assert time.monotonic() - started < 4.0


def test_a_link_that_cannot_connect_says_why_and_still_stops(caplog) -> None:
    # An error on the I/O thread must not leave a socket open in the link's context: stop()
    # terminates that context, which would wait for ever.
    link = BrokerLink("not-an-endpoint", READY, handler=FakeHandler())
    with caplog.at_level(logging.ERROR, logger="broker.connection"):
        link.start()
        assert wait_for_log(caplog, "the link to the broker not-an-endpoint failed")
    deadline = time.monotonic() + 5
    while link.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not link.alive  # the worker sees this and exits, so launch.py restarts it
    started = time.monotonic()
    link.stop()
    assert time.monotonic() - started < 1.0


def test_stop_before_start_is_harmless() -> None:
    BrokerLink("tcp://127.0.0.1:1", READY, handler=FakeHandler()).stop()


# ------------------------------------------------------------------------------ the handler


def test_ready_and_heartbeats_list_what_the_handler_holds(bare: BareBroker, start_link) -> None:
    handler = FakeHandler(held=["a", "b"])
    start_link(bare.endpoint, handler, heartbeat=0.3)
    ready = bare.expect(MsgType.READY)
    assert ready.fields == {**READY, "held": ["a", "b"]}
    assert bare.expect(MsgType.HEARTBEAT)["running"] == ["a", "b"]
    handler.held_ids = ["c"]
    assert bare.expect(MsgType.HEARTBEAT)["running"] == ["c"]
    bare.send(MsgType.RECONNECT)
    assert bare.expect(MsgType.READY)["held"] == ["c"]  # built afresh each time


def test_jobs_and_cancels_go_to_the_handler_on_the_link_thread(bare: BareBroker,
                                                               start_link) -> None:
    handler = FakeHandler()
    start_link(bare.endpoint, handler, heartbeat=0.5)
    bare.expect(MsgType.READY)
    bare.sock.send_multipart([bare.peer, *protocol.jobs([make_spec("a"), make_spec("b")])])
    bare.send(MsgType.CANCEL, {"job_id": "a"})
    deadline = time.monotonic() + 5
    while not handler.cancels and time.monotonic() < deadline:
        handler.got.wait(0.1)
    assert handler.batches == [["a", "b"]] and handler.cancels == ["a"]
    assert handler.threads == {"broker-link"}


# ------------------------------------------------------------------------------ broker restarts


def test_a_new_broker_incarnation_gets_a_ready_at_once(bare: BareBroker, start_link) -> None:
    # heartbeat 1 s, liveness 3: without incarnations the worker would register again only
    # after 3 s of silence, or when its next heartbeat got a RECONNECT.
    handler = FakeHandler(held=["running-1"])
    start_link(bare.endpoint, handler, heartbeat=1.0)
    bare.expect(MsgType.READY)
    bare.send(MsgType.HEARTBEAT, {"incarnation": "first"})  # the first seen: no restart
    bare.send(MsgType.HEARTBEAT)  # an old broker names none: no restart either
    bare.expect(MsgType.HEARTBEAT)  # a heartbeat later, past the READY rate limit
    bare.send(MsgType.HEARTBEAT, {"incarnation": "first"})
    assert bare.readies_within(0.3) == []
    sent = time.monotonic()
    bare.send(MsgType.HEARTBEAT, {"incarnation": "second"})
    ready = bare.expect(MsgType.READY, timeout=2.0)
    assert time.monotonic() - sent < 0.5  # at once, not at the next heartbeat
    assert ready["held"] == ["running-1"]
    assert bare.readies_within(0.3) == []  # once per restart


def test_a_restart_right_after_a_ready_gets_one_when_the_rate_limit_allows(
        bare: BareBroker, start_link) -> None:
    # The READY just sent may have gone to the old broker; the new one must get its own,
    # but no sooner than half a heartbeat after the last.
    start_link(bare.endpoint, FakeHandler(), heartbeat=2.0)
    bare.expect(MsgType.READY)
    bare.send(MsgType.HEARTBEAT, {"incarnation": "first"})
    bare.expect(MsgType.HEARTBEAT)  # ~2 s on: the next READY is allowed at once
    bare.send(MsgType.RECONNECT, {"incarnation": "first"})
    bare.expect(MsgType.READY, timeout=1.0)
    answered = time.monotonic()
    bare.send(MsgType.RECONNECT, {"incarnation": "second"})
    bare.expect(MsgType.READY, timeout=3.0)
    assert 0.8 <= time.monotonic() - answered < 1.6  # held back to half a heartbeat (1 s)


def test_a_reconnect_flood_gets_one_ready_per_half_heartbeat(bare: BareBroker,
                                                             start_link) -> None:
    # A restarted broker answers every stale message with RECONNECT: 40 in 15 ms were seen.
    start_link(bare.endpoint, FakeHandler(), heartbeat=3.0)
    bare.expect(MsgType.READY)
    connected = time.monotonic()

    def flood() -> None:
        for _ in range(40):
            bare.send(MsgType.RECONNECT)

    flood()  # within 1.5 s (half a heartbeat) of the READY sent on connecting
    assert bare.readies_within(0.5) == []
    assert bare.readies_within(connected + 1.8 - time.monotonic()) == []  # the limit lapses
    flood()
    assert len(bare.readies_within(0.5)) == 1
    flood()
    assert bare.readies_within(0.3) == []


def test_a_heartbeat_follows_the_answers_of_the_jobs_it_no_longer_lists(
        bare: BareBroker, start_link) -> None:
    # The job is answered just as the heartbeat takes the list: the broker must read the
    # answer first, or it would see a leased job missing from the list and no answer for it.
    link: BrokerLink | None = None
    calls = 0

    class AnswersDuringTheList(FakeHandler):
        def held(self) -> list[str]:
            nonlocal calls
            calls += 1
            if calls == 2:  # the first heartbeat's (the first call is the READY's)
                assert link is not None
                link.send(protocol.result("a", [ImageInfo(seed=1, width=8, height=8,
                                                          format="png")], [b"png"]))
                return []
            return ["a"] if calls == 1 else []

    link = start_link(bare.endpoint, AnswersDuringTheList(), heartbeat=0.3)
    assert bare.expect(MsgType.READY)["held"] == ["a"]
    got = [bare.recv(5.0) for _ in range(2)]
    assert [(m.type, m.fields.get("job_id"), m.fields.get("running")) for m in got if m] == [
        (MsgType.RESULT, "a", None), (MsgType.HEARTBEAT, None, [])]
