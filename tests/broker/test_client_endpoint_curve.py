"""CURVE on the client endpoint: frontend keys of their own, refusals, and what owners mean.

With ``--curve DIR`` the broker's client endpoint takes only keys in DIR/frontends/; a
worker's key (DIR/workers/) does not open it, nor a frontend's the worker endpoint. Attacks:
a stranger's key, a worker's key, a plain peer; each gets nothing, is logged, and the broker
carries on serving the frontends it admits.
"""

from __future__ import annotations

import dataclasses
import logging
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from broker import auth, protocol
from broker.auth import create_keys, load_public, load_secret
from broker.broker import Broker, BrokerConfig
from broker.connection import CurveKeys
from broker.protocol import ErrorCode, MsgType
from http_frontend.broker_client import BrokerClient
from tests.broker.fakes import LiveBroker, make_spec

Pair = tuple[bytes, bytes]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    create_keys(tmp_path / "keys", ["gpu-1"], frontends=["web-1", "web-2"])
    return tmp_path / "keys"


@pytest.fixture
def live(keys: Path, make_live_broker: Callable[..., LiveBroker]) -> LiveBroker:
    return make_live_broker(curve_dir=str(keys))


@pytest.fixture
def dealers(zmq_ctx: zmq.Context) -> Iterator[Callable[..., zmq.Socket]]:
    """Make DEALERs (CURVE with a pair, plain without); all closed after the test."""
    made: list[zmq.Socket] = []

    def dealer(endpoint: str, server: bytes, pair: Pair | None) -> zmq.Socket:
        sock = zmq_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if pair is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pair[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, pair[1])
        sock.connect(endpoint)
        made.append(sock)
        return sock

    yield dealer
    for sock in made:
        sock.close(linger=0)


def pair(keys: Path, kind: str, name: str) -> Pair:
    return load_secret(keys / kind / f"{name}.key_secret")


def status_answered(sock: zmq.Socket, timeout: float = 2.0) -> bool:
    """Ask for the status as a frontend does: only an admitted peer gets the reply."""
    sock.send_multipart(protocol.encode(MsgType.STATUS))
    if not sock.poll(int(timeout * 1000)):
        return False
    return protocol.decode(sock.recv_multipart()).type is MsgType.STATUS_REPLY


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_frontend_keys_have_a_folder_of_their_own(keys: Path) -> None:
    assert sorted(p.name for p in (keys / "frontends").glob("*.key")) == \
        ["web-1.key", "web-2.key"]
    assert [p.name for p in (keys / "workers").glob("*.key")] == ["gpu-1.key"]
    for secret in (keys / "frontends").glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_the_client_endpoint_takes_only_frontend_keys(
        live: LiveBroker, keys: Path, dealers: Callable[..., zmq.Socket], caplog) -> None:
    server = load_public(keys / "broker.key")
    web = pair(keys, "frontends", "web-1")
    worker = pair(keys, "workers", "gpu-1")
    stranger = zmq.curve_keypair()
    clients = live.clients_endpoint
    with caplog.at_level(logging.WARNING, logger="broker"):
        assert status_answered(dealers(clients, server, web))
        # The attacks: each gets nothing at all, not even an error.
        assert not status_answered(dealers(clients, server, worker), timeout=1.0)
        assert not status_answered(dealers(clients, server, stranger), timeout=1.0)
        assert not status_answered(dealers(clients, server, None), timeout=1.0)
        wait_until(lambda: "refused frontend key" in caplog.text
                   and "it is worker key 'workers/gpu-1'" in caplog.text
                   and f"refused frontend key {stranger[0].decode()}" in caplog.text
                   and "refused a frontend connection on" in caplog.text)  # the plain one
        # ... and the broker carries on serving the frontends it admits.
        assert status_answered(dealers(clients, server, web))
        assert status_answered(dealers(clients, server, pair(keys, "frontends", "web-2")))
    for secret in (web[1], worker[1], stranger[1]):
        assert secret.decode() not in caplog.text


def test_a_frontend_key_does_not_open_the_worker_endpoint(
        live: LiveBroker, keys: Path, dealers: Callable[..., zmq.Socket], caplog) -> None:
    server = load_public(keys / "broker.key")
    with caplog.at_level(logging.WARNING, logger="broker"):
        sock = dealers(live.workers_endpoint, server, pair(keys, "frontends", "web-1"))
        sock.send_multipart(protocol.encode(MsgType.HEARTBEAT))
        assert not sock.poll(1000)
        wait_until(lambda: "it is frontend key 'frontends/web-1'" in caplog.text)
    worker = dealers(live.workers_endpoint, server, pair(keys, "workers", "gpu-1"))
    worker.send_multipart(protocol.encode(MsgType.HEARTBEAT))
    assert worker.poll(2000), "the worker's own key still opens its endpoint"


def test_garbage_from_an_admitted_frontend_is_dropped_and_the_broker_goes_on(
        live: LiveBroker, keys: Path, dealers: Callable[..., zmq.Socket]) -> None:
    server = load_public(keys / "broker.key")
    web = dealers(live.clients_endpoint, server, pair(keys, "frontends", "web-1"))
    web.send_multipart([b"\xc1 not msgpack", b"x" * 100])
    web.send_multipart(protocol.encode(MsgType.HEARTBEAT))  # a worker's message
    assert status_answered(web)


