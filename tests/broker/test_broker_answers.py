"""Who may touch a job, and what a worker may answer: job ownership, checked answers,
quarantine of a worker that fails every job."""

from __future__ import annotations

import time
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


def test_old_frontends_without_an_id_keep_their_jobs_across_reconnections(
        harness: BrokerHarness) -> None:
    # As before owners existed: a resubmission from a new connection re-attaches the job.
    worker = harness.worker("w1")
    first, second = harness.client(), harness.client()
    first.submit(make_spec("j1"))
    worker.take()
    assert second.submit(make_spec("j1")).type is MsgType.ACCEPTED
    # A frontend with an id cannot touch them.
    owned = harness.client("frontend-a")
    assert owned.submit(make_spec("j1"))["code"] == "invalid_request"
    worker.result(make_spec("j1"))
    assert second.expect(MsgType.RESULT)["job_id"] == "j1"


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
    greedy.ready("greedy", max_batch=1, capacity=1000)
    harness.wait_for(lambda: harness.broker.workers.get(b"greedy") is not None)
    assert harness.broker.workers.get(b"greedy").capacity == 2  # one running, one waiting
    client = harness.client()
    for i in range(5):
        client.submit(make_spec(f"j{i}"))
    assert [s.id for s in greedy.take() + greedy.take()] == ["j0", "j1"]
    greedy.assert_silent()
    assert harness.broker.jobs.queue_depth("tiny") == 3


# --------------------------------------------------------------------------------------------
# Quarantine


def fail(worker: FakeWorker, job_id: str) -> None:
    worker.send(protocol.failed(job_id, ErrorCode.WORKER_ERROR, "CUDA error: device lost"))


def serve(harness: BrokerHarness, client: Any, workers: dict[FakeWorker, bool],
          answers: int) -> list[tuple[str, str, str]]:
    """Play the workers (True: it answers, False: it fails every job) until the client has
    ``answers`` answers; return them as (type, job id, code)."""
    got: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + 10
    while len(got) < answers:
        assert time.monotonic() < deadline, got
        harness.pump()
        for worker, healthy in workers.items():
            msg = worker.poll_msg()
            if msg is not None and msg.type is MsgType.JOBS:
                for spec in msg["jobs"]:
                    worker.result(spec) if healthy else fail(worker, spec.id)
        msg = client.poll_msg()
        if msg is not None and msg.type in (MsgType.RESULT, MsgType.FAILED):
            got.append((msg.type.value, msg["job_id"], msg.get("code", "")))
    return got


def test_a_sick_worker_costs_no_request_and_is_quarantined(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(heartbeat_interval=10.0)  # workers stay alive across the jump
    sick, healthy = harness.worker("sick"), harness.worker("healthy")
    client = harness.client()
    for i in range(8):
        client.submit(make_spec(f"j{i}"))
    got = serve(harness, client, {sick: False, healthy: True}, answers=8)
    # Each job the sick worker failed ran again on the healthy one.
    assert sorted(got) == sorted(("result", f"j{i}", "") for i in range(8))
    record = harness.broker.workers.get(sick.identity)
    assert record.state is WorkerState.QUARANTINED
    assert record.failures == 3
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


def test_a_job_that_fails_on_two_workers_fails_and_blames_neither(
        harness: BrokerHarness) -> None:
    first, second = harness.worker("first"), harness.worker("second")
    client = harness.client()
    client.submit(make_spec("poison"))
    got = serve(harness, client, {first: False, second: False}, answers=1)
    assert got == [("failed", "poison", "worker_error")]
    for peer in (first, second):
        record = harness.broker.workers.get(peer.identity)
        assert (record.state, record.failures) == (WorkerState.READY, 0)


def test_many_bad_jobs_quarantine_no_worker(harness: BrokerHarness) -> None:
    # A client that sends jobs that fail everywhere must not take the cluster down.
    first, second = harness.worker("first"), harness.worker("second")
    client = harness.client()
    for i in range(6):
        client.submit(make_spec(f"bad{i}"))
    got = serve(harness, client, {first: False, second: False}, answers=6)
    assert sorted(got) == sorted(("failed", f"bad{i}", "worker_error") for i in range(6))
    assert all(w.state is WorkerState.READY for w in harness.broker.workers)


def test_the_only_worker_of_a_model_fails_jobs_at_once_and_is_never_quarantined(
        harness: BrokerHarness) -> None:
    only = harness.worker("only")
    client = harness.client()
    for i in range(4):
        client.submit(make_spec(f"j{i}"))
    got = serve(harness, client, {only: False}, answers=4)
    assert sorted(got) == sorted(("failed", f"j{i}", "worker_error") for i in range(4))
    assert harness.broker.workers.get(only.identity).state is WorkerState.READY
