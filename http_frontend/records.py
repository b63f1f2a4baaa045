"""The job records: every image job the frontend took, durable before it is acknowledged.

A ``Record`` is one job: who asked (``owner``: the API key's name, else the request's
``user``), what they asked (the request body as given, and the job it resolved to: seeds, size,
steps...), and how it went (status, timings, the images' names, the error). The frontend that
takes a request creates the record before it answers; it marks the record running when a worker
starts the job and finishes it exactly once: succeeded, failed or cancelled. Clients list their
own records newest first, a page at a time; an admin lists everyone's. History retention removes
finished records (``remove_finished_before``), and their images with them.

The lease. Frontends may share one database (PostgreSQL), so each unfinished record names the
frontend that holds it and until when (``frontend``, ``lease_until``). The holder renews its
leases while it runs. A frontend that stops renewing (it died, even by kill -9, or hung) loses
its unfinished records to whichever frontend claims them first; one that restarts claims its
own at once. A claim is one conditional UPDATE, so two frontends never both take a record.
``submitter`` keeps the broker owner id the job was first submitted under.

Idempotency. A client may send an ``Idempotency-Key``: a second create with the same owner and
key inserts nothing and returns the first record (the caller compares ids, and
``request_hash`` to tell a reused key with a different body). A unique index decides races;
records without an owner share one namespace of keys.

Privacy. With ``keep_prompts=False`` a record's prompts (the prompt, the request body and the
job's prompt fields) are overwritten with NULL when the job ends. SQLite's ``secure_delete``
zeroes the overwritten bytes in the file. PostgreSQL cannot promise as much: an UPDATE writes a
new row version and leaves the old one, prompt included, in the table's files until VACUUM
reclaims it (autovacuum, eventually), and in the write-ahead log and its archives or replicas.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from http_frontend.database import Conflict, Database, Migration, Transaction, migrate
from http_frontend.image_store import valid_name

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
KINDS = ("job", "generation")
PROMPT_FIELDS = ("prompt", "negative_prompt")  # the job's fields the privacy scrub clears
RETENTION_BATCH = 500  # records removed per transaction by remove_finished_before


@dataclass
class Record:
    """One job as recorded; see the module's docstring."""

    id: str
    kind: str  # "job" (POST /v1/jobs: resubmitted after a restart) | "generation" (never)
    owner: str | None
    model: str
    prompt: str | None  # None once scrubbed
    request: dict[str, Any] | None  # the client's body as given; None once scrubbed
    job: dict[str, Any]  # the resolved job, as plain JSON
    deadline: float  # epoch seconds
    submitter: str  # the broker owner id the job was submitted under
    frontend: str | None  # the frontend holding the lease
    lease_until: float
    created: float
    status: str = "queued"
    idempotency_key: str | None = None
    request_hash: str | None = None
    updated: float = 0.0
    finished: float | None = None
    worker_id: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None  # {"code": str, "message": str, "retryable": bool}


COLUMNS = tuple(f.name for f in dataclasses.fields(Record))
JSON_COLUMNS = frozenset({"request", "job", "timings", "images", "error"})
SELECTED = ", ".join(COLUMNS)
IS_ACTIVE = "status IN ({})".format(", ".join(f"'{status}'" for status in ACTIVE))
IS_TERMINAL = "status IN ({})".format(", ".join(f"'{status}'" for status in TERMINAL))

MIGRATIONS = (
    Migration(1, (
        f"""CREATE TABLE jobs (
            id TEXT NOT NULL PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('job', 'generation')),
            owner TEXT,
            model TEXT NOT NULL,
            prompt TEXT,
            request TEXT,
            job TEXT NOT NULL,
            deadline DOUBLE PRECISION NOT NULL,
            submitter TEXT NOT NULL,
            frontend TEXT,
            lease_until DOUBLE PRECISION NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            status TEXT NOT NULL CHECK ({IS_ACTIVE} OR {IS_TERMINAL}),
            idempotency_key TEXT,
            request_hash TEXT,
            updated DOUBLE PRECISION NOT NULL,
            finished DOUBLE PRECISION,
            worker_id TEXT,
            timings TEXT NOT NULL,
            images TEXT NOT NULL,
            error TEXT
        )""",
        "CREATE INDEX jobs_owner_created ON jobs (owner, created, id)",
        # NULLs are distinct in a unique index, so keys of records without an owner need
        # their own index to be unique among themselves.
        "CREATE UNIQUE INDEX jobs_owner_key ON jobs (owner, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL AND owner IS NOT NULL",
        "CREATE UNIQUE INDEX jobs_anonymous_key ON jobs (idempotency_key) "
        "WHERE idempotency_key IS NOT NULL AND owner IS NULL",
        "CREATE INDEX jobs_status_lease ON jobs (status, lease_until)",
        "CREATE INDEX jobs_finished ON jobs (finished)",
    ), compatible_from=1),
)


