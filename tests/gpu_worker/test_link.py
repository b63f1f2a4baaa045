"""The worker's link: it explains a refusal instead of looking like a silent network, and its
last messages reach the broker when it stops."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from broker import protocol
from broker.auth import create_keys, load_public, load_secret
from broker.protocol import ImageInfo, MsgType
from gpu_worker.link import BrokerLink, CurveKeys
from tests.broker.fakes import LiveBroker

READY = {"worker_id": "w", "host": "h", "device": "cpu", "models": ["tiny"]}


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
    link = BrokerLink(live.workers_endpoint, READY, heartbeat=0.2, curve=curve, context=ctx)
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
    link = BrokerLink(f"tcp://127.0.0.1:{port}", READY, heartbeat=5.0)  # its own context
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
    link = BrokerLink("tcp://127.0.0.1:1", READY, heartbeat=5.0)  # nothing listens on port 1
    link.start()
    started = time.monotonic()
    link.stop(bye=True)
    assert time.monotonic() - started < 4.0


def test_a_link_that_cannot_connect_says_why_and_still_stops(caplog) -> None:
    # An error on the I/O thread must not leave a socket open in the link's context: stop()
    # terminates that context, which would wait for ever.
    link = BrokerLink("not-an-endpoint", READY)
    with caplog.at_level(logging.ERROR, logger="gpu_worker.link"):
        link.start()
        assert wait_for_log(caplog, "the link to the broker not-an-endpoint failed")
    deadline = time.monotonic() + 5
    while link.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not link.alive  # the worker sees this and exits, so launch.py restarts it
    started = time.monotonic()
    link.stop()
    assert time.monotonic() - started < 1.0


def test_stop_interrupts_the_wait_before_a_reconnect(caplog) -> None:
    link = BrokerLink("tcp://127.0.0.1:1", READY, heartbeat=2.0, liveness=1)
    with caplog.at_level(logging.WARNING, logger="gpu_worker.link"):
        link.start()
        assert wait_for_log(caplog, "reconnecting to tcp://127.0.0.1:1", timeout=6)
    started = time.monotonic()
    link.stop(bye=True)  # the back-off is 1-2 s; stop() must not sit it out
    assert time.monotonic() - started < 0.8
    assert not link.alive


def test_stop_before_start_is_harmless() -> None:
    BrokerLink("tcp://127.0.0.1:1", READY).stop()
