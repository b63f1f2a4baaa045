"""Queue positions are true for every waiting job: the broker counts the jobs ahead, queued or
held by a worker that has not started them, and tells each job its own place when it changes."""

from __future__ import annotations

import time
from typing import Any

from broker.protocol import JobSpec, MsgType
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker, make_spec


class Heard:
    """The latest position each job's client heard, over the whole conversation."""

    def __init__(self, harness: BrokerHarness, client: FakeClient) -> None:
        self.harness = harness
        self.client = client
        self.positions: dict[str, int] = {}

    def submit(self, *specs: JobSpec) -> list[int]:
        first = []
        for spec in specs:
            msg = self.client.submit(spec)
            assert msg.type is MsgType.ACCEPTED, msg
            self.positions[spec.id] = msg["position"]
            first.append(msg["position"])
        return first

    def after_announcement(self, *workers: FakeWorker, wait: float = 0.3) -> dict[str, int]:
        """Move the clock past the announcement interval (the workers beat to stay alive),
        read every message for ``wait`` seconds, and return the positions heard."""
        for worker in workers:
            worker.heartbeat()
        self.harness.clock.advance(0.6)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.harness.pump()
            msg = self.client.poll_msg()
            if msg is None:
                self.client.sock.poll(5)
            elif msg.type is MsgType.ACCEPTED:
                self.positions[msg["job_id"]] = msg["position"]
        return self.positions

    def of(self, *job_ids: str) -> list[int]:
        return [self.positions[job_id] for job_id in job_ids]


def busy_worker(harness: BrokerHarness, **ready: Any) -> FakeWorker:
    """A worker that holds one batch running and one waiting (capacity 2 x max_batch)."""
    return harness.worker("w1", capacity=2 * ready.get("max_batch", 1), **ready)


def specs(count: int) -> list[JobSpec]:
    return [make_spec(f"j{i}") for i in range(count)]


def test_jobs_behind_a_busy_worker_get_distinct_positions(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    heard = Heard(harness, harness.client())
    first = heard.submit(*specs(5))
    assert first[1:] == [0, 1, 2, 3]  # never two "next in line"
    assert [s.id for s in worker.take()] == ["j0"]
    assert [s.id for s in worker.take()] == ["j1"]  # leased, waiting behind j0
    heard.after_announcement(worker)
    # j1 waits at the worker: next. The queued ones follow it, one place each.
    assert heard.of("j1", "j2", "j3", "j4") == [0, 1, 2, 3]


def test_positions_move_up_when_the_running_batch_ends(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    heard = Heard(harness, harness.client())
    jobs = specs(5)
    heard.submit(*jobs)
    worker.take()
    worker.take()
    heard.after_announcement(worker)
    worker.result(jobs[0])  # j1 starts; j2 is leased to wait behind it
    assert [s.id for s in worker.take()] == ["j2"]
    heard.after_announcement(worker)
    assert heard.of("j2", "j3", "j4") == [0, 1, 2]


def test_a_waiting_batch_counts_each_of_its_jobs(harness: BrokerHarness) -> None:
    client = harness.client()
    heard = Heard(harness, client)
    heard.submit(*specs(6))  # queued before the worker registers (the start-up grace)
    worker = busy_worker(harness, max_batch=2)
    assert [s.id for s in worker.take()] == ["j0", "j1"]
    assert [s.id for s in worker.take()] == ["j2", "j3"]
    heard.after_announcement(worker)
    assert heard.of("j2", "j3", "j4", "j5") == [0, 1, 2, 3]


def test_a_submission_counts_the_jobs_a_worker_holds_unstarted(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    heard = Heard(harness, harness.client())
    heard.submit(make_spec("j0"), make_spec("j1"))
    worker.take()
    worker.take()
    assert heard.submit(make_spec("j2"), make_spec("j3")) == [1, 2]  # j1 waits at the worker


def test_a_resubmitted_waiting_job_hears_its_true_position(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    heard = Heard(harness, harness.client())
    jobs = specs(3)
    heard.submit(*jobs)
    worker.take()
    worker.take()
    assert heard.submit(jobs[1], jobs[2], jobs[0]) == [0, 1, 0]  # waiting, queued, running


def test_a_cancel_moves_the_jobs_behind_it_up(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    client = harness.client()
    heard = Heard(harness, client)
    heard.submit(*specs(5))
    worker.take()
    worker.take()
    heard.after_announcement(worker)
    client.cancel("j2")
    heard.after_announcement(worker)
    assert heard.of("j1", "j3", "j4") == [0, 1, 2]


def test_only_a_changed_position_is_told_again(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    client = harness.client()
    heard = Heard(harness, client)
    jobs = specs(4)
    heard.submit(*jobs)
    worker.take()
    worker.take()
    heard.after_announcement(worker)
    worker.heartbeat()
    harness.clock.advance(0.6)
    client.assert_silent()  # nothing moved: nothing to say
    worker.result(jobs[0])
    worker.take()
    told = []
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        harness.pump()
        msg = client.poll_msg()
        if msg is not None and msg.type is MsgType.ACCEPTED:
            told.append((msg["job_id"], msg["position"]))
    assert told == [("j2", 0), ("j3", 1)]


def test_two_busy_workers_line_their_waiting_jobs_up_first(harness: BrokerHarness) -> None:
    first = harness.worker("w1", capacity=2)
    second = harness.worker("w2", capacity=2)
    heard = Heard(harness, harness.client())
    heard.submit(*specs(6))
    taken = [s.id for w in (first, second) for s in w.take() + w.take()]
    assert sorted(taken) == ["j0", "j1", "j2", "j3"]
    heard.after_announcement(first, second)
    # Each worker runs one job and holds one waiting; the queued two come after those.
    running = {taken[0], taken[2]}
    waiting = sorted(set(taken) - running)
    assert heard.of(*waiting, "j4", "j5") == [0, 1, 2, 3]


def test_a_job_back_in_line_after_its_worker_left_hears_its_place_again(
        harness: BrokerHarness) -> None:
    first = harness.worker("w1")
    heard = Heard(harness, harness.client())
    assert heard.submit(make_spec("j0")) == [0]
    assert [s.id for s in first.take()] == ["j0"]  # running: nothing more to hear
    heard.positions.clear()
    first.send_msg(MsgType.BYE)  # its worker goes: j0 is back at the head of its queue
    heard.after_announcement()
    # It was told 0 once before: it must be told again, or its client thinks it still runs.
    assert heard.positions == {"j0": 0}


def test_a_job_its_worker_started_is_never_told_a_place_again(harness: BrokerHarness) -> None:
    """A worker holds a batch running and one waiting; it starts the waiting one while the
    first one's answer is still being encoded. Its PROGRESS says it runs: a later move of the
    line must not tell it 'next in line' (the page would show it queued again)."""
    worker = busy_worker(harness)
    client = harness.client()
    heard = Heard(harness, client)
    jobs = specs(4)
    heard.submit(*jobs)
    worker.take()
    worker.take()  # j1 waits at the worker, behind j0
    heard.after_announcement(worker)
    worker.send_msg(MsgType.PROGRESS, {"job_id": "j1", "step": 1, "steps": 2})  # j0 encoding
    client.cancel("j3")  # the line moves
    told: list[tuple[str, int]] = []
    worker.heartbeat()
    harness.clock.advance(0.6)
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:
        harness.pump()
        msg = client.poll_msg()
        if msg is not None and msg.type is MsgType.ACCEPTED:
            told.append((msg["job_id"], msg["position"]))
    assert ("j1", 0) not in told and told == [("j2", 0)], told
