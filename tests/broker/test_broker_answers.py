"""Who may touch a job, and what a worker may answer: job ownership, checked answers,
quarantine of a worker that fails every job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker import protocol
from broker.protocol import ErrorCode, ImageInfo, MsgType
from broker.registry import WorkerState
from tests.broker.fakes import BrokerHarness, FakeWorker, make_spec

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------------------------
# Ownership


def test_another_frontend_cannot_take_over_a_job(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    owner, intruder = harness.client("frontend-a"), harness.client("frontend-b")
    spec = make_spec("j1")
    owner.submit(spec)
    worker.take()
    refused = intruder.submit(spec)
    assert (refused.type, refused["code"]) == (MsgType.FAILED, "invalid_request")
    worker.result(spec)
    assert owner.expect(MsgType.RESULT)["job_id"] == "j1"  # the answer still goes home
    intruder.assert_silent()


def test_another_frontend_cannot_cancel_a_job(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    owner, intruder = harness.client("frontend-a"), harness.client("frontend-b")
    spec = make_spec("j1")
    owner.submit(spec)
    worker.take()
    with harness.consumes(clients=1):
        intruder.cancel("j1")
    worker.assert_silent()  # no CANCEL reached the worker
    assert "j1" in harness.broker.jobs
    worker.result(spec)
    assert owner.expect(MsgType.RESULT)["job_id"] == "j1"


def test_an_old_frontend_without_an_id_owns_its_jobs_by_connection(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    first, second = harness.client(), harness.client()
    first.submit(make_spec("j1"))
    worker.take()
    assert second.submit(make_spec("j1"))["code"] == "invalid_request"
    with harness.consumes(clients=1):
        second.cancel("j1")
    assert "j1" in harness.broker.jobs


# --------------------------------------------------------------------------------------------
# Answers checked against their job


def leased(harness: BrokerHarness, **spec: Any) -> tuple[FakeWorker, Any, Any]:
    worker = harness.worker("w1")
    client = harness.client()
    job = make_spec("j1", **spec)
    client.submit(job)
    worker.take()
    return worker, client, job


@pytest.mark.parametrize("images, why", [
    ([], None),  # a RESULT needs a payload: dropped by the decoder, never a 200
    ([ImageInfo(seed=7, width=64, height=64, format="png")] * 2, "2 image(s) for 1"),
    ([ImageInfo(seed=8, width=64, height=64, format="png")], "seed 8"),
    ([ImageInfo(seed=7, width=64, height=64, format="jpeg")], "'jpeg'"),
    ([ImageInfo(seed=7, width=32, height=64, format="png")], "32x64"),
])
def test_a_result_that_does_not_fit_its_job_is_a_worker_error(
        harness: BrokerHarness, images: list[ImageInfo], why: str | None) -> None:
    worker, client, _ = leased(harness)
    if not images:
        with harness.consumes(workers=1):
            worker.send(protocol.encode(MsgType.RESULT, {"job_id": "j1", "images": []}))
        client.assert_silent(skip=(MsgType.ACCEPTED, MsgType.HEARTBEAT))
        return
    worker.send(protocol.result("j1", images, [b"x"] * len(images)))
    msg = client.expect(MsgType.FAILED)
    assert (msg["code"], msg["retryable"]) == ("worker_error", False)
    assert why in msg["message"]


@pytest.mark.parametrize("code", ["cancelled", "model_not_found", "queue_full", "made_up"])
def test_a_worker_failure_reaches_the_client_as_worker_error_whatever_its_code(
        harness: BrokerHarness, code: str) -> None:
    worker, client, _ = leased(harness)
    worker.send_msg(MsgType.FAILED, {"job_id": "j1", "code": code, "message": "it broke"})
    msg = client.expect(MsgType.FAILED)
    assert (msg["code"], msg["message"]) == ("worker_error", "it broke")


@pytest.mark.parametrize("fields, payloads", [
    ({"step": 3, "steps": 2}, ()),
    ({"step": 1, "steps": 2, "image_index": 1}, (b"preview",)),  # the job has one image
    ({"step": 1, "steps": 2, "image_index": -1}, (b"preview",)),
    ({"step": 1, "steps": 2}, (b"a preview of no image",)),
])
def test_progress_that_does_not_fit_its_job_is_dropped(
        harness: BrokerHarness, fields: dict[str, Any], payloads: tuple[bytes, ...]) -> None:
    worker, client, job = leased(harness)
    with harness.consumes(workers=1):
        worker.send_msg(MsgType.PROGRESS, {"job_id": "j1", **fields}, payloads)
    client.assert_silent(skip=(MsgType.ACCEPTED, MsgType.HEARTBEAT))
    worker.result(job)
    assert client.expect(MsgType.RESULT)["job_id"] == "j1"


def test_a_worker_cannot_announce_room_for_every_job(harness: BrokerHarness) -> None:
    greedy = harness.raw_worker(b"greedy")
    with harness.consumes(workers=1):
        greedy.send_msg(MsgType.READY, {"worker_id": "greedy", "host": "h", "device": "cpu",
                                        "models": ["tiny"], "max_batch": 1, "capacity": 1000})
    assert harness.broker.workers.get(b"greedy") is None


# --------------------------------------------------------------------------------------------
# Quarantine


def fail(worker: FakeWorker, job_id: str) -> None:
    worker.send(protocol.failed(job_id, ErrorCode.WORKER_ERROR, "CUDA error: device lost"))


def test_a_worker_that_fails_every_job_is_quarantined_and_its_jobs_go_elsewhere(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(heartbeat_interval=10.0)  # workers stay alive across the jump
    sick = harness.worker("sick")
    client = harness.client()
    for i in range(5):
        client.submit(make_spec(f"j{i}"))
    failed = []
    for _ in range(3):
        (spec,) = sick.take()
        fail(sick, spec.id)
        failed.append(spec.id)
    # Two failures reach their clients; the third tips the worker into quarantine and its
    # job goes back to the queue (not counted as an attempt).
    assert [client.expect(MsgType.FAILED)["job_id"] for _ in range(2)] == failed[:2]
    harness.wait_for(lambda: harness.broker.workers.get(b"sick").state
                     is WorkerState.QUARANTINED)
    sick.assert_silent()
    healthy = harness.worker("healthy", capacity=2)
    taken = healthy.take() + healthy.take()
    assert (taken[0].id, taken[0].attempt) == (failed[2], 0)
    for spec in taken:
        healthy.result(spec)
    taken += healthy.take()
    healthy.result(taken[-1])
    assert [client.expect(MsgType.RESULT)["job_id"] for _ in range(3)] == ["j2", "j3", "j4"]
    client.send_msg(MsgType.STATUS)
    workers = {w["worker_id"]: w for w in client.expect(MsgType.STATUS_REPLY)["workers"]}
    assert workers["sick"]["state"] == "quarantined"
    assert workers["sick"]["consecutive_failures"] == 3
    assert workers["sick"]["quarantine_left_s"] == 5.0
    # Its time up, it gets work again.
    healthy.send_msg(MsgType.BYE)
    harness.clock.advance(5.0)
    harness.pump()
    client.submit(make_spec("later"))
    assert [s.id for s in sick.take()] == ["later"]
