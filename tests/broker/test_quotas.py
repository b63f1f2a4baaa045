"""Quotas: each identity's jobs queued, jobs running and submissions a minute, enforced by the
broker (broker/quotas.py) on a fake clock, first alone and then in a real Broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.jobs import Job, JobState, JobTable
from broker.protocol import JobSpec, MsgType, Quota
from broker.quotas import Quotas
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker, make_spec

pytestmark = pytest.mark.timeout(30)

# A slow heartbeat keeps fake workers alive while the fake clock moves by minutes; the startup
# grace (2 x 3 heartbeats), when resubmissions are never refused, is over after GRACE.
HEARTBEAT = 100.0
GRACE = 6 * HEARTBEAT


def spec_of(tenant: str | None, job_id: str = "j", **limits: int) -> JobSpec:
    # Deadlines far past the minutes the fake clock moves, unless a test waits for one.
    return make_spec(job_id, tenant=tenant, quota=Quota(**limits) if limits else None,
                     timeout=10 * GRACE)


def job_of(spec: JobSpec) -> Job:
    return Job(spec=spec, client=b"client", deadline=1e9)


def queue(quotas: Quotas, spec: JobSpec, now: float = 0.0) -> Job | None:
    """Admit ``spec`` and count it queued, as the broker does; None when refused."""
    if quotas.admit(spec, now) is not None:
        return None
    job = job_of(spec)
    quotas.recount(job, held=True)
    return job


# --------------------------------------------------------------------------------------------
# Quotas alone


def test_the_bucket_takes_per_minute_at_once_then_one_every_interval() -> None:
    quotas = Quotas()
    spec = spec_of("alice", per_minute=3)
    assert [quotas.admit(spec, 0.0) for _ in range(3)] == [None, None, None]
    refusal = quotas.admit(spec, 0.0)
    assert refusal is not None
    assert refusal.limit == "per_minute"
    assert refusal.retry_after == pytest.approx(20.0)  # 60 / 3: when the next token comes
    assert "alice" in refusal.message and "per_minute=3" in refusal.message
    later = quotas.admit(spec, 15.0)
    assert later is not None and later.retry_after == pytest.approx(5.0)
    assert quotas.admit(spec, 20.0) is None  # a token came, and it is taken
    assert quotas.admit(spec, 20.0) is not None
    assert [quotas.admit(spec, 200.0) for _ in range(4)][:3] == [None, None, None]  # full, 3


def test_a_refused_submission_takes_no_token() -> None:
    quotas = Quotas()
    spec = spec_of("alice", per_minute=1, max_queued=1)
    assert queue(quotas, spec) is not None
    refusal = quotas.admit(spec, 0.0)
    assert refusal is not None and refusal.limit == "max_queued"
    assert refusal.retry_after is None  # the broker cannot tell: the frontend's hint goes


def test_max_queued_admits_the_nth_refuses_the_next_and_recovers() -> None:
    quotas = Quotas()
    spec = spec_of("alice", max_queued=2)
    first, second = queue(quotas, spec), queue(quotas, spec)
    assert first is not None and second is not None
    assert quotas.usage("alice") == (2, 0)
    refusal = quotas.admit(spec, 0.0)
    assert refusal is not None and refusal.limit == "max_queued"
    assert refusal.message.startswith("alice has 2 jobs queued, its limit (max_queued=2)")
    first.state = JobState.RUNNING  # dispatched: no longer queued
    quotas.recount(first, held=True)
    assert quotas.usage("alice") == (1, 1)
    assert queue(quotas, spec) is not None


def test_without_limits_nothing_is_refused_or_remembered() -> None:
    quotas = Quotas()
    for tenant in ("alice", None):
        spec = spec_of(tenant)
        for _ in range(100):
            assert queue(quotas, spec) is not None
    assert len(quotas) == 0
    assert quotas.usage("alice") == (0, 0)
    assert not quotas.running_full("alice")


def test_identities_are_counted_apart() -> None:
    quotas = Quotas()
    alice, bob = spec_of("alice", max_queued=1, per_minute=1), spec_of("bob", max_queued=1)
    assert queue(quotas, alice) is not None
    assert queue(quotas, alice) is None
    assert queue(quotas, bob) is not None
    assert quotas.usage("alice") == quotas.usage("bob") == (1, 0)


def test_the_latest_jobs_limits_win() -> None:
    quotas = Quotas()
    assert queue(quotas, spec_of("alice", max_queued=1)) is not None
    assert queue(quotas, spec_of("alice", max_queued=1)) is None
    assert queue(quotas, spec_of("alice", max_queued=2)) is not None  # the keys file changed
    assert queue(quotas, spec_of("alice")) is not None  # and lost its limits
    assert quotas.usage("alice") == (3, 0)  # its jobs still count


def test_running_full_at_max_running() -> None:
    quotas = Quotas()
    spec = spec_of("alice", max_running=1)
    job = queue(quotas, spec)
    assert job is not None and not quotas.running_full("alice")
    job.state = JobState.RUNNING
    quotas.recount(job, held=True)
    assert quotas.running_full("alice")
    quotas.recount(job, held=False)  # answered
    assert not quotas.running_full("alice")


def test_idle_identities_are_forgotten_once_their_bucket_is_full() -> None:
    quotas = Quotas()
    spec = spec_of("alice", per_minute=2)
    job = queue(quotas, spec)
    assert job is not None
    quotas.recount(job, held=False)
    quotas.recount(job, held=False)  # twice: counted out once
    assert quotas.usage("alice") == (0, 0)
    quotas.forget_idle(10.0)
    assert len(quotas) == 1  # half a token short: forgetting it would give it back
    quotas.forget_idle(30.0)
    assert len(quotas) == 0
    busy = queue(quotas, spec_of("bob", max_queued=5), now=30.0)
    assert busy is not None
    quotas.forget_idle(1e6)
    assert len(quotas) == 1  # a job queued: kept however long


# --------------------------------------------------------------------------------------------
# In the broker


@pytest.fixture
def quota_harness(make_harness: Callable[..., BrokerHarness]) -> BrokerHarness:
    harness = make_harness(heartbeat_interval=HEARTBEAT)
    harness.clock.advance(GRACE)
    return harness


def usage(harness: BrokerHarness, tenant: str = "alice") -> tuple[int, int]:
    return harness.broker.quotas.usage(tenant)


def refused(msg: object, limit: str) -> bool:
    assert msg.type is MsgType.FAILED, msg  # type: ignore[attr-defined]
    fields = msg.fields  # type: ignore[attr-defined]
    assert (fields["code"], fields["retryable"]) == ("quota_exceeded", True), fields
    assert limit in fields["message"], fields
    return True


def test_broker_refuses_the_job_past_max_queued_and_takes_one_after_a_cancel(
        quota_harness: BrokerHarness) -> None:
    worker = quota_harness.worker("w1")
    client = quota_harness.client()
    specs = [spec_of("alice", f"a{i}", max_queued=2) for i in range(5)]
    assert client.submit(specs[0]).type is MsgType.ACCEPTED
    worker.take()  # running: it does not count as queued
    assert [client.submit(s).type for s in specs[1:3]] == [MsgType.ACCEPTED] * 2
    assert usage(quota_harness) == (2, 1)
    msg = client.submit(specs[3])
    assert refused(msg, "max_queued")
    assert "retry_after" not in msg.fields  # the frontend's own hint goes in Retry-After
    assert msg["message"].startswith("alice has 2 jobs queued, its limit (max_queued=2)")
    assert "a3" not in quota_harness.broker.jobs
    # Another identity is not held back by alice's limit.
    assert client.submit(spec_of("bob", "b0", max_queued=2)).type is MsgType.ACCEPTED
    client.cancel("a1")
    client.expect(MsgType.FAILED)
    assert client.submit(specs[4]).type is MsgType.ACCEPTED


def test_broker_rate_limit_says_when_to_retry(quota_harness: BrokerHarness) -> None:
    quota_harness.worker("w1", capacity=8)
    client = quota_harness.client()
    specs = [spec_of("carol", f"c{i}", per_minute=3) for i in range(5)]
    assert [client.submit(s).type for s in specs[:3]] == [MsgType.ACCEPTED] * 3
    msg = client.submit(specs[3])
    assert refused(msg, "per_minute=3")
    assert msg["retry_after"] == pytest.approx(20.0)
    quota_harness.clock.advance(20.0)
    assert client.submit(specs[3]).type is MsgType.ACCEPTED  # the refused id, sent again
    assert refused(client.submit(specs[4]), "per_minute")


def test_a_resubmission_is_neither_counted_again_nor_refused(
        quota_harness: BrokerHarness) -> None:
    worker = quota_harness.worker("w1", capacity=1)
    client = quota_harness.client(owner="frontend-1")
    client.submit(spec_of("bob", "b0"))
    worker.take()  # the worker is busy: alice's jobs stay queued
    spec = spec_of("alice", "a0", max_queued=1, per_minute=1)
    assert client.submit(spec).type is MsgType.ACCEPTED
    for _ in range(3):  # a frontend that reconnected sends its waiting jobs again
        assert client.submit(spec).type is MsgType.ACCEPTED
    assert usage(quota_harness) == (1, 0)
    assert refused(client.submit(spec_of("alice", "a1", max_queued=1, per_minute=1)),
                   "max_queued")


def test_right_after_a_restart_resubmissions_are_counted_not_refused(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(heartbeat_interval=HEARTBEAT)  # just started: in its grace
    client = harness.client()
    specs = [spec_of("alice", f"a{i}", max_queued=1, per_minute=1) for i in range(3)]
    assert [client.submit(s).type for s in specs[:2]] == [MsgType.ACCEPTED] * 2
    assert usage(harness) == (2, 0)
    worker = harness.worker("w1", capacity=1)
    harness.wait_for(lambda: usage(harness) == (1, 1))
    for _ in range(6):  # past the grace, the worker alive all along
        harness.clock.advance(HEARTBEAT)
        with harness.consumes(workers=1):
            worker.heartbeat()
    while client.poll_msg() is not None:  # position updates
        pass
    assert refused(client.submit(specs[2]), "max_queued")


def test_a_job_a_worker_claims_counts_as_running_and_is_never_refused(
        quota_harness: BrokerHarness) -> None:
    client = quota_harness.client()
    worker = quota_harness.worker("w1", capacity=2, held=["claimed"])
    first = spec_of("alice", "a0", per_minute=1, max_running=5)
    assert client.submit(first).type is MsgType.ACCEPTED  # the only token
    worker.take()
    claimed = spec_of("alice", "claimed", per_minute=1, max_running=5)
    msg = client.submit(claimed)
    assert (msg.type, msg["position"]) == (MsgType.ACCEPTED, 0)
    assert usage(quota_harness) == (0, 2)


def test_max_running_holds_an_identitys_jobs_queued_not_refused(
        quota_harness: BrokerHarness) -> None:
    worker = quota_harness.worker("w1", capacity=2)
    client = quota_harness.client()
    a0, a1 = (spec_of("alice", f"a{i}", max_running=1) for i in range(2))
    b0 = spec_of("bob", "b0", max_running=1)
    assert [client.submit(s).type for s in (a0, a1)] == [MsgType.ACCEPTED] * 2
    assert worker.take() == [a0]
    assert client.submit(b0).type is MsgType.ACCEPTED  # alice's a1 waits; bob's goes
    assert worker.take() == [b0]
    assert usage(quota_harness) == (1, 1)
    worker.result(a0)
    client.expect(MsgType.RESULT)
    assert worker.take() == [a1]  # dispatch tries again once one of alice's ended
    assert usage(quota_harness) == (0, 1)


def test_a_batch_never_takes_an_identity_past_max_running() -> None:
    """Batch mates count: three of alice's compatible jobs queued, room for two, a worker
    that batches four: the batch takes two of hers and bob's one."""
    quotas = Quotas()
    table = JobTable(max_queue=100, max_attempts=3, usage=quotas)
    specs = [spec_of("alice", f"a{i}", max_running=2) for i in range(3)]
    specs.append(spec_of("bob", "b0"))
    for spec in specs:
        assert quotas.admit(spec, 0.0) is None
        table.add(job_of(spec))
    batch = table.take_batch(specs[0].model, b"w", 4)
    assert sorted(job.id for job in batch) == ["a0", "a1", "b0"]
    assert quotas.usage("alice") == (1, 2) and quotas.running_full("alice")
    assert table.take_batch(specs[0].model, b"w", 4) == []  # a2 waits for one of hers to end
    table.finish("a0")
    assert [job.id for job in table.take_batch(specs[0].model, b"w", 4)] == ["a2"]


