"""The job records on both dialects: SQLite in a temporary directory, a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from http_frontend import records as records_module
from http_frontend.database import Conflict, Database, open_database
from http_frontend.records import JobRecords, Record

T0 = 1_800_000_000.123456  # a creation time with microseconds


class Clock:
    """A clock the test sets."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def records(db: Database, clock: Clock) -> JobRecords:
    return JobRecords(db, clock=clock)


def make_record(number: int = 0, **changes: Any) -> Record:
    prompt = changes.pop("prompt", f"a lighthouse at dusk, number {number}")
    record = Record(
        id=f"job-{number:04d}", kind="job", owner="alice", model="tiny-sd", prompt=prompt,
        request={"prompt": prompt, "n": 1},
        job={"prompt": prompt, "negative_prompt": "blurry", "seeds": [7], "steps": 4},
        deadline=T0 + 600, submitter="frontend-a:1", frontend="frontend-a",
        lease_until=T0 + 30, created=T0 + number)
    return dataclasses.replace(record, **changes)


def run_in_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads released together; their results in order."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = target(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# Create and read


def test_every_field_survives_a_round_trip(records: JobRecords, clock: Clock) -> None:
    record = make_record(
        owner="alice", kind="generation", status="running", idempotency_key="key-1",
        request_hash="sha256:abc", finished=T0 + 9.5, worker_id="gpu-3",
        timings={"queued": 0.25, "steps": [0.1, 0.2]},
        images=[{"name": "job-0000-0.png", "seed": 1, "width": 64, "height": 64}],
        error={"code": "worker_lost", "message": "gone", "retryable": True},
        frontend=None, prompt="ünïcode ✓ prompt")
    clock.now = T0 + 1
    stored = records.create(record)
    assert stored == dataclasses.replace(record, updated=T0 + 1)
    assert records.get(record.id) == stored


def test_an_unknown_id_is_none(records: JobRecords) -> None:
    assert records.get("nope") is None
    assert records.delete("nope") is None


def test_a_second_record_with_the_same_id_is_a_conflict(records: JobRecords) -> None:
    records.create(make_record(1))
    with pytest.raises(Conflict):
        records.create(make_record(1, model="other"))
    assert records.get("job-0001").model == "tiny-sd"  # type: ignore[union-attr]


# Idempotency


def test_the_same_key_returns_the_first_record(records: JobRecords) -> None:
    first = records.create(make_record(1, idempotency_key="k"))
    again = records.create(make_record(2, idempotency_key="k", request_hash="other body"))
    assert again == first
    assert records.get("job-0002") is None
    assert records.find_idempotent("alice", "k") == first
    assert records.find_idempotent("bob", "k") is None


def test_keys_belong_to_their_owner(records: JobRecords) -> None:
    alice = records.create(make_record(1, idempotency_key="k"))
    bob = records.create(make_record(2, owner="bob", idempotency_key="k"))
    nobody = records.create(make_record(3, owner=None, idempotency_key="k"))
    assert {alice.id, bob.id, nobody.id} == {"job-0001", "job-0002", "job-0003"}


def test_records_without_an_owner_share_one_namespace_of_keys(records: JobRecords) -> None:
    first = records.create(make_record(1, owner=None, idempotency_key="k"))
    assert records.create(make_record(2, owner=None, idempotency_key="k")).id == first.id
    assert records.find_idempotent(None, "k") == first


def test_records_without_a_key_never_collide(records: JobRecords) -> None:
    records.create(make_record(1))
    records.create(make_record(2))
    assert len(records.list("alice")[0]) == 2


@pytest.mark.parametrize("owner", ["alice", None])
def test_a_race_on_one_key_makes_one_record(url: str, owner: str | None) -> None:
    # A connection each, as eight frontends would have: their transactions really overlap.
    databases = [open_database(url) for _ in range(8)]
    frontends = [JobRecords(db) for db in databases]
    results = run_in_threads(8, lambda i: frontends[i].create(
        make_record(i, owner=owner, idempotency_key="race")))
    assert all(isinstance(result, Record) for result in results), results
    assert len({result.id for result in results}) == 1
    assert len(frontends[0].list(owner)[0]) == 1
    for db in databases:
        db.close()


