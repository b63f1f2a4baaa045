"""The worker's link explains a refusal instead of looking like a silent network."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from broker.auth import create_keys, load_public, load_secret
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
