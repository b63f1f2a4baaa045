"""An edit's input images and mask travel as payload frames of its SUBMIT, are kept by the broker
as they came (never decoded), and go to the worker in the JOBS message with the job, in order,
again after a worker is lost."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from broker import protocol
from broker.protocol import MAX_INPUTS, MsgType, ProtocolError
from tests.broker.fakes import BrokerHarness, make_spec


def edit(job_id: str, inputs: int = 1, mask: bool = False, **fields: object):
    return make_spec(job_id, inputs=inputs, mask=mask, strength=0.6, **fields)


def frames_of(*names: str) -> list[bytes]:
    return [f"{name}:".encode() + os.urandom(64) for name in names]


def test_a_submits_frames_reach_the_worker_as_they_came(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    spec = edit("e1", inputs=2, mask=True)
    sent = frames_of("first", "second", "mask")
    assert client.submit(spec, sent).type is MsgType.ACCEPTED
    jobs = worker.expect(MsgType.JOBS)
    assert jobs["jobs"] == [spec]
    assert [bytes(frame) for frame in jobs.payloads] == sent


def test_a_batch_carries_each_jobs_frames_in_job_order(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness()
    client = harness.client()
    one, two = edit("e1"), edit("e2")
    sent = {"e1": frames_of("one"), "e2": frames_of("two")}
    client.submit(one, sent["e1"])
    client.submit(two, sent["e2"])
    worker = harness.worker("w1", max_batch=2, capacity=2)  # both queued: one batch
    jobs = worker.expect(MsgType.JOBS)
    order = [spec.id for spec in jobs["jobs"]]
    assert sorted(order) == ["e1", "e2"]
    assert [bytes(f) for f in jobs.payloads] == [f for job_id in order for f in sent[job_id]]


def test_a_lost_workers_edit_goes_out_again_with_its_frames(harness: BrokerHarness) -> None:
    first = harness.worker("w1")
    client = harness.client()
    spec = edit("e1", mask=True)
    sent = frames_of("image", "mask")
    client.submit(spec, sent)
    first.expect(MsgType.JOBS)
    first.send_msg(MsgType.BYE)
    second = harness.worker("w2")
    again = second.expect(MsgType.JOBS)
    assert [s.id for s in again["jobs"]] == ["e1"]
    assert [bytes(f) for f in again.payloads] == sent


def test_edits_batch_only_with_their_own_kind() -> None:
    plain, image, masked = make_spec("g"), edit("e"), edit("m", mask=True)
    weaker = make_spec("w", inputs=1, strength=0.3)
    keys = {spec.batch_key() for spec in (plain, image, masked, weaker)}
    assert len(keys) == 4
    assert (plain.mode, image.mode, masked.mode) == ("generate", "edit", "inpaint")


@pytest.mark.parametrize("spec, frames", [
    (edit("e", inputs=1), 0),  # an input announced, none sent
    (edit("e", inputs=1), 2),  # more frames than announced
    (edit("e", inputs=2, mask=True), 2),  # the mask missing
    (make_spec("g"), 1),  # a generation with a stray frame
])
def test_frames_that_do_not_match_the_job_are_refused(spec, frames: int) -> None:
    with pytest.raises(ProtocolError, match="payload frames"):
        protocol.decode(protocol.submit(spec, "o", [b"x"] * frames))


@pytest.mark.parametrize("fields", [
    {"inputs": MAX_INPUTS + 1},
    {"inputs": -1},
    {"inputs": 0, "mask": True},  # a mask with nothing to edit
    {"inputs": 1, "strength": 1.5},
    {"inputs": 1, "strength": -0.1},
    {"inputs": 1, "strength": float("nan")},
    {"inputs": 1, "strength": float("inf")},
])
def test_odd_edit_fields_are_refused(fields: dict) -> None:
    wire = {**make_spec("e").to_wire(), **fields}
    frames = [b"x"] * (max(0, fields.get("inputs", 0)) + int(fields.get("mask", False)))
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode(MsgType.SUBMIT, {"job": wire, "owner": "o"}, frames))


def test_a_frame_over_the_client_limit_is_dropped_and_the_broker_goes_on(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(max_client_frame=1 << 16)
    worker = harness.worker("w1")
    big = harness.client()
    big.send(protocol.submit(edit("big"), "o", [os.urandom(1 << 17)]))
    big.assert_silent(0.3)  # libzmq drops the connection's message; nothing is queued
    assert "big" not in harness.broker.jobs
    client = harness.client()
    assert client.submit(edit("small"), frames_of("small")).type is MsgType.ACCEPTED
    assert [s.id for s in worker.take()] == ["small"]


def test_past_its_input_budget_the_broker_refuses_edits_not_generations(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(max_input_bytes=300)
    client = harness.client()
    harness.worker("w1")
    assert client.submit(edit("e1"), [os.urandom(200)]).type is MsgType.ACCEPTED
    refused = client.submit(edit("e2"), [os.urandom(200)])
    assert (refused.type, refused["code"], refused["retryable"]) == \
        (MsgType.FAILED, "queue_full", True)
    assert client.submit(make_spec("plain")).type is MsgType.ACCEPTED
    assert harness.broker.jobs.input_bytes == 200
    client.cancel("e1")  # its frames leave with it
    assert client.expect(MsgType.FAILED)["job_id"] == "e1"
    assert harness.broker.jobs.input_bytes == 0
    assert client.submit(edit("e3"), [os.urandom(200)]).type is MsgType.ACCEPTED


def test_one_edit_larger_than_the_whole_budget_is_not_worth_retrying(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(max_input_bytes=100)
    harness.worker("w1")
    refused = harness.client().submit(edit("huge"), [os.urandom(200)])
    assert (refused.type, refused["code"], refused["retryable"]) == \
        (MsgType.FAILED, "invalid_request", False)
