"""Tests for broker.leases.Leases: each change keeps the job's side and the worker's in step."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker import protocol
from broker.jobs import Job, JobState, JobTable
from broker.leases import Leases
from broker.protocol import MsgType
from broker.registry import WorkerRecord, WorkerRegistry
from tests.broker.fakes import make_spec

CLIENT = b"client"
NOW = 100.0


class Table:
    """A job table, a registry and the leases between them, as the broker holds them."""

    def __init__(self, *, max_attempts: int = 3) -> None:
        self.jobs = JobTable(max_queue=100, max_attempts=max_attempts)
        self.workers = WorkerRegistry(liveness=3.0)
        self.leases = Leases(self.jobs, self.workers)

    def worker(self, name: str, *, capacity: int = 2, max_batch: int = 1,
               models: tuple[str, ...] = ("tiny",), session: str = "s") -> WorkerRecord:
        ready = protocol.decode(protocol.encode(MsgType.READY, {
            "worker_id": name, "host": "h", "device": "cpu", "models": list(models),
            "capacity": capacity, "max_batch": max_batch, "session": session}))
        return self.workers.register(name.encode(), ready, NOW)

    def queue(self, *job_ids: str, **spec: Any) -> list[Job]:
        made = [Job(spec=make_spec(job_id, **spec), client=CLIENT, deadline=NOW + 60)
                for job_id in job_ids]
        for job in made:
            self.jobs.add(job)
        return made

    def lease(self, worker: WorkerRecord, n: int = 1, model: str = "tiny") -> list[Job]:
        """Take ``n`` queued jobs and lease them to ``worker``, as a dispatch round does."""
        batch = self.jobs.take_batch(model, worker.identity, n)
        self.leases.lease(worker, batch, NOW)
        return batch

    def queued(self, model: str = "tiny") -> list[str]:
        return [job.id for job in self.jobs.head(model, 100)]


def held_by(job: Job, worker: WorkerRecord) -> bool:
    """Both sides say ``worker`` holds ``job``."""
    return (job.state is JobState.RUNNING and job.worker == worker.identity
            and job.id in worker.running)


def back_in_queue(job: Job, *workers: WorkerRecord) -> bool:
    """Both sides say nobody holds ``job``: it waits in its queue."""
    return (job.state is JobState.QUEUED and job.worker is None
            and not any(job.id in w.running for w in workers))


@pytest.fixture
def t() -> Table:
    return Table()


def test_lease_names_the_holder_on_both_sides_and_takes_its_room(t: Table) -> None:
    w = t.worker("w", capacity=2, max_batch=2)
    a, b = t.queue("a", "b")
    assert t.lease(w, 2) == [a, b]
    assert held_by(a, w) and held_by(b, w)
    assert w.running == {"a", "b"} and w.free == 0 and w.last_dispatch == NOW
    assert t.workers.next_free("tiny") is None  # no room: no longer a candidate


def test_held_is_the_job_only_for_its_holder(t: Table) -> None:
    w, other = t.worker("w"), t.worker("other")
    (a,) = t.queue("a")
    t.lease(w)
    assert t.leases.held(w, "a") is a
    assert t.leases.held(other, "a") is None
    assert t.leases.held(w, "never-leased") is None


def test_release_frees_the_slot_and_the_job_follows_when_finished(t: Table) -> None:
    w = t.worker("w", capacity=1)
    (a,) = t.queue("a")
    t.lease(w)
    t.leases.release(w, "a")
    assert a.worker == w.identity  # until the answer finishes the job or hands it back
    assert w.running == set() and w.free == 1
    assert t.workers.next_free("tiny") is w
    t.jobs.finish("a")
    assert "a" not in t.jobs
    t.leases.release(w, "a")  # twice (a late duplicate answer) changes nothing
    assert w.running == set()


def test_stop_keeps_the_slot_until_the_worker_answers(t: Table) -> None:
    w = t.worker("w", capacity=1)
    (a,) = t.queue("a")
    t.lease(w)
    t.jobs.finish("a")  # cancelled
    assert t.leases.stop(a, NOW + 1) == w.identity  # the broker sends it a CANCEL
    assert w.running == {"a"} and w.ending == {"a": NOW + 1} and w.free == 0
    t.leases.release(w, "a")  # its FAILED "cancelled"
    assert w.running == set() and w.ending == {} and w.free == 1


def test_stop_of_a_queued_job_tells_nobody(t: Table) -> None:
    t.worker("w")
    (a,) = t.queue("a")
    t.jobs.finish("a")
    assert t.leases.stop(a, NOW) is None


def test_a_job_leased_back_to_the_worker_stopping_it_stays_leased_there(t: Table) -> None:
    """Found by the state machine below: a claim moves a job from ``early``, which is told to
    stop it; the claimant goes, the job is queued again and leased back to ``early``. A
    heartbeat of ``early`` that does not list the stopped run must not free the new lease,
    or the job would sit leased to a worker that no longer counts it, until its deadline."""
    early, holder = t.worker("early"), t.worker("holder", session="h")
    (a,) = t.queue("a")
    t.lease(early)
    t.leases.claim(holder, "a", NOW)  # early: CANCEL, its slot ``ending``
    t.leases.drop_worker(holder, lost=False)  # handed back, unstarted
    assert a.state is JobState.QUEUED and a.worker is None and "a" in early.ending
    t.lease(early)
    t.leases.settle(early, [], NOW + 10, after=2.0)  # a heartbeat from before the new JOBS
    assert held_by(a, early) and early.ending == {}


def test_settle_frees_a_stopped_job_an_old_worker_never_answered(t: Table) -> None:
    w = t.worker("w", capacity=2)
    a, b = t.queue("a", "b")
    t.lease(w, 1)
    t.lease(w, 1)
    for job in (a, b):
        t.jobs.finish(job.id)
        t.leases.stop(job, NOW)
    t.leases.settle(w, [], NOW + 1.0, after=2.0)  # too soon: sent before the CANCEL
    assert w.running == {"a", "b"}
    t.leases.settle(w, ["b"], NOW + 2.0, after=2.0)  # still runs b
    assert w.running == {"b"} and w.ending == {"b": NOW} and w.free == 1


def test_hand_back_puts_the_job_first_in_line_without_an_attempt(t: Table) -> None:
    w = t.worker("w")
    a, _ = t.queue("a", "b")
    t.lease(w)
    t.leases.hand_back(a)
    assert back_in_queue(a, w) and a.attempt == 0
    assert w.running == set() and w.free == 2
    assert t.queued() == ["a", "b"]


def test_requeue_counts_an_attempt_and_fails_the_last(t: Table) -> None:
    w = t.worker("w")
    (a,) = t.queue("a")
    for attempt in (1, 2):
        t.lease(w)
        assert t.leases.requeue(a)
        assert back_in_queue(a, w) and a.attempt == attempt
    t.lease(w)
    assert not t.leases.requeue(a)  # max_attempts = 3
    assert "a" not in t.jobs and a.worker is None and w.running == set()


def test_a_lost_worker_leaves_with_its_jobs_requeued_oldest_first(t: Table) -> None:
    w = t.worker("w", capacity=4, max_batch=2)
    a, b, c, _ = t.queue("a", "b", "c", "d")
    t.lease(w, 2)
    c.attempt = 2  # one more loss and it has used up its attempts
    t.lease(w, 1)
    assert t.leases.drop_worker(w, lost=True) == [c]
    assert t.workers.get(w.identity) is None
    assert w.running == set() and w.ending == {}
    assert all(back_in_queue(job, w) and job.attempt == 1 for job in (a, b))
    assert "c" not in t.jobs
    assert t.queued() == ["a", "b", "d"]


def test_a_worker_that_says_goodbye_hands_its_jobs_back(t: Table) -> None:
    w = t.worker("w", capacity=2)
    a, b = t.queue("a", "b")
    t.lease(w, 1)
    t.lease(w, 1)
    b.attempt = 2
    assert t.leases.drop_worker(w, lost=False) == []
    assert t.workers.get(w.identity) is None
    assert back_in_queue(a, w) and back_in_queue(b, w)
    assert (a.attempt, b.attempt) == (0, 2)
    assert t.queued() == ["a", "b"]


def test_dropping_a_worker_leaves_a_job_it_no_longer_holds_alone(t: Table) -> None:
    w, other = t.worker("w"), t.worker("other", session="o")
    (a,) = t.queue("a")
    t.lease(w)
    assert t.leases.claim(other, "a", NOW) == w.identity  # moved to `other`
    t.leases.drop_worker(w, lost=True)
    assert held_by(a, other) and a.attempt == 0


def test_registering_again_on_the_same_connection_keeps_everything(t: Table) -> None:
    w = t.worker("w", capacity=2)
    a, b = t.queue("a", "b")
    t.lease(w, 1)
    t.lease(w, 1)
    t.jobs.finish("b")
    t.leases.stop(b, NOW)
    again = t.workers.register(w.identity, protocol.decode(protocol.encode(MsgType.READY, {
        "worker_id": "w", "host": "h", "device": "cpu", "models": ["tiny"],
        "capacity": 2})), NOW + 1, keep=w)
    assert again.running == set()  # the registry carries health over, not leases
    t.leases.keep(w, again)
    assert held_by(a, again) and again.ending == {"b": NOW} and again.free == 0


def test_a_move_keeps_what_the_worker_still_holds_and_hands_back_the_rest(t: Table) -> None:
    old = t.worker("w", capacity=3)
    a, b, _ = t.queue("a", "b", "c")
    t.lease(old, 1)
    t.lease(old, 1)
    t.leases.claim(old, "gone", NOW)  # a claim of the old connection
    new = t.workers.register(b"w-again", protocol.decode(protocol.encode(MsgType.READY, {
        "worker_id": "w", "host": "h", "device": "cpu", "models": ["tiny"],
        "capacity": 3})), NOW + 1, keep=old)
    t.leases.move(old, new, {"a"})
    assert t.workers.get(old.identity) is None and old.running == set()
    assert held_by(a, new) and new.running == {"a"}
    assert back_in_queue(b, old, new) and b.attempt == 0
    assert t.queued() == ["b", "c"]
    # Its frontend resubmits "gone": the claim went with the old connection.
    assert not t.leases.take_claimed(Job(spec=make_spec("gone"), client=CLIENT,
                                         deadline=NOW + 60))


def test_a_claim_waits_for_its_job_to_be_submitted(t: Table) -> None:
    w = t.worker("w", capacity=2)
    assert t.leases.claim(w, "j1", NOW) is None
    assert w.running == {"j1"} and w.free == 1  # its slot is taken meanwhile
    job = Job(spec=make_spec("j1"), client=CLIENT, deadline=NOW + 60)
    assert t.leases.take_claimed(job)
    assert held_by(job, w) and t.jobs.get("j1") is job and t.queued() == []
    assert t.leases.claim(w, "j1", NOW) is None  # claiming what it holds changes nothing
    assert held_by(job, w)


def test_a_claim_takes_a_queued_job_out_of_its_queue(t: Table) -> None:
    w = t.worker("w")
    a, _ = t.queue("a", "b")
    assert t.leases.claim(w, "a", NOW) is None
    assert held_by(a, w)
    assert t.jobs.queue_depth("tiny") == 1 and t.queued() == ["b"]


def test_a_claim_moves_a_job_leased_elsewhere_and_stops_it_there(t: Table) -> None:
    early, holder = t.worker("early"), t.worker("holder", session="h")
    (a,) = t.queue("a")
    t.lease(early)
    assert t.leases.claim(holder, "a", NOW + 1) == early.identity  # early gets a CANCEL
    assert held_by(a, holder)
    assert early.running == {"a"} and early.ending == {"a": NOW + 1}  # until it answers
    assert t.leases.held(early, "a") is None  # its answer will be dropped
    t.leases.release(early, "a")
    assert early.running == set() and held_by(a, holder)


@pytest.mark.parametrize("case", ["other model", "worker gone", "worker answered"])
def test_a_spent_claim_leaves_the_resubmitted_job_to_the_queue(t: Table, case: str) -> None:
    w = t.worker("w")
    t.leases.claim(w, "j1", NOW)
    spec: dict[str, Any] = {"model": "sdxl"} if case == "other model" else {}
    if case == "worker gone":
        t.leases.drop_worker(w, lost=True)
    elif case == "worker answered":
        t.leases.release(w, "j1")
    job = Job(spec=make_spec("j1", **spec), client=CLIENT, deadline=NOW + 60)
    assert not t.leases.take_claimed(job)
    assert job.worker is None and "j1" not in t.jobs
    assert not t.leases.take_claimed(job)  # spent either way


# --------------------------------------------------------------------------------------------
# Any sequence of what the broker does keeps the two sides of every lease in step

WORKERS = ["w1", "w2", "w3"]
JOB_IDS = [f"j{i}" for i in range(6)]  # a small pool, so ids are reused as resubmissions do


class LeasesMachine(RuleBasedStateMachine):
    """Drive Leases the way the broker does, in any order, and check both sides agree."""

    def __init__(self) -> None:
        super().__init__()
        self.t = Table(max_attempts=3)
        self.now = NOW
        self.connections = 0

    def _registered(self) -> list[WorkerRecord]:
        return list(self.t.workers)

    @rule(job_id=st.sampled_from(JOB_IDS))
    def submit(self, job_id: str) -> None:
        if job_id in self.t.jobs:
            return
        job = Job(spec=make_spec(job_id), client=CLIENT, deadline=NOW + 1000)
        if not self.t.leases.take_claimed(job):
            self.t.jobs.add(job)

    @rule(name=st.sampled_from(WORKERS), capacity=st.integers(1, 3),
          held=st.lists(st.sampled_from(JOB_IDS), unique=True, max_size=3))
    def ready(self, name: str, capacity: int, held: list[str]) -> None:
        """A READY: a new worker, the same connection again, or the same process anew."""
        known = next((w for w in self.t.workers if w.worker_id == name), None)
        self.connections += 1
        identity = known.identity if known and self.connections % 2 else \
            f"{name}-{self.connections}".encode()
        ready = protocol.decode(protocol.encode(MsgType.READY, {
            "worker_id": name, "host": "h", "device": "cpu", "models": ["tiny"],
            "capacity": capacity, "session": name}))
        worker = self.t.workers.register(identity, ready, self.now, keep=known)
        if known is not None and known.identity == identity:
            self.t.leases.keep(known, worker)
        elif known is not None:
            self.t.leases.move(known, worker, set(held))
        for job_id in held[:worker.capacity]:
            self.t.leases.claim(worker, job_id, self.now)

    @rule()
    def dispatch(self) -> None:
        passed_over = []
        while (worker := self.t.workers.next_free("tiny")) is not None:
            batch = self.t.jobs.take_batch("tiny", worker.identity, 1)
            if not batch:
                passed_over.append(worker)
                continue
            self.t.leases.lease(worker, batch, self.now)
        for worker in passed_over:
            self.t.workers.offer(worker)

    @precondition(lambda self: any(w.running for w in self.t.workers))
    @rule(data=st.data(), outcome=st.sampled_from(["result", "failed elsewhere"]))
    def answer(self, data: st.DataObject, outcome: str) -> None:
        worker = data.draw(st.sampled_from([w for w in self._registered() if w.running]))
        job_id = data.draw(st.sampled_from(sorted(worker.running)))
        job = self.t.leases.held(worker, job_id)
        self.t.leases.release(worker, job_id)
        if job is None:
            return
        if outcome == "result":
            self.t.jobs.finish(job_id)
        else:
            self.t.leases.hand_back(job)

    @precondition(lambda self: len(self.t.jobs) > 0)
    @rule(job_id=st.sampled_from(JOB_IDS))
    def cancel(self, job_id: str) -> None:
        job = self.t.jobs.finish(job_id)
        if job is not None:
            self.t.leases.stop(job, self.now)

    @precondition(lambda self: any(w.ending for w in self.t.workers))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w in self._registered() if w.ending]))
        self.now += 1.0
        self.t.leases.settle(worker, [], self.now, after=1.0)

    @precondition(lambda self: len(self.t.workers) > 0)
    @rule(data=st.data(), lost=st.booleans())
    def drop(self, data: st.DataObject, lost: bool) -> None:
        worker = data.draw(st.sampled_from(self._registered()))
        for job in self.t.leases.drop_worker(worker, lost=lost):
            assert lost and job.attempt == 3 and job.id not in self.t.jobs

    @invariant()
    def both_sides_agree(self) -> None:
        registered = {w.identity: w for w in self.t.workers}
        for job_id in JOB_IDS:
            job = self.t.jobs.get(job_id)
            if job is None or job.state is JobState.QUEUED:
                assert job is None or job.worker is None
                continue
            holder = registered.get(job.worker or b"")
            assert holder is not None and job_id in holder.running, (job_id, job.worker)
        # A worker may list more than it holds: a stopped job until it answers, and a claim
        # (two workers can claim one id) until it answers; those slots stay taken.
        for worker in registered.values():
            assert set(worker.ending) <= worker.running

    @invariant()
    def every_worker_with_room_is_a_candidate(self) -> None:
        """Each change of a worker's load told the registry (``offer``)."""
        found = []
        while (worker := self.t.workers.next_free("tiny")) is not None:
            found.append(worker)
        for worker in found:
            self.t.workers.offer(worker)
        assert {w.identity for w in found} == {w.identity for w in self.t.workers if w.free}


LeasesMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40,
                                           deadline=None)
TestLeasesAgainstTheBrokersMoves = LeasesMachine.TestCase