class JobRecords:
    """The jobs table: create, follow, list, lease and retire job records."""

    def __init__(self, db: Database, *, keep_prompts: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._keep_prompts = keep_prompts
        self._clock = clock
        migrate(db, MIGRATIONS, name="jobs")

    @property
    def location(self) -> str:
        """Where the records are, for logs (no password)."""
        return self._db.location

    def create(self, record: Record) -> Record:
        """Insert ``record``; the existing record instead if its owner used its key before."""
        stored = dataclasses.replace(record, updated=self._clock())
        try:
            with self._db.transaction() as tx:
                existing = self._find_idempotent(tx, record.owner, record.idempotency_key)
                if existing is not None:
                    return existing
                placeholders = ", ".join("?" for _ in COLUMNS)
                tx.execute(f"INSERT INTO jobs ({SELECTED}) VALUES ({placeholders})",
                           _to_row(stored))
        except Conflict:
            # Another thread or frontend inserted the same key since we looked: it won.
            if record.idempotency_key is None:
                raise
            winner = self.find_idempotent(record.owner, record.idempotency_key)
            if winner is None:
                raise
            return winner
        return stored

    def get(self, job_id: str) -> Record | None:
        with self._db.transaction() as tx:
            rows = tx.execute(f"SELECT {SELECTED} FROM jobs WHERE id = ?", (job_id,))
        return _from_row(rows[0]) if rows else None

    def find_idempotent(self, owner: str | None, key: str) -> Record | None:
        """The record ``owner`` created with Idempotency-Key ``key``, if any."""
        with self._db.transaction() as tx:
            return self._find_idempotent(tx, owner, key)

    def _find_idempotent(self, tx: Transaction, owner: str | None,
                         key: str | None) -> Record | None:
        if key is None:
            return None
        owner_matches, params = _owner_matches(owner)
        rows = tx.execute(f"SELECT {SELECTED} FROM jobs WHERE {owner_matches} "
                          "AND idempotency_key = ?", (*params, key))
        return _from_row(rows[0]) if rows else None

    def mark_running(self, job_id: str) -> None:
        """A worker started the job: queued becomes running (nothing else changes)."""
        with self._db.transaction() as tx:
            tx.execute("UPDATE jobs SET status = 'running', updated = ? "
                       "WHERE id = ? AND status = 'queued'", (self._clock(), job_id))

    def finish(self, job_id: str, status: str, *, worker_id: str | None = None,
               timings: dict[str, Any] | None = None,
               images: list[dict[str, Any]] | None = None,
               error: dict[str, Any] | None = None) -> bool:
        """End an active job with ``status``; False (and no change) if it had ended already."""
        if status not in TERMINAL:
            raise ValueError(f"a job ends succeeded, failed or cancelled, not {status!r}")
        now = self._clock()
        changes: dict[str, Any] = {"status": status, "updated": now, "finished": now}
        given = {"worker_id": worker_id, "timings": timings, "images": images, "error": error}
        changes.update({name: _column_value(name, value)
                        for name, value in given.items() if value is not None})
        with self._db.transaction() as tx:
            if not self._keep_prompts:
                rows = tx.execute(f"SELECT job, request FROM jobs WHERE id = ? AND {IS_ACTIVE}",
                                  (job_id,))
                if not rows:
                    return False
                # The request's digest goes too: it would confirm a guessed prompt. An
                # edit's stored inputs stay named, and nothing else of its request: they are
                # the user's images, deleted with the record.
                request = json.loads(rows[0][1]) if rows[0][1] else None
                changes.update(prompt=None, request=_column_value("request",
                                                                  inputs_only(request)),
                               request_hash=None, job=_scrubbed_job(rows[0][0]))
            assignments = ", ".join(f"{name} = ?" for name in changes)
            # The status condition makes the end happen once, even when two threads race.
            tx.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND {IS_ACTIVE}",
                       (*changes.values(), job_id))
            return tx.rowcount == 1

    def delete(self, job_id: str) -> Record | None:
        """Remove a record; what it was (its images are the caller's to delete)."""
        with self._db.transaction() as tx:
            rows = tx.execute(f"DELETE FROM jobs WHERE id = ? RETURNING {SELECTED}", (job_id,))
        return _from_row(rows[0]) if rows else None

    def renew(self, frontend: str, lease_until: float) -> int:
        """Extend the lease of every active record ``frontend`` holds; how many it holds."""
        with self._db.transaction() as tx:
            tx.execute(f"UPDATE jobs SET lease_until = ? WHERE frontend = ? AND {IS_ACTIVE}",
                       (lease_until, frontend))
            return tx.rowcount

    def claim(self, frontend: str, now: float, lease_until: float, *,
              own_before: float | None = None) -> list[Record]:
        """Take over active records whose lease ran out, and, with ``own_before``, those of
        this frontend created before then: its previous life's (a restart; pass the moment
        this life began, before it took any job), never the jobs it took since.

        One UPDATE decides: on PostgreSQL a second claimer waits for the first to commit and
        then re-checks each row, which by then holds a live lease, so it skips it.
        """
        takeover = "lease_until < ?"
        params: tuple[Any, ...] = (now,)
        if own_before is not None:
            takeover += " OR (frontend = ? AND created < ?)"
            params += (frontend, own_before)
        with self._db.transaction() as tx:
            rows = tx.execute(f"UPDATE jobs SET frontend = ?, lease_until = ? "
                              f"WHERE {IS_ACTIVE} AND ({takeover}) RETURNING {SELECTED}",
                              (frontend, lease_until, *params))
        return [_from_row(row) for row in rows]

    def remove_finished_before(self, cutoff: float) -> list[Record]:
        """Delete ended records that finished before ``cutoff``; what they were."""
        removed: list[Record] = []
        while True:
            # A batch per transaction: a long backlog never holds one giant transaction.
            with self._db.transaction() as tx:
                rows = tx.execute(
                    f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {IS_TERMINAL} "
                    f"AND finished < ? ORDER BY finished LIMIT ?) RETURNING {SELECTED}",
                    (cutoff, RETENTION_BATCH))
            removed.extend(_from_row(row) for row in rows)
            if len(rows) < RETENTION_BATCH:
                return removed

    def list(self, owner: str | None, *, everyone: bool = False, limit: int = 20,
             before: str | None = None, status: str | None = None, model: str | None = None,
             query: str | None = None) -> tuple[list[Record], bool]:
        """A page of records, newest first, and whether older ones match too.

        ``owner``'s records, or with ``everyone`` all of them; ``before`` (a job id) starts the
        page after that record; ``query`` matches a substring of the prompt, ignoring case.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        conditions, params = _list_conditions(owner, everyone=everyone, before=before,
                                              status=status, model=model, query=query)
        where = " AND ".join(conditions) or "TRUE"
        with self._db.transaction() as tx:
            rows = tx.execute(f"SELECT {SELECTED} FROM jobs WHERE {where} "
                              "ORDER BY created DESC, id DESC LIMIT ?", (*params, limit + 1))
        return [_from_row(row) for row in rows[:limit]], len(rows) > limit


def _list_conditions(owner: str | None, *, everyone: bool, before: str | None,
                     status: str | None, model: str | None,
                     query: str | None) -> tuple[list[str], list[Any]]:
    """The WHERE conditions of a listing, and their parameters in order."""
    conditions: list[str] = []
    params: list[Any] = []
    if not everyone:
        owner_matches, owner_params = _owner_matches(owner)
        conditions.append(owner_matches)
        params.extend(owner_params)
    if before is not None:
        # An unknown id makes the subquery NULL, and the comparison with it false: no rows.
        conditions.append("(created, id) < (SELECT created, id FROM jobs WHERE id = ?)")
        params.append(before)
    for column, value in (("status", status), ("model", model)):
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    if query is not None:
        # LOWER() on both sides, so both dialects fold case the same way.
        conditions.append("LOWER(prompt) LIKE LOWER(?) ESCAPE '\\'")
        params.append(f"%{_escape_like(query)}%")
    return conditions, params


def _owner_matches(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """A condition matching ``owner``'s records (no owner matches records without one)."""
    return ("owner IS NULL", ()) if owner is None else ("owner = ?", (owner,))


