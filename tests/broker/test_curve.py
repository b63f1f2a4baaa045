"""CURVE on the worker endpoint: keys on disk, the allow-list, the self-test, refusals."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from broker import auth, protocol
from broker.auth import create_keys, is_loopback, load_public, load_secret
from broker.broker import Broker, BrokerConfig
from broker.protocol import MsgType
from tests.broker.fakes import LiveBroker


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    create_keys(tmp_path / "keys", ["alpha", "beta"])
    return tmp_path / "keys"


def curve_peer(ctx: zmq.Context, endpoint: str, server_public: bytes,
               pair: tuple[bytes, bytes] | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if pair is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, pair[0])
        sock.setsockopt(zmq.CURVE_SECRETKEY, pair[1])
    sock.connect(endpoint)
    return sock


def answered(sock: zmq.Socket, timeout: float = 2.0) -> bool:
    """Send a HEARTBEAT as an unregistered worker: an admitted peer is told to RECONNECT."""
    sock.send_multipart(protocol.encode(MsgType.HEARTBEAT))
    if not sock.poll(int(timeout * 1000)):
        return False
    return protocol.decode(sock.recv_multipart()).type is MsgType.RECONNECT


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return once ``condition()`` holds (the broker runs in its own thread); fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_key_files_and_their_modes(keys: Path) -> None:
    for secret in [keys / "broker.key_secret", *sorted((keys / "workers").glob("*.key_secret"))]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in (keys / "workers").glob("*.key")) == ["alpha.key", "beta.key"]
    public, secret = load_secret(keys / "workers" / "alpha.key_secret")
    assert public == load_public(keys / "workers" / "alpha.key") and len(secret) == 40


def test_keys_are_never_overwritten_without_force(keys: Path) -> None:
    before = (keys / "workers" / "alpha.key").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        create_keys(keys, ["alpha"])
    assert (keys / "workers" / "alpha.key").read_bytes() == before
    create_keys(keys, ["alpha"], force=True)
    assert (keys / "workers" / "alpha.key").read_bytes() != before


def test_a_secret_readable_by_others_is_refused(keys: Path) -> None:
    secret = keys / "workers" / "beta.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_secret(secret)


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5556", True), ("tcp://localhost:5556", True), ("tcp://[::1]:5", True),
    ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5556", False), ("tcp://*:5556", False),
    ("tcp://10.0.0.5:5556", False),
])
def test_is_loopback(endpoint: str, local: bool) -> None:
    assert is_loopback(endpoint) is local


def test_a_public_worker_endpoint_needs_curve_or_insecure(zmq_ctx: zmq.Context,
                                                          caplog) -> None:
    config = BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://0.0.0.0:*")
    with pytest.raises(ValueError, match="--curve"):
        Broker(config, zmq_ctx).bind()
    insecure = Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://0.0.0.0:*",
                                   insecure=True), zmq_ctx)
    with caplog.at_level(logging.WARNING):
        insecure.bind()
    assert "--insecure" in caplog.text
    insecure.close()


def test_allowed_keys_get_in_others_are_refused_and_logged(
        zmq_ctx: zmq.Context, keys: Path, make_live_broker: Callable[..., LiveBroker],
        caplog) -> None:
    live = make_live_broker(workers="tcp://0.0.0.0:*", curve_dir=str(keys))
    endpoint = "tcp://127.0.0.1:" + live.workers_endpoint.rsplit(":", 1)[1]
    server = load_public(keys / "broker.key")
    alpha = load_secret(keys / "workers" / "alpha.key_secret")
    stranger = zmq.curve_keypair()
    with caplog.at_level(logging.WARNING, logger="broker"):
        assert answered(curve_peer(zmq_ctx, endpoint, server, alpha))
        assert not answered(curve_peer(zmq_ctx, endpoint, server, stranger), timeout=1.0)
        assert not answered(curve_peer(zmq_ctx, endpoint, server, None), timeout=1.0)
        # The refusals are logged on the broker's thread, maybe after the peers gave up.
        wait_until(lambda: f"refused worker key {stranger[0].decode()}" in caplog.text
                   and "refused a worker connection" in caplog.text)  # the plain-TCP peer
    assert alpha[1].decode() not in caplog.text  # a secret never reaches the log


def test_removing_a_key_revokes_it_without_a_restart(
        zmq_ctx: zmq.Context, keys: Path, make_live_broker: Callable[..., LiveBroker]) -> None:
    live = make_live_broker(curve_dir=str(keys))
    server = load_public(keys / "broker.key")
    beta = load_secret(keys / "workers" / "beta.key_secret")
    assert answered(curve_peer(zmq_ctx, live.workers_endpoint, server, beta))
    (keys / "workers" / "beta.key").unlink()
    live.broker.request_reload()  # what SIGHUP does; a changed folder is noticed too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not answered(curve_peer(zmq_ctx, live.workers_endpoint, server, beta), timeout=0.5):
            return
    pytest.fail("a removed key still got in")


def test_self_test_passes_and_catches_a_domain_mismatch(
        zmq_ctx: zmq.Context, keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                               curve_dir=str(keys)), zmq_ctx)
    good.bind()
    good.self_test()
    good.close()
    # The server socket asks ZAP for one domain, the handler answers another: everyone
    # would be refused. The self-test must say so instead of starting.
    monkeypatch.setattr(auth, "WORKERS",
                        dataclasses.replace(auth.WORKERS, domain="some-other-domain"))
    other_ctx = zmq.Context()  # one ZAP handler per context; the first one's is closing
    broken = Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                                 curve_dir=str(keys)), other_ctx)
    broken.worker_socket.setsockopt_string(zmq.ZAP_DOMAIN, "diffusion-cluster-workers")
    broken.bind()
    try:
        with pytest.raises(RuntimeError, match="self-test failed"):
            broken.self_test(timeout=1.0)
    finally:
        broken.close()
        other_ctx.destroy(linger=0)
