"""LoRA adapters in the broker: a job goes only to a worker that announced every adapter it
applies, preferably one that has them in memory already, but never waits for that one while
another that can load them is free; what a worker can apply follows its heartbeats."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from broker import protocol
from broker.protocol import MAX_LORAS, MsgType, ProtocolError
from tests.broker.fakes import BrokerHarness, FakeWorker, make_spec
from tests.broker.test_broker_restarts import STARTUP_GRACE

STYLE = {"style": {"loaded": False}}
LOADED_STYLE = {"style": {"loaded": True, "bytes": 1000}}


def past_the_startup_grace(harness: BrokerHarness, worker: FakeWorker,
                           loras: dict[str, object]) -> None:
    """After a (re)start the broker keeps jobs it cannot place yet, while workers register
    again: move past that, the worker beating (with its adapters) to stay alive."""
    harness.clock.advance(STARTUP_GRACE)
    worker.heartbeat(loras=loras)
    harness.pump()


def styled(job_id: str, *loras: tuple[str, float]) -> protocol.JobSpec:
    return make_spec(job_id, loras=loras or (("style", 0.8),))


def test_a_job_goes_only_to_a_worker_with_its_adapters(harness: BrokerHarness) -> None:
    plain = harness.worker("plain")
    client = harness.client()
    able = harness.worker("able", loras=STYLE)
    assert client.submit(styled("j1")).type is MsgType.ACCEPTED
    assert [s.id for s in able.take()] == ["j1"]
    plain.assert_silent()
    client.submit(make_spec("j2"))  # no adapters: any worker
    assert [s.id for s in plain.take()] == ["j2"]


def test_a_job_no_worker_can_apply_is_refused_at_once(harness: BrokerHarness) -> None:
    plain = harness.worker("plain", loras=STYLE)
    past_the_startup_grace(harness, plain, STYLE)
    refused = harness.client().submit(styled("j1", ("style", 1.0), ("other", 0.5)))
    assert (refused.type, refused["code"], refused["retryable"]) == \
        (MsgType.FAILED, "no_worker", True)
    assert "other" in refused["message"]


def test_a_free_worker_with_the_adapters_loaded_is_preferred(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness()
    cold = harness.worker("cold", loras=STYLE)
    warm = harness.worker("warm", loras=LOADED_STYLE)
    client = harness.client()
    client.submit(styled("j1"))
    assert [s.id for s in warm.take()] == ["j1"]
    cold.assert_silent()
    # The warm one is busy now: the next goes to the cold one rather than wait.
    client.submit(styled("j2"))
    assert [s.id for s in cold.take()] == ["j2"]


def test_a_heartbeat_that_adds_an_adapter_lets_a_waiting_job_go(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1", loras=STYLE)
    client = harness.client()
    client.submit(styled("j1"))
    worker.take()  # busy with it; the next one waits
    client.submit(styled("j2", ("style", 1.0), ("fresh", 0.3)))
    late = harness.worker("late", loras={})
    late.assert_silent()  # it cannot apply "fresh"
    late.heartbeat(loras={"style": {}, "fresh": {}})  # a new file was dropped in its dir
    assert [s.id for s in late.take()] == ["j2"]


def test_a_worker_whose_adapters_go_gets_no_more_jobs_that_need_them(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1", loras=STYLE)
    past_the_startup_grace(harness, worker, STYLE)
    worker.heartbeat(loras={})  # the file was removed
    harness.wait_for(lambda: not harness.broker.workers.get(worker.identity).loras)
    refused = harness.client().submit(styled("j1"))
    assert refused["code"] == "no_worker"


@pytest.mark.parametrize("loras", [{"": {}}, {"x" * 500: {}},
                                   {"style": {"loaded": "yes"}}, {"style": {"bytes": -1}}])
def test_an_unreadable_adapter_list_costs_only_the_adapters(harness: BrokerHarness,
                                                           loras: object) -> None:
    worker = harness.worker("w1", loras=STYLE)
    worker.heartbeat(loras=loras)
    record = harness.broker.workers.get(worker.identity)
    harness.wait_for(lambda: not record.loras)
    client = harness.client()
    client.submit(make_spec("plain"))
    assert [s.id for s in worker.take()] == ["plain"]  # alive and serving


def test_a_batch_never_mixes_adapter_sets(make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness()
    client = harness.client()
    sets = [("style", 0.8)], [("style", 0.5)], [], [("style", 0.8)]
    for index, loras in enumerate(sets):
        client.submit(make_spec(f"j{index}", loras=tuple(loras)))
    worker = harness.worker("w1", loras=STYLE, max_batch=4, capacity=8)
    batches = [worker.take() for _ in range(2)]
    for batch in batches:
        assert len({spec.loras for spec in batch}) == 1
    assert sorted(s.id for s in batches[0]) == ["j0", "j3"]


@pytest.mark.parametrize("loras", [
    (("style", math.nan),), (("style", math.inf),), (("style", 5.0),), (("", 1.0),),
    (("style", 1.0), ("style", 0.5)),  # one adapter twice
    tuple((f"a{i}", 1.0) for i in range(MAX_LORAS + 1)),
])
def test_odd_adapter_lists_are_refused_on_the_wire(loras: tuple) -> None:
    wire = {**make_spec("j").to_wire(), "loras": [list(use) for use in loras]}
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode(MsgType.SUBMIT, {"job": wire, "owner": "o"}))
