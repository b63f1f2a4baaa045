"""Tests for broker.jobs.JobTable: FIFO queues, batching, attempts and deadlines.

Who holds a running job is tested with its owner, in test_leases.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.jobs import Job, JobState, JobTable
from tests.broker.fakes import make_spec

W1, W2 = b"worker-1", b"worker-2"
CLIENT = b"client"


def make_job(job_id: str, *, deadline: float = 1000.0, **spec: Any) -> Job:
    return Job(spec=make_spec(job_id, **spec), client=CLIENT, deadline=deadline)


def table(max_queue: int = 100, max_attempts: int = 3) -> JobTable:
    return JobTable(max_queue=max_queue, max_attempts=max_attempts)


def ids(jobs: list[Job]) -> list[str]:
    return [job.id for job in jobs]


def test_add_returns_position_and_counts_per_model() -> None:
    t = table()
    assert t.add(make_job("a")) == 0
    assert t.add(make_job("b")) == 1
    assert t.add(make_job("x", model="other")) == 0
    assert t.add(make_job("c")) == 2
    assert (t.queue_depth("tiny"), t.queue_depth("other"), t.queue_depth("none")) == (3, 1, 0)
    assert t.depths() == {"tiny": 3, "other": 1}
    assert sorted(t.models_waiting()) == ["other", "tiny"]
    assert len(t) == 4 and "b" in t and "zz" not in t
    assert t.get("b") is not None and t.get("b").state is JobState.QUEUED


def test_fifo_order_per_model() -> None:
    t = table()
    for name in ["a", "b", "c"]:
        t.add(make_job(name))
        t.add(make_job(name + "-other", model="other"))
    assert ids(t.take_batch("tiny", W1, 1)) == ["a"]
    assert ids(t.take_batch("other", W1, 1)) == ["a-other"]
    assert ids(t.take_batch("tiny", W1, 1)) == ["b"]
    assert ids(t.take_batch("tiny", W2, 1)) == ["c"]
    assert t.take_batch("tiny", W1, 1) == []
    assert t.take_batch("unknown", W1, 1) == []


def test_take_batch_takes_the_job_out_of_its_queue() -> None:
    t = table()
    t.add(make_job("a"))
    (job,) = t.take_batch("tiny", W1, 1)
    assert job.state is JobState.RUNNING and t.queue_depth("tiny") == 0
    assert job.worker is None  # Leases.lease names the holder once the batch is sent
    assert t.queue_depth("tiny") == 0
    assert "a" in t  # still owned by the table while it runs


def test_queue_bound() -> None:
    t = table(max_queue=2)
    t.add(make_job("a"))
    assert not t.is_full("tiny")
    t.add(make_job("b"))
    assert t.is_full("tiny")
    assert not t.is_full("other")
    t.take_batch("tiny", W1, 1)  # running jobs do not count against the queue
    assert not t.is_full("tiny")
    t.finish("b")
    assert t.queue_depth("tiny") == 0


def test_take_batch_groups_by_batch_key_up_to_max_batch() -> None:
    t = table()
    t.add(make_job("a"))
    t.add(make_job("big", width=128))
    t.add(make_job("b", prompt="something else", seeds=(1, 2)))
    t.add(make_job("more-steps", steps=3))
    t.add(make_job("c"))
    t.add(make_job("d"))
    assert ids(t.take_batch("tiny", W1, 3)) == ["a", "b", "c"]
    assert t.queue_depth("tiny") == 3
    # The rest keep their order; the new head starts a batch with its own key.
    assert ids(t.take_batch("tiny", W1, 3)) == ["big"]
    assert ids(t.take_batch("tiny", W1, 3)) == ["more-steps"]
    assert ids(t.take_batch("tiny", W1, 3)) == ["d"]
    assert t.queue_depth("tiny") == 0


def test_take_batch_with_guidance_in_key() -> None:
    t = table()
    t.add(make_job("a", guidance=3.0))
    t.add(make_job("b", guidance=4.0))
    t.add(make_job("c", guidance=3.0))
    assert ids(t.take_batch("tiny", W1, 4)) == ["a", "c"]


def test_take_batch_skips_finished_jobs() -> None:
    t = table()
    for name in "abcde":
        t.add(make_job(name))
    assert t.finish("a").id == "a"  # at the head
    assert t.finish("c").id == "c"  # in the middle
    assert t.queue_depth("tiny") == 3
    assert ids(t.take_batch("tiny", W1, 2)) == ["b", "d"]
    assert t.finish("e") is not None
    assert t.take_batch("tiny", W1, 4) == []
    assert t.queue_depth("tiny") == 0
    assert t.finish("e") is None  # finishing twice is harmless
    assert t.finish("never") is None


def test_finished_then_resubmitted_id_is_batched_once() -> None:
    # The cancelled job's id lingers in the queue; it must not stand for the new job too.
    t = table()
    t.add(make_job("a"))
    t.add(make_job("b"))
    t.finish("a")
    t.add(make_job("a"))
    assert ids(t.take_batch("tiny", W1, 4)) == ["b", "a"]
    assert t.queue_depth("tiny") == 0
    assert t.take_batch("tiny", W1, 4) == []


def test_resubmitted_id_keeps_its_new_place_in_line() -> None:
    t = table()
    t.add(make_job("a"))
    t.add(make_job("b"))
    t.finish("a")
    t.add(make_job("a"))
    assert ids(t.take_batch("tiny", W1, 1)) == ["b"]
    assert ids(t.take_batch("tiny", W1, 1)) == ["a"]


def test_finishing_a_running_job_keeps_depth() -> None:
    t = table()
    t.add(make_job("a"))
    t.add(make_job("b"))
    t.take_batch("tiny", W1, 1)
    t.finish("a")
    assert t.queue_depth("tiny") == 1
    assert "a" not in t


def test_requeue_puts_job_at_head_and_counts_attempts() -> None:
    t = table(max_attempts=3)
    t.add(make_job("a"))
    t.add(make_job("b"))
    (a,) = t.take_batch("tiny", W1, 1)
    assert t.requeue(a) is True
    assert (a.attempt, a.state) == (1, JobState.QUEUED)
    assert t.queue_depth("tiny") == 2
    assert ids(t.take_batch("tiny", W2, 1)) == ["a"]
    assert t.requeue(a) is True
    assert a.attempt == 2
    assert ids(t.take_batch("tiny", W1, 1)) == ["a"]
    # The third lost worker uses up the attempts: the caller fails the job.
    assert t.requeue(a) is False
    assert a.attempt == 3
    assert t.queue_depth("tiny") == 1
    t.finish("a")
    assert ids(t.take_batch("tiny", W1, 4)) == ["b"]


def test_requeue_with_one_attempt_fails_at_once() -> None:
    t = table(max_attempts=1)
    t.add(make_job("a"))
    (a,) = t.take_batch("tiny", W1, 1)
    assert t.requeue(a) is False
    assert t.queue_depth("tiny") == 0


def test_hand_back_does_not_count_an_attempt() -> None:
    t = table(max_attempts=3)
    t.add(make_job("a"))
    t.add(make_job("b"))
    (a,) = t.take_batch("tiny", W1, 1)
    for _ in range(5):
        t.hand_back(a)
        assert (a.attempt, a.state) == (0, JobState.QUEUED)
        assert t.queue_depth("tiny") == 2
        assert ids(t.take_batch("tiny", W2, 1)) == ["a"]
    assert t.queue_depth("tiny") == 1


def test_requeued_batch_mates_are_batched_again() -> None:
    t = table()
    for name in "abc":
        t.add(make_job(name))
    batch = t.take_batch("tiny", W1, 2)
    for job in reversed(batch):
        t.requeue(job)
    assert ids(t.take_batch("tiny", W2, 4)) == ["a", "b", "c"]


def test_expired_returns_queued_and_running_jobs_past_deadline() -> None:
    t = table()
    t.add(make_job("q-early", deadline=10.0))
    t.add(make_job("r-early", deadline=12.0, model="other"))
    t.add(make_job("late", deadline=30.0))
    t.take_batch("other", W1, 1)
    assert t.expired(5.0) == []
    gone = t.expired(12.0)  # a deadline equal to now has passed
    assert sorted(ids(gone)) == ["q-early", "r-early"]
    states = {job.id: job.state for job in gone}
    assert states == {"q-early": JobState.QUEUED, "r-early": JobState.RUNNING}
    assert "q-early" not in t and "r-early" not in t
    assert t.queue_depth("tiny") == 1 and t.queue_depth("other") == 0
    assert t.expired(12.0) == []  # reported once
    assert ids(t.take_batch("tiny", W1, 4)) == ["late"]
    assert ids(t.expired(100.0)) == ["late"]
    assert len(t) == 0


def test_expired_skips_finished_jobs() -> None:
    t = table()
    t.add(make_job("a", deadline=10.0))
    t.finish("a")
    assert t.expired(20.0) == []


def test_expired_uses_the_deadline_of_a_reused_id() -> None:
    t = table()
    t.add(make_job("a", deadline=10.0))
    t.finish("a")
    t.add(make_job("a", deadline=50.0))
    assert t.expired(20.0) == []
    assert ids(t.expired(50.0)) == ["a"]


# --------------------------------------------------------------------------------------------
# Against a model: any sequence of operations keeps order, batches and depths right

MODELS = ["m1", "m2"]
KEYS = [64, 128]  # width, which is part of the batch key


class JobTableMachine(RuleBasedStateMachine):
    """Drive a JobTable with random operations and compare it with a list-based model."""

    def __init__(self) -> None:
        super().__init__()
        self.table = JobTable(max_queue=6, max_attempts=3)
        self.now = 0.0
        self.queues: dict[str, list[str]] = {m: [] for m in MODELS}  # model's FIFO order
        self.running: set[str] = set()
        self.jobs: dict[str, Job] = {}
        self.attempts: dict[str, int] = {}

    def _drop(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        if job_id in self.queues[job.model]:
            self.queues[job.model].remove(job_id)
        self.running.discard(job_id)
        self.attempts.pop(job_id)

    # Ids come from a small pool so finished ids are reused, as resubmissions do.
    @rule(job_id=st.sampled_from([f"j{i}" for i in range(8)]), model=st.sampled_from(MODELS),
          width=st.sampled_from(KEYS), ttl=st.integers(min_value=1, max_value=20))
    def add(self, job_id: str, model: str, width: int, ttl: int) -> None:
        if job_id in self.jobs or self.table.is_full(model):
            assert self.table.is_full(model) == (len(self.queues[model]) >= 6) \
                or job_id in self.jobs
            return
        job = Job(spec=make_spec(job_id, model=model, width=width), client=CLIENT,
                  deadline=self.now + ttl)
        assert self.table.add(job) == len(self.queues[model])
        self.queues[model].append(job_id)
        self.jobs[job_id] = job
        self.attempts[job_id] = 0

    @rule(model=st.sampled_from(MODELS), max_batch=st.integers(min_value=1, max_value=4))
    def take_batch(self, model: str, max_batch: int) -> None:
        queue = self.queues[model]
        expected: list[str] = []
        if queue:
            key = self.jobs[queue[0]].spec.batch_key()
            expected = [i for i in queue if self.jobs[i].spec.batch_key() == key][:max_batch]
        batch = self.table.take_batch(model, W1, max_batch)
        assert ids(batch) == expected
        assert all(job is self.jobs[job.id] for job in batch)
        for job_id in expected:
            queue.remove(job_id)
            self.running.add(job_id)
            assert self.jobs[job_id].state is JobState.RUNNING

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        assert self.table.finish(job_id) is self.jobs[job_id]
        self._drop(job_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.running)))
        job = self.jobs[job_id]
        self.attempts[job_id] += 1
        if self.attempts[job_id] >= 3:
            assert self.table.requeue(job) is False
            self.table.finish(job_id)  # what the broker does with a job out of attempts
            self._drop(job_id)
            return
        assert self.table.requeue(job) is True
        self.running.discard(job_id)
        self.queues[job.model].insert(0, job_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def hand_back(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.running)))
        job = self.jobs[job_id]
        self.table.hand_back(job)
        self.running.discard(job_id)
        self.queues[job.model].insert(0, job_id)

    @rule(seconds=st.integers(min_value=0, max_value=8))
    def expire(self, seconds: int) -> None:
        self.now += seconds
        expected = {i for i, job in self.jobs.items() if job.deadline <= self.now}
        assert set(ids(self.table.expired(self.now))) == expected
        for job_id in expected:
            self._drop(job_id)

    @invariant()
    def depths_match(self) -> None:
        for model in MODELS:
            assert self.table.queue_depth(model) == len(self.queues[model])
        assert self.table.depths() == {m: len(q) for m, q in self.queues.items() if q}
        assert len(self.table) == len(self.jobs)
        for job_id, job in self.jobs.items():
            assert job.attempt == self.attempts[job_id]
            assert job.state is (JobState.RUNNING if job_id in self.running
                                 else JobState.QUEUED)


JobTableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
TestJobTableAgainstModel = JobTableMachine.TestCase
