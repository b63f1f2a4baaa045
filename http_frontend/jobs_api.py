"""The jobs API: submit now, follow later, cancel any time.

``POST /v1/jobs`` answers as soon as the broker took the job; ``GET /v1/jobs/{id}/events``
streams what happens to it (late watchers first get what already happened); ``DELETE``
cancels it. Jobs live in this frontend's memory: finished ones for ``ttl`` seconds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from http_frontend import streaming
from http_frontend.errors import APIError, JobError
from http_frontend.pending import PendingJob
from http_frontend.service import ClientGone, ImageService, Prepared

log = logging.getLogger(__name__)

COMPACT_AFTER = 30.0  # seconds a finished job keeps its previews for watchers still reading
_PRINTABLE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # ids shown back in a 404; others are not


@dataclass(eq=False)
class JobRecord:
    prepared: Prepared
    pending: PendingJob
    created: int = field(default_factory=lambda: int(time.time()))
    watchers: int = 0
    left_at: float = 0.0  # time.monotonic() when its last watcher left
    orphan_check: bool = False  # a timer will look at it: one per job, however many churn
    finished_at: float | None = None  # time.monotonic() when its answer was seen

    @property
    def id(self) -> str:
        return self.prepared.job.id


class JobsAPI:
    def __init__(self, service: ImageService, *, ttl: float = 600.0, max_jobs: int = 1000,
                 orphan_grace: float = 10.0) -> None:
        self.service = service
        self.ttl = ttl
        self.max_jobs = max_jobs
        # A page reload or a network blip drops the stream for a moment: a job whose last
        # watcher left is cancelled only if nobody is back within this many seconds.
        self.orphan_grace = orphan_grace
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()  # guards _jobs and every record's watchers

    # ---------------------------------------------------------------- endpoints

    def submit(self, body: Any) -> dict[str, Any]:
        prepared = self.service.prepare(body)
        self.service.refuse_if_draining()
        release = self.service.take_waiting_slot()  # the broker may take seconds to answer
        try:
            pending = self.service.submit_until_taken(prepared)
        finally:
            release()
        record = JobRecord(prepared, pending)
        with self._lock:
            self._forget_old()
            self._jobs[record.id] = record
        return self._describe(record)

    def status(self, job_id: str) -> dict[str, Any]:
        record = self._get(job_id)
        description = self._describe(record)
        pending = record.pending
        if pending.result is not None:
            description["result"] = self.service.images_response(record.prepared,
                                                                 pending.result)
        elif pending.error is not None and not pending.cancelled_here:
            description["error"] = self._error(record, pending.error)
        return description

    def cancel(self, job_id: str) -> dict[str, Any]:
        record = self._get(job_id)
        if not record.pending.done:
            self.service.broker.cancel(record.id)
            record.pending.cancel()
        return self._describe(record)

    def events(self, job_id: str, client_gone: ClientGone | None) -> Iterator[bytes]:
        """The job's events as SSE; the last watcher leaving an unfinished job cancels it.

        The job is looked up and a stream slot taken now, so a refusal is a plain error.
        """
        record = self._get(job_id)
        close = self.service.open_stream()
        with self._lock:
            record.watchers += 1
        return streaming.ClosingStream(self._watch(record, client_gone),
                                       lambda: self._unwatch(record, close))

    def check(self, job_id: str) -> None:
        """Raise the 404 for an unknown job; nothing else (HEAD on its events)."""
        self._get(job_id)

    def _watch(self, record: JobRecord, client_gone: ClientGone | None) -> Iterator[bytes]:
        try:
            yield from self._follow(record, client_gone)
        except APIError as exc:
            if exc.status != 499:  # nobody is left to tell when the client hung up
                yield streaming.sse("failed", {"id": record.id, "error": exc.error_object()})

    def _unwatch(self, record: JobRecord, close: Callable[[], None]) -> None:
        """A watcher left: give its slot back; the last one leaving starts the grace period."""
        with self._lock:
            record.watchers -= 1
            record.left_at = time.monotonic()
            check = record.watchers == 0 and not record.pending.done \
                and not record.orphan_check
            record.orphan_check |= check
        close()
        if check:
            self._check_orphan_in(record, self.orphan_grace)

    def _check_orphan_in(self, record: JobRecord, seconds: float) -> None:
        timer = threading.Timer(seconds, self._cancel_if_orphaned, (record,))
        timer.daemon = True
        timer.start()

    def _cancel_if_orphaned(self, record: JobRecord) -> None:
        with self._lock:
            orphaned = record.watchers == 0 and not record.pending.done
            left = self.orphan_grace - (time.monotonic() - record.left_at)
            record.orphan_check = orphaned and left > 0
        if record.orphan_check:
            self._check_orphan_in(record, left)  # someone came back and left again since
        elif orphaned:
            log.info("job %s cancelled: nobody watched it for %.0f s", record.id,
                     self.orphan_grace)
            self.cancel(record.id)

    # ---------------------------------------------------------------- helpers

    def _follow(self, record: JobRecord, client_gone: ClientGone | None) -> Iterator[bytes]:
        job = record.prepared.job
        for event in self.service.follow(record.pending, job, client_gone,
                                         keepalive=self.service.config.keepalive):
            if event is None:
                yield streaming.KEEPALIVE
                continue
            sse = streaming.job_event(
                job.id, event,
                completed=lambda m: self.service.images_response(record.prepared, m)
                | {"id": job.id},
                failure=lambda error: self._error(record, error),
                cancelled_here=record.pending.cancelled_here)
            if sse is not None:
                yield sse

    def _error(self, record: JobRecord, error: JobError) -> dict[str, Any]:
        """OpenAI's error body for the job's failure."""
        return self.service.failure(error, record.prepared.job.model,
                                    cancelled_here=record.pending.cancelled_here
                                    ).error_object()

    def _get(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._jobs.get(job_id)
        if record is None:
            shown = f"job {job_id}" if _PRINTABLE_ID.fullmatch(job_id) else "such job"
            raise APIError(404, f"no {shown} here (finished jobs are kept for "
                                f"{self.ttl:.0f} s)", param="id", code="job_not_found")
        return record

    def _describe(self, record: JobRecord) -> dict[str, Any]:
        job, pending = record.prepared.job, record.pending
        return {
            "id": job.id, "object": "image.job", "status": _status(pending),
            "created": record.created, "model": job.model, "width": job.width,
            "height": job.height, "steps": job.steps, "n": job.n, "seeds": list(job.seeds),
            "position": pending.position, "step": pending.step,
        }

    def _forget_old(self) -> None:
        """Drop finished jobs past their time to live, and the oldest past the bound."""
        now = time.monotonic()
        for record in list(self._jobs.values()):
            if record.pending.done and record.finished_at is None:
                record.finished_at = now
            if record.finished_at is not None and now - record.finished_at > self.ttl:
                del self._jobs[record.id]
            elif record.finished_at is not None and now - record.finished_at > COMPACT_AFTER:
                record.pending.compact()
        excess = len(self._jobs) - self.max_jobs + 1
        if excess > 0:
            finished = [r for r in self._jobs.values() if r.pending.done]
            for record in sorted(finished, key=lambda r: r.created)[:excess]:
                del self._jobs[record.id]


def _status(pending: PendingJob) -> str:
    if pending.result is not None:
        return "succeeded"
    if pending.error is not None:
        return "cancelled" if pending.cancelled_here else "failed"
    return "running" if pending.step else "queued"