def _escape_like(text: str) -> str:
    """``text`` as a LIKE pattern that matches it literally (with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def input_names(request: Any) -> list[str]:
    """The store names of an edit's frames in its recorded request: ``image[i].name``, then
    ``mask.name`` (http_frontend.history stores them); none for anything else."""
    if not isinstance(request, dict):
        return []
    images = request.get("image")
    names = [item.get("name") for item in images if isinstance(item, dict)] \
        if isinstance(images, list) else []
    mask = request.get("mask")
    if isinstance(mask, dict):
        names.append(mask.get("name"))
    return [name for name in names if isinstance(name, str) and valid_name(name)]


def inputs_only(request: Any) -> dict[str, Any] | None:
    """What a scrubbed record keeps of an edit's request: the names of its stored inputs."""
    names = input_names(request)
    if not names:
        return None
    images = request.get("image") if isinstance(request, dict) else None
    count = sum(1 for item in images or () if isinstance(item, dict) and "name" in item)
    kept: dict[str, Any] = {"image": [{"name": name} for name in names[:count]]}
    if len(names) > count:
        kept["mask"] = {"name": names[count]}
    return kept


def _scrubbed_job(job_json: str) -> str:
    """The stored job with its prompt fields cleared."""
    job = json.loads(job_json)
    for name in PROMPT_FIELDS:
        if name in job:
            job[name] = None
    return json.dumps(job)


def _column_value(name: str, value: Any) -> Any:
    """A field's value as stored: dicts and lists as JSON text."""
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value)
    return value


def _to_row(record: Record) -> tuple[Any, ...]:
    return tuple(_column_value(name, getattr(record, name)) for name in COLUMNS)


def _from_row(row: Sequence[Any]) -> Record:
    values = dict(zip(COLUMNS, row, strict=True))
    for name in JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Record(**values)
