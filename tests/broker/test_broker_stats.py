"""What the broker reports for metrics: each worker's last stats, and its own job counters,
in STATUS_REPLY. A real Broker on real sockets with fake workers and clients."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import pytest

from broker import protocol
from broker.counters import MAX_MODELS, OTHER, JobCounters
from broker.protocol import BrokerCounters, ErrorCode, Message, MsgType, WorkerStats
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker, make_spec

pytestmark = pytest.mark.timeout(30)

STATS = WorkerStats(jobs_done=4, images_done=7, step_seconds=0.125, images_per_second=0.5,
                    batch_size=2)


def status(client: FakeClient) -> Message:
    client.send_msg(MsgType.STATUS)
    return client.expect(MsgType.STATUS_REPLY)


def counters(client: FakeClient) -> BrokerCounters:
    counted = status(client)["counters"]
    assert isinstance(counted, BrokerCounters)
    return counted


def beat(harness: BrokerHarness, worker: FakeWorker, stats: WorkerStats) -> None:
    with harness.consumes(workers=1):
        worker.send_msg(MsgType.HEARTBEAT, {"running": [], "stats": stats})


# --------------------------------------------------------------------------------------------
# Worker stats


def test_status_reply_carries_each_workers_last_stats(harness: BrokerHarness) -> None:
    measured, quiet = harness.worker("measured"), harness.worker("quiet")
    client = harness.client()
    beat(harness, measured, WorkerStats(jobs_done=1, images_done=1))
    beat(harness, measured, STATS)
    quiet.heartbeat()  # a worker from before stats: nothing to report, and still served
    workers = {w["worker_id"]: w for w in status(client)["workers"]}
    assert workers["measured"]["stats"] == {"jobs_done": 4, "images_done": 7,
                                            "step_seconds": 0.125, "images_per_second": 0.5,
                                            "batch_size": 2}
    assert "stats" not in workers["quiet"]


def test_a_worker_that_registers_again_keeps_its_stats(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    beat(harness, worker, STATS)
    with harness.consumes(workers=1):
        worker.ready("w1")
    (described,) = status(harness.client())["workers"]
    assert WorkerStats.from_wire(described["stats"]) == STATS


@pytest.mark.parametrize("stats", [
    {"jobs_done": 1, "images_done": 1, "step_seconds": float("nan")},
    {"jobs_done": 1, "images_done": 1, "images_per_second": float("inf")},
    {"jobs_done": 1, "images_done": 1, "utilization": 1.01},
    {"jobs_done": -1, "images_done": 1},
    {"jobs_done": 1, "images_done": 1, "memory_used_bytes": 1.5},
    {"step_seconds": "fast"},
])
def test_hostile_stats_are_dropped_but_the_heartbeat_still_counts(
        harness: BrokerHarness, stats: object) -> None:
    worker = harness.worker("w1")
    beat(harness, worker, STATS)
    (record,) = list(harness.broker.workers)
    record.expires_at = 0.0  # as if the worker had gone quiet: only this heartbeat saves it
    with harness.consumes(workers=1):
        worker.send([msgspec.msgpack.encode({"v": 1, "t": "heartbeat", "running": [],
                                             "stats": stats})])
    assert record.expires_at > 0.0
    (described,) = status(harness.client())["workers"]
    assert "stats" not in described  # not the old ones either: they would pass as current


def test_stats_absent_from_a_later_heartbeat_are_no_longer_reported(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    beat(harness, worker, STATS)
    with harness.consumes(workers=1):
        worker.send_msg(MsgType.HEARTBEAT, {"running": []})
    (described,) = status(harness.client())["workers"]
    assert "stats" not in described


def test_stats_without_the_fields_a_newer_worker_may_leave_out_are_read(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    beat(harness, worker, WorkerStats(step_seconds=0.5))
    (described,) = status(harness.client())["workers"]
    assert WorkerStats.from_wire(described["stats"]) == WorkerStats(step_seconds=0.5)


# --------------------------------------------------------------------------------------------
# Job counters


def test_counters_name_the_brokers_start(harness: BrokerHarness) -> None:
    counted = counters(harness.client())
    assert abs(counted.started - time.time()) < 60
    assert (counted.dispatched, counted.requeued, counted.failed) == ({}, {}, {})
    assert status(harness.client())["incarnation"] == harness.broker.incarnation


def test_dispatched_counts_each_job_leased(harness: BrokerHarness) -> None:
    worker = harness.worker("w1", capacity=2)
    client = harness.client()
    client.submit(make_spec("j1"))
    client.submit(make_spec("j2"))
    leased: list[str] = []
    while len(leased) < 2:
        leased += [spec.id for spec in worker.take()]
    assert counters(client).dispatched == {"tiny": 2}


def test_a_lost_workers_jobs_count_as_requeued_then_dispatched_again(
        harness: BrokerHarness) -> None:
    lost = harness.worker("lost")
    client = harness.client()
    client.submit(make_spec("j1"))
    lost.take()
    harness.clock.advance(2.0)
    alive = harness.worker("alive")
    harness.clock.advance(1.5)  # past the lost worker's liveness, not the new one's
    (again,) = alive.take()
    assert again.attempt == 1
    counted = counters(client)
    assert counted.requeued == {"tiny": 1}
    assert counted.dispatched == {"tiny": 2}
    assert counted.failed == {}


def test_failures_count_by_reason(make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(max_queue=1, heartbeat_interval=10.0)
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("running"))
    worker.take()
    client.submit(make_spec("queued", timeout=5.0))
    assert client.submit(make_spec("refused"))["code"] == ErrorCode.QUEUE_FULL
    client.cancel("running")
    client.expect(MsgType.FAILED)  # cancelled
    harness.clock.advance(5.0)
    assert client.expect(MsgType.FAILED)["code"] == ErrorCode.TIMEOUT
    harness.clock.advance(60.0)  # past the startup grace (2 x liveness): unserved fails at once
    assert client.submit(make_spec("nobody", model="sdxl"))["code"] == ErrorCode.NO_WORKER
    assert counters(client).failed == {
        "tiny": {"queue_full": 1, "cancelled": 1, "timeout": 1},
        OTHER: {"no_worker": 1},  # no worker announced sdxl: its name is no label
    }


def test_a_worker_error_counts_as_failed(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")  # the only one: the job fails at once, not elsewhere
    client = harness.client()
    client.submit(make_spec("j1"))
    worker.take()
    worker.send(protocol.failed("j1", ErrorCode.WORKER_ERROR, "out of memory"))
    assert client.expect(MsgType.FAILED)["code"] == ErrorCode.WORKER_ERROR
    counted = counters(client)
    assert counted.failed == {"tiny": {"worker_error": 1}}
    assert counted.dispatched == {"tiny": 1}


def test_a_job_that_loses_every_worker_counts_requeues_then_worker_lost(
        harness: BrokerHarness) -> None:
    client = harness.client()
    for i in range(3):
        worker = harness.worker(f"w{i}")
        if i == 0:
            client.submit(make_spec("j1"))
        worker.take()
        harness.clock.advance(3.5)  # this worker dies; the next one registers after
    assert client.expect(MsgType.FAILED)["code"] == ErrorCode.WORKER_LOST
    counted = counters(client)
    assert counted.dispatched == {"tiny": 3}
    assert counted.requeued == {"tiny": 2}
    assert counted.failed == {"tiny": {"worker_lost": 1}}


def test_models_named_in_counters_are_bounded() -> None:
    counted = JobCounters(started=0.0)
    counted.announce(f"model-{i}" for i in range(MAX_MODELS + 10))
    for i in range(MAX_MODELS + 10):
        counted.dispatched(f"model-{i}", 1)
    counted.dispatched("never-announced", 1)
    dispatched = counted.snapshot().dispatched
    assert len(dispatched) == MAX_MODELS + 1
    assert dispatched[OTHER] == 11


def test_a_resubmission_refused_to_another_frontend_is_not_the_jobs_failure(
        harness: BrokerHarness) -> None:
    harness.worker("w1")
    owner = harness.client(owner="frontend-a")
    assert owner.submit(make_spec("j1")).type is MsgType.ACCEPTED
    refusal = harness.client(owner="frontend-b").submit(make_spec("j1"))
    assert (refusal.type, refusal["code"]) == (MsgType.FAILED, ErrorCode.INVALID_REQUEST.value)
    assert counters(harness.client()).failed == {}  # j1 runs on for its owner
