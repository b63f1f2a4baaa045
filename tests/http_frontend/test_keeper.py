"""Keeper.tend() with a fake clock: leases, running marks, take-overs, retention, failures."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker.protocol import ErrorCode, JobSpec
from http_frontend.database import DatabaseError
from http_frontend.history import Caller, History
from http_frontend.keeper import Keeper
from http_frontend.records import Record
from tests.http_frontend.test_history import (
    BASE,
    FOX,
    Clock,
    Frontend,
    OwnedBroker,
    make_frontend,
    make_history,
    settle_all,
    stored_files,
    submit_job,
)

LEASE = 15.0


class Switch:
    """Whether the broker is connected, as a test says."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __call__(self) -> bool:
        return self.on


def start(tmp_path: Path, clock: Clock, *, frontend: str = "f1", owner: str = "owner-1",
          keep_prompts: bool = True) -> Frontend:
    """A frontend (its app, service, jobs API and history) on tmp_path's database."""
    history = make_history(tmp_path, frontend=frontend, clock=clock, keep_prompts=keep_prompts)
    return make_frontend(OwnedBroker(owner), history)


def keeper_of(front: Frontend, clock: Clock, connected: Switch | None = None,
              history_days: float | None = None) -> Keeper:
    return Keeper(front.jobs, connected=connected or Switch(), history_days=history_days,
                  interval=0.01, clock=clock)


def started_keeper(front: Frontend, clock: Clock, **kwargs: Any) -> Keeper:
    """A keeper past its first connected pass (its restart reclaim), as after a start."""
    keeper = keeper_of(front, clock, **kwargs)
    keeper.tend()
    keeper.join_retention(10)
    return keeper


def record(front: Frontend, job_id: str) -> Record:
    found = front.history.records.get(job_id)
    assert found is not None
    return found


def open_elsewhere(history: History, *, kind: str = "job", timeout: float = 60.0,
                   submitter: str = "owner-other") -> str:
    """Record a job as another frontend (``history``'s) would, without following it."""
    job = JobSpec(id=f"{time.monotonic_ns():032x}"[-32:], model="tiny", prompt="a fox",
                  width=64, height=64, steps=4, seeds=(3,), timeout=timeout)
    history.open(job, dict(FOX), kind=kind, caller=Caller(None, BASE), submitter=submitter)
    return job.id


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


# ------------------------------------------------------------------------------ leases

def test_tend_renews_the_leases_of_the_jobs_it_follows(tmp_path, clock):
    front = start(tmp_path, clock)
    keeper = started_keeper(front, clock)
    job_id = submit_job(front)
    assert record(front, job_id).lease_until == clock.now + LEASE
    clock.now += 10
    keeper.tend()
    assert record(front, job_id).lease_until == clock.now + LEASE
    assert record(front, job_id).frontend == "f1"


def test_tend_marks_a_job_running_once_a_step_arrives(tmp_path, clock, monkeypatch):
    front = start(tmp_path, clock)
    keeper = started_keeper(front, clock)
    job_id = submit_job(front)
    keeper.tend()
    assert record(front, job_id).status == "queued"
    front.broker.progress(job_id)
    marks: list[str] = []
    real = front.history.mark_running

    def marking(job_id: str) -> None:
        marks.append(job_id)
        real(job_id)

    monkeypatch.setattr(front.history, "mark_running", marking)
    keeper.tend()
    keeper.tend()
    assert record(front, job_id).status == "running"
    assert marks == [job_id]
    assert front.client.simulate_get(f"/v1/jobs/{job_id}").json["status"] == "running"


# ------------------------------------------------------------------------------ restarts

def test_a_restarted_frontend_resumes_its_jobs_once_the_broker_answers(tmp_path, clock):
    before = start(tmp_path, clock, owner="owner-before")
    job_id = submit_job(before, {**FOX, "seed": 8})
    submitted = before.broker.submitted[0]
    clock.now += 12
    after = start(tmp_path, clock, owner="owner-after")  # same frontend id "f1"
    connected = Switch(False)
    keeper = keeper_of(after, clock, connected)
    keeper.tend()
    assert after.broker.submitted == []
    connected.on = True
    keeper.tend()
    assert [job.id for job in after.broker.submitted] == [job_id]
    resumed = after.broker.submitted[0]
    assert after.broker.submit_owners == ["owner-before"]
    assert resumed.timeout == pytest.approx(submitted.timeout - 12)
    assert (resumed.seeds, resumed.prompt) == (submitted.seeds, submitted.prompt)
    keeper.tend()
    assert len(after.broker.submitted) == 1  # once
    after.broker.answer(job_id)
    settle_all(after.history)
    assert record(after, job_id).status == "succeeded"
    shown = after.client.simulate_get(f"/v1/jobs/{job_id}").json
    assert shown["status"] == "succeeded" and shown["images"][0]["url"]


def test_a_claimed_generation_ends_failed(tmp_path, clock):
    front = start(tmp_path, clock)
    job_id = open_elsewhere(front.history, kind="generation")
    clock.now += 1  # the frontend restarts: its new life begins after the record was made
    keeper_of(front, clock).tend()
    ended = record(front, job_id)
    assert ended.status == "failed" and ended.error is not None
    assert ended.error["code"] == ErrorCode.WORKER_LOST.value
    assert front.broker.submitted == []