# Every way a job ends, or moves between queued and running: the counts follow each.


def end_by_result(h: BrokerHarness, w: FakeWorker, c: FakeClient, spec: JobSpec) -> None:
    w.result(spec)
    c.expect(MsgType.RESULT)


def end_by_worker_failure(h: BrokerHarness, w: FakeWorker, c: FakeClient,
                          spec: JobSpec) -> None:
    w.send_msg(MsgType.FAILED, {"job_id": spec.id, "code": "worker_error", "message": "oom"})
    assert c.expect(MsgType.FAILED)["code"] == "worker_error"  # the only worker: it fails


def end_by_failing_on_two_workers(h: BrokerHarness, w: FakeWorker, c: FakeClient,
                                  spec: JobSpec) -> None:
    other = h.worker("other", capacity=2)
    w.send_msg(MsgType.FAILED, {"job_id": spec.id, "code": "worker_error", "message": "oom"})
    assert [s.id for s in other.take()] == [spec.id]  # handed back, run elsewhere
    assert usage(h) == held_states(h) == (1, 1)
    other.send_msg(MsgType.FAILED, {"job_id": spec.id, "code": "worker_error", "message": "oom"})
    assert c.expect(MsgType.FAILED)["code"] == "worker_error"


def end_by_cancel(h: BrokerHarness, w: FakeWorker, c: FakeClient, spec: JobSpec) -> None:
    c.cancel(spec.id)
    assert c.expect(MsgType.FAILED)["code"] == "cancelled"


