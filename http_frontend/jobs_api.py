"""The jobs API: submit now, follow later, cancel any time, list what was done.

``POST /v1/jobs`` records the job, then answers as soon as the broker took it. Every job lives
in the job records (http_frontend/history.py), so any frontend sharing the database answers
``GET /v1/jobs/{id}``, lists it, watches it and cancels it, for the identity that made it. The
frontend that submitted a job also follows it live (``LiveJob``): queue position, steps,
previews; a watcher elsewhere sees its record change, and between changes the queue position,
steps and previews the broker relays to it (``_watch_record``, WATCH).

``DELETE`` cancels a job that is still running (the broker is told under the owner the job
was submitted with, whichever frontend submitted it) and removes a finished job's record and
images. Nothing else cancels a job: it runs to its end whether anyone watches it or not, and
its result waits in the records for whoever asks.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from broker import logs
from broker.protocol import ErrorCode, JobSpec, Message, MsgType
from http_frontend import streaming
from http_frontend.auth import Identity
from http_frontend.errors import APIError, JobError, invalid
from http_frontend.history import Caller, Tracked, error_of
from http_frontend.pending import PendingJob
from http_frontend.queue_wait import estimate_wait
from http_frontend.records import ACTIVE, TERMINAL, Record
from http_frontend.service import DEADLINE_SLACK, ClientGone, ImageService, Prepared

log = logging.getLogger(__name__)

COMPACT_AFTER = 30.0  # seconds a finished job keeps its previews for watchers still reading
RECORD_POLL = 0.5  # seconds between looks at a record followed from another frontend
MAX_LIST = 100  # most jobs one page of GET /v1/jobs holds
_PRINTABLE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # ids shown back in a 404; others are not
STATUSES = ACTIVE + TERMINAL


@dataclass(eq=False)
class LiveJob:
    """A job this frontend submitted (or took over) and follows as it happens."""

    prepared: Prepared
    tracked: Tracked
    finished_at: float | None = None  # time.monotonic() when its answer was seen

    @property
    def id(self) -> str:
        return self.prepared.job.id

    @property
    def done(self) -> bool:
        return self.tracked.pending.done


@dataclass(frozen=True)
class ListQuery:
    limit: int = 20
    before: str | None = None
    status: str | None = None
    model: str | None = None
    query: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> ListQuery:
        """The query string of GET /v1/jobs, each bad parameter a 400 naming it."""
        limit = params.get("limit", "20")
        if not isinstance(limit, str) or not limit.isascii() or not limit.isdigit() \
                or len(limit.lstrip("0")) > 3 or not 1 <= int(limit) <= MAX_LIST:
            raise invalid("limit", f"'limit' must be a whole number from 1 to {MAX_LIST}")
        status = _one(params, "status")
        if status is not None and status not in STATUSES:
            raise invalid("status", f"'status' must be one of {', '.join(STATUSES)}")
        return cls(int(limit), _one(params, "before"), status, _one(params, "model"),
                   _one(params, "q"))


def _one(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid(name, f"give '{name}' once")
    if "\x00" in value:  # PostgreSQL's text refuses it; SQLite's LIKE would stop at it
        raise invalid(name, f"'{name}' holds a NUL character")
    if len(value) > 256:
        raise invalid(name, f"'{name}' is longer than 256 characters")
    return value


class JobsAPI:
    def __init__(self, service: ImageService, *, ttl: float = 600.0,
                 max_jobs: int = 1000) -> None:
        self.service = service
        self.history = service.history
        self.ttl = ttl  # seconds a finished job stays followed live here (its record stays)
        self.max_jobs = max_jobs
        self._live: dict[str, LiveJob] = {}
        self._lock = threading.Lock()  # guards _live

    # ---------------------------------------------------------------- endpoints

    def submit(self, body: Any, caller: Caller) -> tuple[int, dict[str, Any]]:
        """(HTTP status, the job): 202 for a new job, 200 for the one a repeated
        Idempotency-Key names."""
        return self._submit(self.service.prepare(body, user=caller.owner, share=caller.share),
                            caller)

    def submit_prepared(self, prepared: Prepared, caller: Caller
                        ) -> tuple[int, dict[str, Any]]:
        """``submit`` for a request already prepared: an edit (POST /v1/jobs/edits)."""
        return self._submit(prepared, caller)

    def _submit(self, prepared: Prepared, caller: Caller) -> tuple[int, dict[str, Any]]:
        self.service.refuse_if_draining()
        release = self.service.take_waiting_slot()  # the broker may take seconds to answer
        try:
            record = self.service.open_record(prepared, caller, kind="job")
            if record.id != prepared.job.id:
                return 200, self._describe(record, self._live_job(record.id), caller.base_url)
            tracked = self.service.submit_until_taken(prepared)
            tracked.acknowledged = True  # answered 202: its record stays, however it ends
        finally:
            release()
        live = self._add(prepared, tracked)
        return 202, self._describe(record, live, caller.base_url)

    def adopt(self, record: Record, now: float) -> None:
        """Follow a recorded job this frontend did not submit in this life: its own before a
        restart, or another frontend's that stopped renewing its lease. It is submitted
        again under its id and first owner, with the time its deadline leaves."""
        body = record.request or {}
        job = JobSpec.from_wire({**record.job, "timeout": record.deadline - now})
        prepared = Prepared.restore(body, job)
        inputs: tuple[bytes, ...] = ()
        if job.frames:
            inputs = self.history.input_frames(record) or ()
            if len(inputs) != job.frames:
                # Its inputs were held by the frontend that stopped, and the store has them
                # not (--no-image-store, or swept): it cannot run again.
                self.history.fail(job.id, JobError(
                    ErrorCode.WORKER_LOST, "the frontend that took this edit stopped, and "
                                           "its input images were not kept: send it again"))
                return
        pending = self.service.broker.submit(job, owner=record.submitter, inputs=inputs)
        tracked = self.service.track(job, pending)
        tracked.acknowledged = True  # its client was told long ago
        self._add(prepared, tracked)
        log.info("job %s: following it again (%.0f s left)", job.id, record.deadline - now,
                 extra=logs.job_fields(job, user=record.owner))

    def status(self, job_id: str, identity: Identity, base_url: str) -> dict[str, Any]:
        record = self._visible(job_id, identity)
        live = self._live_job(job_id)
        if live is not None and live.done:
            live.tracked.settled.wait(5.0)  # so the answer is the stored one
            record = self.history.records.get(job_id) or record
        return self._describe(record, live, base_url, result=True)

    def delete(self, job_id: str, identity: Identity, base_url: str) -> dict[str, Any]:
        """Cancel a job still running; remove a finished one's record and images."""
        record = self._visible(job_id, identity)
        if record.status in TERMINAL:
            self.history.delete(record)
            with self._lock:
                self._live.pop(job_id, None)
            return {"id": job_id, "object": "image.job.deleted", "deleted": True}
        return self._cancel(record, base_url)

    def cancel(self, job_id: str, identity: Identity, base_url: str) -> dict[str, Any]:
        """Cancel a job still running; a finished one is left as it is (never deleted: a
        cancel that comes just after the end must not take the images)."""
        record = self._visible(job_id, identity)
        if record.status in TERMINAL:
            return self._describe(record, self._live_job(job_id), base_url)
        return self._cancel(record, base_url)

    def _cancel(self, record: Record, base_url: str) -> dict[str, Any]:
        job_id = record.id
        live = self._live_job(job_id)
        if live is not None:
            self.service.broker.cancel(job_id)
            live.tracked.pending.cancel()
            live.tracked.settled.wait(5.0)
        else:  # another frontend, or a generation request here, waits for it: the broker
            # answers that one "cancelled"; the record ends now
            self.service.broker.cancel(job_id, owner=record.submitter, forget=False)
            self.history.fail(job_id, JobError(ErrorCode.CANCELLED, "the job was cancelled"))
        return self._describe(self.history.records.get(job_id) or record, live, base_url)

    def listing(self, identity: Identity, query: ListQuery, base_url: str) -> dict[str, Any]:
        records, more = self.history.records.list(
            identity.key, everyone=identity.sees_all, limit=query.limit, before=query.before,
            status=query.status, model=query.model, query=query.query)
        data = [self._describe(r, self._live_job(r.id), base_url) for r in records]
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def events(self, job_id: str, identity: Identity, client_gone: ClientGone | None,
               base_url: str) -> Iterator[bytes]:
        """The job's events as SSE, from here or from its record; a watcher leaving changes
        nothing for the job.

        The job is looked up and a stream slot taken now, so a refusal is a plain error.
        """
        record = self._visible(job_id, identity)
        live = self._live_job(job_id)
        close = self.service.open_stream()
        if live is None:
            return streaming.ClosingStream(
                self._watch_record(record, client_gone, base_url), close)
        return streaming.ClosingStream(self._watch(live, client_gone, base_url), close)

    def check(self, job_id: str, identity: Identity) -> None:
        """Raise the 404 for an unknown job; nothing else (HEAD on its events)."""
        self._visible(job_id, identity)

    def live_jobs(self) -> list[LiveJob]:
        with self._lock:
            self._forget_old()
            return list(self._live.values())

    # ---------------------------------------------------------------- following here

    def _watch(self, live: LiveJob, client_gone: ClientGone | None, base_url: str
               ) -> Iterator[bytes]:
        try:
            yield from self._follow(live, client_gone, base_url)
        except APIError as exc:
            if exc.status != 499:  # nobody is left to tell when the client hung up
                yield streaming.sse("failed", {"id": live.id, "error": exc.error_object()})

    def _follow(self, live: LiveJob, client_gone: ClientGone | None, base_url: str
                ) -> Iterator[bytes]:
        job, pending = live.prepared.job, live.tracked.pending
        for event in self.service.follow(pending, job, client_gone,
                                         keepalive=self.service.config.keepalive,
                                         cancel_on_leave=False):
            if event is None:
                yield streaming.KEEPALIVE
                continue
            sse = streaming.job_event(
                job.id, event, completed=lambda _: self._completed(live, base_url),
                failure=lambda error: self._error(job.model, error),
                cancelled_here=pending.cancelled_here
                or (isinstance(event, JobError) and event.code == ErrorCode.CANCELLED),
                wait=lambda position, work_ahead: self._wait(job.to_wire(), position,
                                                             work_ahead))
            if sse is not None:
                yield sse

    def _completed(self, live: LiveJob, base_url: str) -> dict[str, Any]:
        """The completed event: the images by URL once stored (b64 where they are not)."""
        tracked = live.tracked
        tracked.settled.wait(30.0)
        if tracked.record is not None and all(tracked.image_names):
            return self.service.record_response(tracked.record, "url", base_url,
                                                missing_ok=True) | {"id": live.id}
        assert tracked.pending.result is not None
        return self.service.images_response(live.prepared, tracked.pending.result, tracked,
                                            base_url, response_format="b64_json") | \
            {"id": live.id}

    # ---------------------------------------------------------------- following elsewhere

    def _watch_record(self, record: Record, client_gone: ClientGone | None, base_url: str
                      ) -> Iterator[bytes]:
        """A job another frontend follows: its record's changes until it ends, and between
        them the place in line, steps and previews the broker relays here (WATCH)."""
        broker = self.service.broker
        relayed = broker.watch(record.id) if record.status not in TERMINAL else None
        try:
            yield from self._record_events(record, relayed, client_gone, base_url)
        finally:
            if relayed is not None:
                broker.unwatch(record.id)

    def _record_events(self, record: Record, relayed: PendingJob | None,
                       client_gone: ClientGone | None, base_url: str) -> Iterator[bytes]:
        shown = None
        stepped = False  # a relayed step said it runs: the record's "step 0" would go back
        cursor = 0
        deadline = record.deadline + DEADLINE_SLACK
        quiet_since = time.monotonic()
        while True:
            if record.status != shown:
                shown = record.status
                if not (record.status == "running" and stepped):
                    quiet_since = time.monotonic()
                    yield self._record_event(record, base_url)
                if record.status in TERMINAL:
                    return
            if time.time() >= deadline or (client_gone is not None and client_gone()):
                return
            if time.monotonic() - quiet_since >= self.service.config.keepalive:
                quiet_since = time.monotonic()
                yield streaming.KEEPALIVE
            if relayed is None:
                time.sleep(RECORD_POLL)
            else:
                events, cursor = relayed.events_after(cursor, RECORD_POLL)
                for event in events:
                    sse = self._relayed_event(record, event) \
                        if isinstance(event, Message) else None
                    if sse is not None:
                        stepped = stepped or sse.startswith((b"event: progress",
                                                             b"event: preview"))
                        quiet_since = time.monotonic()
                        yield sse
            found = self.history.records.get(record.id)
            if found is None:  # deleted meanwhile
                yield streaming.sse("cancelled", {"id": record.id})
                return
            record = found

    def _relayed_event(self, record: Record, event: Message) -> bytes | None:
        """The jobs API's event for a place in line or a step the broker relayed; what ends
        the job comes from its record."""
        if event.type not in (MsgType.ACCEPTED, MsgType.PROGRESS):
            return None
        if event.type is MsgType.ACCEPTED and record.status != "queued":
            return None  # a place told before it started, read after the record moved on
        return streaming.job_event(
            record.id, event, completed=lambda _: {},
            failure=lambda error: self._error(record.model, error),
            wait=lambda position, work_ahead: self._wait(record.job, position, work_ahead))

    def _record_event(self, record: Record, base_url: str) -> bytes:
        if record.status == "queued":
            return streaming.sse("queued", {"id": record.id, "position": None,
                                            "eta_seconds": None})
        if record.status == "running":
            return streaming.sse("progress", {"id": record.id, "step": 0,
                                              "steps": record.job.get("steps")})
        if record.status == "succeeded":
            return streaming.sse("completed", self._record_result(record, base_url)
                                 | {"id": record.id})
        if record.status == "cancelled":
            return streaming.sse("cancelled", {"id": record.id})
        return streaming.sse("failed", {"id": record.id,
                                        "error": self._error(record.model, error_of(record))})

    # ---------------------------------------------------------------- helpers

    def _result(self, record: Record, live: LiveJob | None, base_url: str
                ) -> dict[str, Any]:
        """A finished job's ImagesResponse: by URL where its images are stored, else the
        bytes this frontend still holds."""
        answer = live.tracked.pending.result if live is not None else None
        if answer is not None and not all(image.get("name") for image in record.images):
            assert live is not None
            return self.service.images_response(live.prepared, answer, live.tracked,
                                                base_url, response_format="b64_json")
        return self._record_result(record, base_url)

    def _record_result(self, record: Record, base_url: str) -> dict[str, Any]:
        stored = all(image.get("name") for image in record.images)
        return self.service.record_response(record, "url" if stored else "b64_json",
                                            base_url, missing_ok=True)

    def _wait(self, job: dict[str, Any], position: int | None, work_ahead: float | None
              ) -> float | None:
        """Seconds ``job`` (its wire form) at ``position`` should wait to start, with
        ``work_ahead`` megapixel-steps before it (the broker's; None: unknown)."""
        steps, width, height = job.get("steps"), job.get("width"), job.get("height")
        if not (isinstance(steps, int) and isinstance(width, int) and isinstance(height, int)):
            return None
        megapixels = len(job.get("seeds") or ()) * width * height / 1e6
        return estimate_wait(self.service.broker.status(), job.get("model", ""), position,
                             steps=steps, megapixels=megapixels, work_ahead=work_ahead)

    def _error(self, model: str, error: JobError) -> dict[str, Any]:
        """OpenAI's error body for a job's failure."""
        return self.service.failure(error, model).error_object()

    def _add(self, prepared: Prepared, tracked: Tracked) -> LiveJob:
        # Followed for minutes after it ends: without an edit's frames, which its pending
        # job holds while it may be sent again.
        live = LiveJob(dataclasses.replace(prepared, inputs=()), tracked)
        with self._lock:
            self._forget_old()
            self._live[live.id] = live
        return live

    def _live_job(self, job_id: str) -> LiveJob | None:
        with self._lock:
            return self._live.get(job_id)

    def _visible(self, job_id: str, identity: Identity) -> Record:
        """The job's record, if ``identity`` may see it; else the same 404 as for no job."""
        record = self.history.records.get(job_id) if _PRINTABLE_ID.fullmatch(job_id) \
            else None
        if record is None or not (identity.sees_all or record.owner == identity.key):
            shown = f"job {job_id}" if _PRINTABLE_ID.fullmatch(job_id) else "such job"
            raise APIError(404, f"no {shown} here", param="id", code="job_not_found")
        return record

    def _describe(self, record: Record, live: LiveJob | None, base_url: str, *,
                  result: bool = False) -> dict[str, Any]:
        job = record.job
        status = record.status
        position, step, wait = None, 0, None
        if live is not None and status in ACTIVE:
            pending = live.tracked.pending
            position, step = pending.position, pending.step
            status = "running" if step else status
            if status == "queued":
                wait = self._wait(job, position, pending.work_ahead)
        description: dict[str, Any] = {
            "id": record.id, "object": "image.job", "status": status,
            "created": int(record.created),
            "finished": int(record.finished) if record.finished else None,
            "model": record.model, "prompt": record.prompt,
            "negative_prompt": job.get("negative_prompt"), "width": job.get("width"),
            "height": job.get("height"), "steps": job.get("steps"),
            "guidance": job.get("guidance"), "n": len(job.get("seeds") or ()),
            "seeds": list(job.get("seeds") or ()),
            "output_format": job.get("output_format"), "owner": record.owner,
            "request": record.request, "position": position, "eta_seconds": wait,
            "step": step,
            "images": [self._image(image, base_url) for image in record.images],
        }
        if record.status == "succeeded" and result:
            description["result"] = self._result(record, live, base_url)
        elif record.status == "failed":
            description["error"] = self._error(record.model, error_of(record))
        return description

    def _image(self, image: dict[str, Any], base_url: str) -> dict[str, Any]:
        name = image.get("name")
        return {"url": self.history.url(name, base_url) if name else None,
                "seed": image.get("seed"), "width": image.get("width"),
                "height": image.get("height")}

    def _forget_old(self) -> None:
        """Stop following finished jobs past their time to live (their records stay), and
        the oldest past the bound."""
        now = time.monotonic()
        for live in list(self._live.values()):
            if live.done and live.finished_at is None:
                live.finished_at = now
            if live.finished_at is not None and now - live.finished_at > self.ttl:
                del self._live[live.id]
            elif live.finished_at is not None and now - live.finished_at > COMPACT_AFTER:
                live.tracked.pending.compact()
        excess = len(self._live) - self.max_jobs + 1
        if excess > 0:
            finished = [j for j in self._live.values() if j.done]
            for live in sorted(finished, key=lambda j: j.tracked.pending.submitted_at
                               )[:excess]:
                del self._live[live.id]