def test_a_claimed_job_past_its_deadline_ends_failed_with_timeout(tmp_path, clock):
    front = start(tmp_path, clock)
    job_id = open_elsewhere(front.history, timeout=5.0)
    clock.now += 6
    keeper_of(front, clock).tend()
    ended = record(front, job_id)
    assert (ended.status, ended.error and ended.error["code"]) == ("failed", "timeout")
    assert front.broker.submitted == []
    error = front.client.simulate_get(f"/v1/jobs/{job_id}").json["error"]
    assert error["code"] == "timeout"


def test_another_frontends_live_lease_is_left_and_an_expired_one_taken(tmp_path, clock):
    front = start(tmp_path, clock)
    other = make_history(tmp_path, frontend="f2", clock=clock)
    job_id = open_elsewhere(other, submitter="owner-f2")
    keeper = keeper_of(front, clock)
    clock.now += LEASE - 1
    keeper.tend()
    assert record(front, job_id).frontend == "f2"
    assert front.broker.submitted == []
    clock.now += 2
    keeper.tend()
    taken = record(front, job_id)
    assert (taken.frontend, taken.lease_until) == ("f1", clock.now + LEASE)
    assert [job.id for job in front.broker.submitted] == [job_id]
    assert front.broker.submit_owners == ["owner-f2"]


def test_an_unreadable_record_is_ended_not_retried_forever(tmp_path, clock):
    front = start(tmp_path, clock)
    other = make_history(tmp_path, frontend="f2", clock=clock)
    job_id = open_elsewhere(other)
    with other.records._db.transaction() as tx:
        tx.execute("UPDATE jobs SET request = ? WHERE id = ?", ('{"prompt": 7}', job_id))
    clock.now += LEASE + 1
    keeper = keeper_of(front, clock)
    keeper.tend()
    keeper.tend()
    ended = record(front, job_id)
    assert (ended.status, ended.error and ended.error["code"]) == ("failed", "invalid_request")


def test_the_first_connected_tend_leaves_jobs_of_this_life_alone(tmp_path, clock):
    front = start(tmp_path, clock)
    connected = Switch(False)
    keeper = keeper_of(front, clock, connected)
    keeper.tend()  # at start, the broker not connected yet
    job_id = submit_job(front)  # then it connects, and a request comes
    connected.on = True
    keeper.tend()
    assert [job.id for job in front.broker.submitted] == [job_id]


def test_the_first_connected_tend_leaves_generations_of_this_life_alone(tmp_path, clock):
    front = start(tmp_path, clock)
    prepared = front.service.prepare(dict(FOX))
    front.service.open_record(prepared, Caller(None, BASE), kind="generation")
    front.service.submit(prepared)  # what generate() does, then it waits for the answer
    keeper_of(front, clock).tend()
    assert record(front, prepared.job.id).status == "queued"


# ------------------------------------------------------------------------------ retention

def test_retention_removes_old_finished_records_and_their_images(tmp_path, clock):
    front = start(tmp_path, clock)
    keeper = started_keeper(front, clock, history_days=1)
    clock.now += 1  # past the first pass's retention, so the next is 600 s away
    old, running = submit_job(front), submit_job(front)
    front.broker.answer(old)
    settle_all(front.history)
    files = stored_files(tmp_path / "images")
    assert len(files) == 1
    clock.now += 86400 + 60
    recent = submit_job(front)
    front.broker.answer(recent)
    settle_all(front.history)
    keeper.tend()
    keeper.join_retention(10)  # retention runs on a thread of its own
    assert front.history.records.get(old) is None
    assert not files[0].exists()
    assert record(front, recent).status == "succeeded"
    assert record(front, running).status == "queued"
    assert len(stored_files(tmp_path / "images")) == 1
    assert front.client.simulate_get(f"/v1/jobs/{old}").status_code == 404


# ------------------------------------------------------------------------------ failures

def test_a_tend_whose_database_fails_raises_and_the_next_one_works(tmp_path, clock,
                                                                   monkeypatch):
    front = start(tmp_path, clock)
    keeper = started_keeper(front, clock)
    job_id = submit_job(front)
    real = front.history.records.renew

    def down(*args: Any) -> int:
        raise DatabaseError("SQLite database jobs.db: disk I/O error")

    monkeypatch.setattr(front.history.records, "renew", down)
    with pytest.raises(DatabaseError):
        keeper.tend()
    monkeypatch.setattr(front.history.records, "renew", real)
    clock.now += 5
    keeper.tend()
    assert record(front, job_id).lease_until == clock.now + LEASE


def test_the_keeper_thread_survives_an_exception(tmp_path, clock, monkeypatch, caplog):
    front = start(tmp_path, clock)
    keeper = keeper_of(front, clock)
    passes: list[int] = []
    second = threading.Event()

    def tend() -> None:
        passes.append(1)
        if len(passes) == 1:
            raise DatabaseError("the database is down")
        if len(passes) == 2:
            raise RuntimeError("something unexpected")
        second.set()

    monkeypatch.setattr(keeper, "tend", tend)
    with caplog.at_level(logging.ERROR, logger="http_frontend.keeper"):
        keeper.start()
        try:
            assert second.wait(5), "the keeper stopped tending after an exception"
        finally:
            keeper.stop()
    assert not keeper._thread.is_alive()
    assert sum("could not tend" in r.getMessage() for r in caplog.records) == 2