def end_by_deadline(h: BrokerHarness, w: FakeWorker, c: FakeClient, spec: JobSpec) -> None:
    h.clock.advance(spec.timeout + 1)
    assert c.expect(MsgType.FAILED)["code"] == "timeout"


def end_by_losing_every_worker(h: BrokerHarness, w: FakeWorker, c: FakeClient,
                               spec: JobSpec) -> None:
    for attempt in range(1, 4):
        h.clock.advance(3 * HEARTBEAT + 1)  # the worker is dead: requeued, or failed
        if attempt < 3:
            w = h.worker(f"again{attempt}", capacity=2)
            assert [s.id for s in w.take()] == [spec.id]
            assert usage(h) == held_states(h)
    assert c.expect(MsgType.FAILED)["code"] == "worker_lost"


def end_by_bye_then_result(h: BrokerHarness, w: FakeWorker, c: FakeClient,
                           spec: JobSpec) -> None:
    w.send_msg(MsgType.BYE)  # handed back unstarted: queued again
    h.wait_for(lambda: h.broker.workers.get(b"w") is None)
    assert usage(h) == held_states(h) == (2, 0)
    other = h.worker("other", capacity=2)
    assert [s.id for s in other.take()] == [spec.id]
    end_by_result(h, other, c, spec)


