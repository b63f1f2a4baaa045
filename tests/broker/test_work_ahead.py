"""The work ahead of a waiting job, in megapixel-steps: what the jobs ahead of it will cost and
what is left of the batches running now, so that a wait behind one large job is not taken for
a wait behind one small one."""

from __future__ import annotations

import math
import time

import pytest

from broker import protocol
from broker.jobs import Job, JobTable
from broker.protocol import JobSpec, MsgType, ProtocolError
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker, make_spec

SMALL = make_spec("small")  # 2 steps of one 64x64 image
LARGE = make_spec("large", width=1024, height=1024, steps=50, seeds=(1, 2))


def work_heard(client: FakeClient, spec: JobSpec) -> float:
    msg = client.submit(spec)
    assert msg.type is MsgType.ACCEPTED, msg
    return float(msg["work_ahead"])


def progress(worker: FakeWorker, spec: JobSpec, step: int) -> None:
    worker.send_msg(MsgType.PROGRESS, {"job_id": spec.id, "step": step, "steps": spec.steps})


def test_a_jobs_work_is_its_steps_times_all_its_pixels() -> None:
    assert SMALL.work == pytest.approx(2 * 64 * 64 / 1e6)
    assert LARGE.work == pytest.approx(50 * 2 * 1024 * 1024 / 1e6)


def test_a_new_job_hears_the_work_of_every_job_ahead(harness: BrokerHarness) -> None:
    worker = harness.worker("w1", capacity=2)
    client = harness.client()
    assert work_heard(client, make_spec("j0")) == 0.0  # nothing ahead, nothing running
    worker.take()  # j0 runs, not started: all of it is left
    assert work_heard(client, LARGE) == pytest.approx(SMALL.work, abs=1e-3)
    worker.take()  # LARGE waits at the worker
    behind = work_heard(client, make_spec("j2"))
    assert behind == pytest.approx(SMALL.work + LARGE.work, abs=1e-3)
    last = work_heard(client, make_spec("j3"))
    assert last == pytest.approx(2 * SMALL.work + LARGE.work, abs=1e-3)


def test_progress_shrinks_what_is_left_of_the_running_batch(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    big = make_spec("big", width=512, height=512, steps=10)
    client.submit(big)
    worker.take()
    assert work_heard(client, make_spec("a")) == pytest.approx(big.work, abs=1e-3)
    progress(worker, big, 4)
    client.expect(MsgType.PROGRESS)  # relayed: the broker has read it
    assert work_heard(client, make_spec("b")) == pytest.approx(
        0.6 * big.work + SMALL.work, abs=1e-3)


def test_announcements_carry_the_work_ahead(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(LARGE)
    worker.take()
    client.submit(make_spec("j1"))
    client.submit(make_spec("j2"))
    worker.result(LARGE)  # the large one is done: the line moves up
    client.expect(MsgType.RESULT)
    worker.heartbeat()
    harness.clock.advance(0.6)
    heard: dict[str, float] = {}
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and len(heard) < 2:
        harness.pump()
        msg = client.poll_msg()
        if msg is not None and msg.type is MsgType.ACCEPTED:
            heard[msg["job_id"]] = msg["work_ahead"]
    # j1 was leased at once (the worker had room); j2 waits behind it.
    assert heard.get("j2") == pytest.approx(SMALL.work, abs=1e-3)


def test_a_job_back_in_line_counts_all_its_work_again(harness: BrokerHarness) -> None:
    first = harness.worker("w1")
    client = harness.client()
    big = make_spec("big", width=512, height=512, steps=10)
    client.submit(big)
    first.take()
    progress(first, big, 9)
    client.expect(MsgType.PROGRESS)
    first.send_msg(MsgType.BYE)  # its worker goes: big is back in line, not started
    harness.wait_for(lambda: harness.broker.jobs.queue_depth(big.model) == 1)
    assert work_heard(client, make_spec("next")) == pytest.approx(big.work, abs=1e-3)


def test_a_resubmitted_queued_job_hears_its_work_ahead(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(LARGE)
    worker.take()
    waiting = make_spec("waiting")
    client.submit(waiting)
    assert work_heard(client, waiting) == pytest.approx(LARGE.work, abs=1e-3)


# ------------------------------------------------------------------ the job table's sum

def table() -> JobTable:
    return JobTable(max_queue=100, max_attempts=3)


def job(spec: JobSpec) -> Job:
    return Job(spec=spec, client=b"c", deadline=math.inf)


def test_the_queued_work_follows_every_way_a_job_leaves_the_queue() -> None:
    jobs = table()
    a, b, c, d = (job(make_spec(name, steps=steps)) for name, steps in
                  (("a", 3), ("b", 5), ("c", 7), ("d", 11)))
    for each in (a, b, c, d):
        jobs.add(each)
    per_step = 64 * 64 / 1e6
    assert jobs.queued_work(a.model) == pytest.approx(26 * per_step)
    jobs.finish("b")  # cancelled
    assert jobs.queued_work(a.model) == pytest.approx(21 * per_step)
    assert jobs.take_batch(a.model, b"w", 1) == [a]
    assert jobs.queued_work(a.model) == pytest.approx(18 * per_step)
    jobs.claim(c)  # a worker re-registered holding it
    assert jobs.queued_work(a.model) == pytest.approx(11 * per_step)
    jobs.requeue(a)  # its worker was lost: back in line
    assert jobs.queued_work(a.model) == pytest.approx(14 * per_step)
    jobs.drop_queue(a.model)
    assert jobs.queued_work(a.model) == 0.0


def test_an_emptied_queue_holds_no_work_exactly() -> None:
    jobs = table()
    odd = [job(make_spec(f"j{i}", width=48 + 16 * (i % 5), steps=1 + i % 7)) for i in range(500)]
    for each in odd:
        jobs.add(each)
    for each in odd:
        jobs.finish(each.id)
    assert jobs.queued_work(odd[0].model) == 0.0  # no float residue left behind


# ------------------------------------------------------------------ on the wire

@pytest.mark.parametrize("work_ahead", [math.inf, -math.inf, math.nan, -1.0, "lots", True])
def test_an_accepted_with_an_odd_work_ahead_is_refused(work_ahead: object) -> None:
    frames = protocol.encode(MsgType.ACCEPTED, {"job_id": "j", "position": 0,
                                                "work_ahead": work_ahead})
    with pytest.raises(ProtocolError):
        protocol.decode(frames)


def test_an_accepted_without_work_ahead_is_read_as_before() -> None:
    msg = protocol.decode(protocol.encode(MsgType.ACCEPTED, {"job_id": "j", "position": 2}))
    assert msg.get("work_ahead") is None and msg["position"] == 2


@pytest.mark.parametrize("drawn", [math.inf, -1.0, "big"])
def test_stats_with_an_odd_step_megapixels_are_refused(drawn: object) -> None:
    with pytest.raises(ProtocolError):
        protocol.WorkerStats.from_wire({"step_megapixels": drawn})