def test_a_deleted_frontend_key_is_refused_without_a_restart(
        live: LiveBroker, keys: Path, dealers: Callable[..., zmq.Socket]) -> None:
    server = load_public(keys / "broker.key")
    web2 = pair(keys, "frontends", "web-2")
    assert status_answered(dealers(live.clients_endpoint, server, web2))
    (keys / "frontends" / "web-2.key").unlink()
    live.broker.request_reload()  # what SIGHUP does; a changed folder is noticed too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not status_answered(dealers(live.clients_endpoint, server, web2), timeout=0.5):
            break
    else:
        pytest.fail("a deleted frontend key still got in")
    assert status_answered(dealers(live.clients_endpoint, server, pair(keys, "frontends",
                                                                       "web-1")))


def test_a_public_client_endpoint_needs_curve_or_insecure(zmq_ctx: zmq.Context,
                                                          keys: Path, caplog) -> None:
    with pytest.raises(ValueError, match=r"client endpoint .* --curve"):
        Broker(BrokerConfig(clients="tcp://0.0.0.0:*", workers="tcp://127.0.0.1:*"),
               zmq_ctx).bind()
    for config in (BrokerConfig(clients="tcp://0.0.0.0:*", workers="tcp://127.0.0.1:*",
                                insecure=True),
                   BrokerConfig(clients="tcp://0.0.0.0:*", workers="tcp://127.0.0.1:*",
                                curve_dir=str(keys))):
        broker = Broker(config, zmq_ctx)
        with caplog.at_level(logging.WARNING):
            broker.bind()
        broker.close()
    assert "the client endpoint tcp://0.0.0.0:* takes plain TCP" in caplog.text
    # Loopback and ipc:// stay plain without keys: a single node, the tests.
    local = Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*"),
                   zmq_ctx)
    local.bind()
    local.close()


def test_the_self_test_proves_both_endpoints_and_that_keys_stay_on_their_side(
        keys: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    ctx = zmq.Context()  # one ZAP handler per context
    try:
        good = Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                                   curve_dir=str(keys)), ctx)
        good.bind()
        with caplog.at_level(logging.INFO, logger="broker"):
            good.self_test()
        good.close()
        assert "CURVE self-test passed" in caplog.text
    finally:
        ctx.destroy(linger=0)
    # Both endpoints asking ZAP about one domain: one allow-list for both, so a worker's key
    # would open the client endpoint. The self-test must refuse to start.
    monkeypatch.setattr(auth, "FRONTENDS",
                        dataclasses.replace(auth.FRONTENDS, domain=auth.WORKERS.domain))
    ctx = zmq.Context()
    try:
        shared = Broker(BrokerConfig(clients="tcp://127.0.0.1:*",
                                     workers="tcp://127.0.0.1:*", curve_dir=str(keys)), ctx)
        shared.bind()
        with pytest.raises(RuntimeError,
                           match=r"(worker|frontend) key on the (frontend|worker) endpoint"):
            shared.self_test(timeout=2.0)
        shared.close()
    finally:
        ctx.destroy(linger=0)


def curve_client(keys: Path, name: str, endpoint: str, ctx: zmq.Context, *, kind: str =
                 "frontends", owner: str | None = None) -> BrokerClient:
    curve = CurveKeys(load_public(keys / "broker.key"), *pair(keys, kind, name))
    client = BrokerClient(endpoint, owner=owner or name, heartbeat=0.2, context=ctx,
                          curve=curve)
    client.start()
    return client


def test_the_frontend_connects_with_its_keys_and_says_why_when_refused(
        live: LiveBroker, keys: Path, zmq_ctx: zmq.Context, caplog) -> None:
    web = curve_client(keys, "web-1", live.clients_endpoint, zmq_ctx)
    worker_key = curve_client(keys, "gpu-1", live.clients_endpoint, zmq_ctx, kind="workers")
    plain = BrokerClient(live.clients_endpoint, owner="plain", heartbeat=0.2, context=zmq_ctx)
    plain.start()
    try:
        with caplog.at_level(logging.WARNING, logger="http_frontend.broker_client"):
            wait_until(lambda: web.status() is not None)
            wait_until(lambda: "is not on its allow-list" in caplog.text
                       and "requires CURVE: pass --broker-key and --key" in caplog.text)
        assert worker_key.status() is None and plain.status() is None
        # A refused frontend answers its requests at once (503), never hangs them.
        refused = plain.submit(make_spec("from-plain"))
        assert refused.error is not None and refused.error.code == \
            ErrorCode.BROKER_UNAVAILABLE
    finally:
        for client in (web, worker_key, plain):
            client.close()


def test_owners_among_admitted_frontends_are_cooperative(
        live: LiveBroker, keys: Path, zmq_ctx: zmq.Context) -> None:
    """What holds with CURVE: only admitted frontends reach the broker at all. Among them a
    job's owner id keeps one frontend from cancelling or re-attaching another's job by
    mistake, but any admitted frontend may act under any owner: that is how frontends
    sharing a database cancel each other's jobs and take over a stopped one's."""
    one = curve_client(keys, "web-1", live.clients_endpoint, zmq_ctx)
    two = curve_client(keys, "web-2", live.clients_endpoint, zmq_ctx)
    try:
        wait_until(lambda: one.status() is not None and two.status() is not None)
        # No worker yet: within the start-up grace the job waits in its queue.
        job = one.submit(make_spec("owned-by-one"))
        wait_until(lambda: job.position is not None)
        two.cancel(job.job_id)  # under its own owner: ignored (and logged)
        thief = two.submit(make_spec("owned-by-one"))  # re-attach: refused
        wait_until(lambda: thief.error is not None)
        assert thief.error is not None and thief.error.code == ErrorCode.INVALID_REQUEST
        time.sleep(0.3)
        assert job.error is None and not job.done
        two.cancel(job.job_id, owner="web-1", forget=False)  # as its owner: it is cancelled
        wait_until(lambda: job.error is not None)
        assert job.error is not None and job.error.code == ErrorCode.CANCELLED
    finally:
        one.close()
        two.close()