def end_by_reconnecting_without_it(h: BrokerHarness, w: FakeWorker, c: FakeClient,
                                   spec: JobSpec) -> None:
    again = h.raw_worker(b"w-new-connection")
    again.ready("w", capacity=2, held=[])  # the same process: what it no longer holds goes back
    assert [s.id for s in again.take()] == [spec.id]
    assert usage(h) == held_states(h) == (1, 1)
    end_by_result(h, again, c, spec)


ENDINGS = [end_by_result, end_by_worker_failure, end_by_failing_on_two_workers, end_by_cancel,
           end_by_deadline, end_by_losing_every_worker, end_by_bye_then_result,
           end_by_reconnecting_without_it]


def held_states(h: BrokerHarness) -> tuple[int, int]:
    """(queued, running) of alice's jobs as the job table holds them: what usage must say."""
    states = [job.state for job in map(h.broker.jobs.get, ("a0", "a1")) if job is not None]
    return states.count(JobState.QUEUED), states.count(JobState.RUNNING)


@pytest.mark.parametrize("ending", ENDINGS, ids=lambda f: f.__name__)
def test_counts_return_to_zero_however_jobs_end(
        quota_harness: BrokerHarness,
        ending: Callable[[BrokerHarness, FakeWorker, FakeClient, JobSpec], None]) -> None:
    worker = quota_harness.worker("w", capacity=2)
    client = quota_harness.client()
    running, waiting = (spec_of("alice", f"a{i}", max_queued=5, max_running=1)
                        for i in range(2))
    client.submit(running)
    client.submit(waiting)  # queued behind alice's max_running
    assert worker.take() == [running]
    assert usage(quota_harness) == (1, 1)
    ending(quota_harness, worker, client, running)
    assert running.id not in quota_harness.broker.jobs
    quota_harness.pump()
    assert usage(quota_harness) == held_states(quota_harness)
    if waiting.id in quota_harness.broker.jobs:  # queued or running now: cancelled
        end_by_cancel(quota_harness, worker, client, waiting)
    assert usage(quota_harness) == (0, 0)
    quota_harness.clock.advance(HEARTBEAT / 4)  # when the broker next looks
    quota_harness.pump()
    assert len(quota_harness.broker.quotas) == 0  # nothing left to remember


def test_counts_return_to_zero_when_a_queue_is_dropped(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(heartbeat_interval=HEARTBEAT)  # in its startup grace
    client = harness.client()
    client.submit(spec_of("alice", "a0", max_queued=5))
    assert usage(harness) == (1, 0)
    harness.clock.advance(GRACE)  # no worker ever came for its model: the queue goes
    assert client.expect(MsgType.FAILED)["code"] == "no_worker"
    assert usage(harness) == (0, 0)
