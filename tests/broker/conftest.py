"""Fixtures for the broker tests; the fakes they build live in tests/broker/fakes.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from tests.broker.fakes import BrokerHarness, LiveBroker


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    """Give each test its own ZeroMQ context."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # also closes sockets a failed test left open, so it cannot hang


@pytest.fixture
def make_harness(zmq_ctx: zmq.Context) -> Iterator[Callable[..., BrokerHarness]]:
    """Build a BrokerHarness with the given BrokerConfig overrides; closed after the test."""
    made: list[BrokerHarness] = []

    def make(**config: Any) -> BrokerHarness:
        harness = BrokerHarness(zmq_ctx, **config)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def harness(make_harness: Callable[..., BrokerHarness]) -> BrokerHarness:
    """A BrokerHarness with the default BrokerConfig."""
    return make_harness()


@pytest.fixture
def make_live_broker(zmq_ctx: zmq.Context) -> Iterator[Callable[..., LiveBroker]]:
    """Start brokers running run() in a thread; each is stopped and joined after the test."""
    made: list[LiveBroker] = []

    def make(**config: Any) -> LiveBroker:
        live = LiveBroker(zmq_ctx, **config)
        made.append(live)
        return live

    yield make
    for live in made:
        live.stop()