def test_a_key_inserted_after_the_look_returns_the_winner(
        records: JobRecords, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = records.create(make_record(1, idempotency_key="k"))
    real_look = records._find_idempotent
    looks: list[object] = []

    def look(*args: Any) -> Record | None:
        looks.append(args)  # the first look misses: it came before the winner's insert
        return None if len(looks) == 1 else real_look(*args)

    monkeypatch.setattr(records, "_find_idempotent", look)
    assert records.create(make_record(2, idempotency_key="k")) == winner
    assert records.get("job-0002") is None


# Status


def test_mark_running_moves_only_a_queued_record(records: JobRecords, clock: Clock) -> None:
    records.create(make_record(1))
    clock.now = T0 + 5
    records.mark_running("job-0001")
    running = records.get("job-0001")
    assert running is not None
    assert (running.status, running.updated) == ("running", T0 + 5)
    records.finish("job-0001", "succeeded")
    records.mark_running("job-0001")
    assert records.get("job-0001").status == "succeeded"  # type: ignore[union-attr]


def test_a_job_finishes_once(records: JobRecords, clock: Clock) -> None:
    records.create(make_record(1))
    clock.now = T0 + 20
    images = [{"name": "job-0001-0.png", "seed": 7, "width": 64, "height": 64}]
    assert records.finish("job-0001", "succeeded", worker_id="gpu-1", timings={"total": 2.5},
                          images=images)
    assert not records.finish("job-0001", "failed", error={"code": "x", "message": "late",
                                                           "retryable": False})
    done = records.get("job-0001")
    assert done is not None
    assert (done.status, done.finished, done.updated) == ("succeeded", T0 + 20, T0 + 20)
    assert (done.worker_id, done.timings, done.images, done.error) == \
        ("gpu-1", {"total": 2.5}, images, None)
    assert done.prompt == "a lighthouse at dusk, number 1"  # prompts kept by default


def test_racing_ends_end_a_job_once(records: JobRecords) -> None:
    records.create(make_record(1))
    ends = run_in_threads(8, lambda i: records.finish("job-0001", "cancelled"))
    assert ends.count(True) == 1
    assert ends.count(False) == 7


def test_an_end_must_be_terminal(records: JobRecords) -> None:
    records.create(make_record(1))
    with pytest.raises(ValueError, match="not 'running'"):
        records.finish("job-0001", "running")
    assert not records.finish("unknown", "failed")


def test_an_unknown_job_does_not_finish_when_scrubbing(db: Database) -> None:
    private = JobRecords(db, keep_prompts=False)
    assert not private.finish("unknown", "failed")


# The privacy scrub


def test_without_keep_prompts_an_ended_record_keeps_no_prompt(db: Database) -> None:
    private = JobRecords(db, keep_prompts=False)
    private.create(make_record(1))
    assert private.get("job-0001").prompt is not None  # type: ignore[union-attr]
    assert private.finish("job-0001", "failed",
                          error={"code": "e", "message": "m", "retryable": False})
    scrubbed = private.get("job-0001")
    assert scrubbed is not None
    assert (scrubbed.prompt, scrubbed.request) == (None, None)
    assert scrubbed.job == {"prompt": None, "negative_prompt": None, "seeds": [7], "steps": 4}
    assert scrubbed.error == {"code": "e", "message": "m", "retryable": False}
    assert not private.finish("job-0001", "succeeded")
    assert private.list("alice", query="lighthouse") == ([], False)


def test_sqlite_leaves_no_trace_of_a_scrubbed_prompt_in_its_files(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = open_database(str(path))
    private = JobRecords(db, keep_prompts=False)
    secret = "zebra-unicorn-7f3a9c prompt that must vanish"
    private.create(make_record(1, prompt=secret))
    for number in range(2, 5):  # neighbours on the same page, which the scrub must not leak
        private.create(make_record(number))
    assert secret.encode() in files_bytes(path)

    private.finish("job-0001", "succeeded")
    with sqlite3.connect(path) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert secret.encode() not in files_bytes(path)
    assert b"zebra-unicorn" not in files_bytes(path)
    db.close()


def files_bytes(path: Path) -> bytes:
    """The database file and its sidecars (WAL, shared memory), together."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


# Delete and retention


def test_delete_returns_the_record_it_removed(records: JobRecords) -> None:
    created = records.create(make_record(1))
    assert records.delete("job-0001") == created
    assert records.get("job-0001") is None
    assert records.delete("job-0001") is None


def test_retention_removes_ended_records_that_finished_before_the_cutoff(
        records: JobRecords, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records_module, "RETENTION_BATCH", 3)
    for number in range(10):
        records.create(make_record(number))
        if number < 8:
            clock.now = T0 + number
            records.finish(f"job-{number:04d}", "succeeded")
    removed = records.remove_finished_before(T0 + 7)  # finished at T0+0 ... T0+6
    assert sorted(record.id for record in removed) == [f"job-{n:04d}" for n in range(7)]
    left = {record.id for record in records.list(None, everyone=True, limit=50)[0]}
    assert left == {"job-0007", "job-0008", "job-0009"}
    assert records.remove_finished_before(T0 + 7) == []


# Listing


def test_owners_see_only_their_own_records(records: JobRecords) -> None:
    records.create(make_record(1, owner="alice"))
    records.create(make_record(2, owner="bob"))
    records.create(make_record(3, owner=None))
    assert ids(records.list("alice")) == ["job-0001"]
    assert ids(records.list("bob")) == ["job-0002"]
    assert ids(records.list(None)) == ["job-0003"]
    assert ids(records.list("carol")) == []
    assert ids(records.list("alice", everyone=True)) == ["job-0003", "job-0002", "job-0001"]


def ids(page: tuple[list[Record], bool]) -> list[str]:
    return [record.id for record in page[0]]


def test_listing_filters_by_status_and_model(records: JobRecords) -> None:
    records.create(make_record(1, model="tiny-sd"))
    records.create(make_record(2, model="tiny-sdxl"))
    records.create(make_record(3, model="tiny-sd"))
    records.finish("job-0003", "succeeded")
    assert ids(records.list("alice", status="queued")) == ["job-0002", "job-0001"]
    assert ids(records.list("alice", model="tiny-sd")) == ["job-0003", "job-0001"]
    assert ids(records.list("alice", status="succeeded", model="tiny-sd")) == ["job-0003"]
    assert ids(records.list("alice", status="failed")) == []


def test_the_query_matches_a_substring_of_the_prompt_ignoring_case(records: JobRecords) -> None:
    records.create(make_record(1, prompt="A Red Fox in snow"))
    records.create(make_record(2, prompt="100% cotton_shirt"))
    records.create(make_record(3, prompt="1000 cottonXshirt"))
    records.create(make_record(4, prompt=r"back\slash"))
    assert ids(records.list("alice", query="red fox")) == ["job-0001"]
    assert ids(records.list("alice", query="RED FOX")) == ["job-0001"]
    assert ids(records.list("alice", query="0% cotton_")) == ["job-0002"]
    assert ids(records.list("alice", query="%")) == ["job-0002"]
    assert ids(records.list("alice", query="_")) == ["job-0002"]
    assert ids(records.list("alice", query="k\\s")) == ["job-0004"]
    assert ids(records.list("alice", query="")) == ["job-0004", "job-0003", "job-0002",
                                                      "job-0001"]


def test_pages_follow_each_other_newest_first(records: JobRecords) -> None:
    for number in range(45):
        # Pairs share a creation time: the id orders them.
        records.create(make_record(number, created=T0 + number // 2))
    seen: list[str] = []
    before = None
    for expected_size, expected_more in ((20, True), (20, True), (5, False)):
        page, more = records.list("alice", limit=20, before=before)
        assert (len(page), more) == (expected_size, expected_more)
        seen.extend(record.id for record in page)
        before = page[-1].id
    assert seen == [f"job-{n:04d}" for n in reversed(range(45))]


def test_a_page_of_exactly_the_rest_has_no_more(records: JobRecords) -> None:
    for number in range(4):
        records.create(make_record(number))
    assert records.list("alice", limit=4)[1] is False
    assert records.list("alice", limit=3)[1] is True


def test_an_unknown_cursor_lists_nothing(records: JobRecords) -> None:
    records.create(make_record(1))
    assert records.list("alice", before="no-such-job") == ([], False)


def test_a_limit_below_one_is_a_bug(records: JobRecords) -> None:
    with pytest.raises(ValueError):
        records.list("alice", limit=0)


# Leases


def test_renew_extends_the_active_records_a_frontend_holds(records: JobRecords) -> None:
    records.create(make_record(1))
    records.create(make_record(2))
    records.create(make_record(3, frontend="frontend-b"))
    records.create(make_record(4))
    records.finish("job-0004", "succeeded")
    assert records.renew("frontend-a", T0 + 90) == 2
    leases = {r.id: r.lease_until for r in records.list("alice")[0]}
    assert leases == {"job-0001": T0 + 90, "job-0002": T0 + 90, "job-0003": T0 + 30,
                      "job-0004": T0 + 30}


def test_a_live_lease_is_not_claimed(records: JobRecords) -> None:
    records.create(make_record(1, lease_until=T0 + 30))
    assert records.claim("frontend-b", T0 + 29, T0 + 60) == []
    assert records.get("job-0001").frontend == "frontend-a"  # type: ignore[union-attr]


def test_an_expired_lease_is_claimed_and_the_submitter_kept(records: JobRecords) -> None:
    records.create(make_record(1, lease_until=T0 + 30))
    records.create(make_record(2, lease_until=T0 + 30))
    records.finish("job-0002", "failed")  # ended: nothing to take over
    claimed = records.claim("frontend-b", T0 + 31, T0 + 60)
    assert [(r.id, r.frontend, r.lease_until, r.submitter) for r in claimed] == \
        [("job-0001", "frontend-b", T0 + 60, "frontend-a:1")]
    assert records.get("job-0001") == claimed[0]
    assert records.claim("frontend-c", T0 + 31, T0 + 60) == []


def test_a_restarted_frontend_reclaims_its_own_records_at_once(records: JobRecords) -> None:
    records.create(make_record(1, frontend="frontend-a", lease_until=T0 + 30))
    records.create(make_record(2, frontend="frontend-b", lease_until=T0 + 30))
    records.create(make_record(5, frontend="frontend-a", lease_until=T0 + 30))  # this life's
    assert records.claim("frontend-a", T0, T0 + 60) == []
    claimed = records.claim("frontend-a", T0, T0 + 60, own_before=T0 + 3)
    assert [(r.id, r.lease_until) for r in claimed] == [("job-0001", T0 + 60)]


def test_frontends_claiming_at_once_never_share_a_record(url: str) -> None:
    databases = [open_database(url) for _ in range(4)]
    frontends = [JobRecords(db) for db in databases]
    for round_ in range(3):
        for number in range(30):
            frontends[0].create(make_record(round_ * 100 + number, lease_until=T0))
        claims = run_in_threads(
            4, lambda i: frontends[i].claim(f"frontend-{i}", T0 + 1, T0 + 60))
        claimed = [record.id for claim in claims for record in claim]
        assert len(claimed) == len(set(claimed)) == 30
        holders = {r.id: r.frontend for claim in claims for r in claim}
        stored = {r.id: r.frontend for r in frontends[0].list("alice", limit=100)[0]}
        assert {job: stored[job] for job in holders} == holders
    for db in databases:
        db.close()


def test_a_newer_release_may_open_the_records(db: Database) -> None:
    JobRecords(db)
    with db.transaction() as tx:  # as a newer release with an additive version 2 leaves it
        tx.execute("UPDATE schema_info SET version = 2, compatible_from = 1 WHERE name = 'jobs'")
    records = JobRecords(db)
    records.create(make_record(1))
    assert records.get("job-0001") is not None
