"""The durable side of every job: its record in the database, its images in the store.

A job is recorded (``open``) before it is sent to the broker, so a crash right after the
client was answered loses nothing. Its end is recorded once (``settle``) whoever ends it: the
broker's answer, this frontend's cancel, the deadline. Settling writes the images to the store
first, then ends the record with their names, on a small pool of threads of its own: the
broker client's I/O thread, which ends jobs, must never wait on a disk or a bucket. A request
that answers with URLs waits for its job's ``settled`` event.

The history is also the owner of image URLs: a record keeps only image names, and the URL
is made per answer from ``--public-url`` or the asking request's own scheme and host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from broker import logs
from broker.protocol import ErrorCode, JobSpec, Message
from http_frontend.auth import DEFAULT_SHARE, Share
from http_frontend.database import DatabaseError
from http_frontend.errors import JobError
from http_frontend.image_store import ImageStore, StoreError, new_name
from http_frontend.pending import PendingJob
from http_frontend.records import JobRecords, Record, input_names

log = logging.getLogger(__name__)

FILES_PATH = "/v1/images/files/"
SETTLE_THREADS = 4  # images written at once (each a disk write or an S3 PUT)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the history needs it."""

    owner: str | None  # the identity a new job is recorded under (API key name, else `user`)
    base_url: str  # scheme://host[:port] that image URLs start with
    idempotency_key: str | None = None
    share: Share = DEFAULT_SHARE  # its API key's weight, class and limits


@dataclass(eq=False)
class Tracked:
    """A job this frontend follows: its pending answer and, once settled, its record."""

    job: JobSpec
    pending: PendingJob
    settled: threading.Event = field(default_factory=threading.Event)
    record: Record | None = None  # the ended record, once settled
    stored: list[dict[str, Any]] | None = None  # the images written to the store, once
    # The client was told the job exists (202, or a job taken over): from then on its
    # record stays, whatever the job ends with.
    acknowledged: bool = False
    marked_running: bool = False  # its record says "running"

    @property
    def image_names(self) -> list[str | None]:
        """The stored names of the settled record's images (None: not stored)."""
        images = self.record.images if self.record is not None else []
        return [image.get("name") for image in images]


def request_hash(body: Any) -> str:
    """A digest of a request body, to tell a reused Idempotency-Key with another request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def record_error(error: JobError) -> dict[str, Any]:
    return {"code": str(error.code), "message": error.message, "retryable": error.retryable}


def error_of(record: Record) -> JobError:
    """The JobError a failed or cancelled record ended with."""
    error = record.error or {}
    default = ErrorCode.CANCELLED if record.status == "cancelled" else ErrorCode.WORKER_ERROR
    return JobError(error.get("code") or default, error.get("message") or "the job failed",
                    bool(error.get("retryable", False)))


class History:
    def __init__(self, records: JobRecords, store: ImageStore | None, *, frontend: str,
                 lease: float = 15.0, public_url: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self.store = store
        self.frontend = frontend  # this frontend's id: the lease holder it writes
        self.lease = lease
        self.public_url = public_url.rstrip("/") if public_url else None
        self._clock = clock
        self._settlers = ThreadPoolExecutor(SETTLE_THREADS, thread_name_prefix="settle")
        self._lock = threading.Lock()
        self._following: dict[str, Tracked] = {}  # unsettled jobs, by id
        self._unsettled: list[Tracked] = []  # ends the database did not take: tried again

    def close(self) -> None:
        self._settlers.shutdown(wait=True, cancel_futures=False)
        self.settle_again()  # a last try, so a stop loses no end the database can take

    def following(self) -> list[Tracked]:
        """The jobs this frontend follows that have not ended yet."""
        with self._lock:
            return list(self._following.values())

    # ---------------------------------------------------------------- writing

    def open(self, job: JobSpec, body: Any, *, kind: str, caller: Caller,
             submitter: str, inputs: Sequence[bytes] = ()) -> Record:
        """Record a job before it is sent; returns the record, which is another job's when
        ``caller``'s Idempotency-Key was used before (compare its id).

        An edit's ``inputs`` (its frames: the images, then the mask) are kept in the image
        store and named in the recorded request (``image[i].name``, ``mask.name``): what the
        history shows of the edit, and what another frontend sends again if it takes the
        job over."""
        now = self._clock()
        request = body if isinstance(body, dict) else None
        names = self._store_inputs(job, inputs) if request is not None else []
        if request is not None and names:
            request = with_input_names(request, names, job)
        record = Record(
            id=job.id, kind=kind, owner=caller.owner, model=job.model, prompt=job.prompt,
            request=request, job=job.to_wire(),
            deadline=now + job.timeout, submitter=submitter, frontend=self.frontend,
            lease_until=now + self.lease, created=now,
            idempotency_key=caller.idempotency_key,
            request_hash=request_hash(body) if caller.idempotency_key else None)
        try:
            created = self.records.create(record)
        except BaseException:  # no record names them: they would never be deleted
            self.delete_images([_named(names)])
            raise
        if created.id != job.id:  # a repeated Idempotency-Key: these inputs are not kept
            self.delete_images([_named(names)])
        return created

    def _store_inputs(self, job: JobSpec, inputs: Sequence[bytes]) -> list[str]:
        """Store an edit's frames; their names, or none when any cannot be stored (the
        job still runs: this frontend holds its inputs until it ends)."""
        if self.store is None or not inputs:
            return []
        names: list[str] = []
        try:
            for frame in inputs:
                name = new_name("png")
                self.store.put(name, frame)
                names.append(name)
        except StoreError as exc:
            log.error("job %s: the image store refused its input images: %s", job.id, exc,
                      extra=logs.job_fields(job))
            self.delete_images([_named(names)])
            return []
        return names

    def input_frames(self, record: Record) -> tuple[bytes, ...] | None:
        """An edit's frames read back from the store; None when any is gone or unnamed."""
        names = input_names(record.request)
        frames = [self.image_bytes(name) for name in names]
        if not names or any(frame is None for frame in frames):
            return None
        return tuple(frame for frame in frames if frame is not None)

    def track(self, job: JobSpec, pending: PendingJob) -> Tracked:
        """Follow ``pending`` to its end and settle the job's record then."""
        tracked = Tracked(job, pending)
        with self._lock:
            self._following[job.id] = tracked
        pending.when_done(lambda _: self._settle_later(tracked))
        return tracked

    def _settle_later(self, tracked: Tracked) -> None:
        try:
            self._settlers.submit(self._settle, tracked)
        except RuntimeError:  # shutting down: settle here rather than lose the end
            self._settle(tracked)

    def settle_again(self) -> None:
        """Record the ends the database refused before (the keeper calls this)."""
        with self._lock:
            again, self._unsettled = self._unsettled, []
        for tracked in again:
            self._settle(tracked)

    def _settle(self, tracked: Tracked) -> None:
        """Write the images, then end the record; never raises (a pool thread runs it). An
        end the database refuses is kept, and tried again by ``settle_again``."""
        try:
            self._end_record(tracked)
            tracked.record = self.records.get(tracked.job.id)
        except (DatabaseError, StoreError) as exc:  # storage away: it may come back
            log.error("job %s: could not record how it ended (%s); trying again later",
                      tracked.job.id, exc, extra=logs.job_fields(tracked.job))
            with self._lock:
                self._unsettled.append(tracked)
        except Exception:  # a bug or a value the database refuses: retrying cannot help
            log.exception("job %s: could not record how it ended", tracked.job.id,
                          extra=logs.job_fields(tracked.job))
        finally:
            with self._lock:
                self._following.pop(tracked.job.id, None)
            tracked.settled.set()

    def _end_record(self, tracked: Tracked) -> None:
        pending, job_id = tracked.pending, tracked.job.id
        if pending.result is not None:
            if tracked.stored is None:  # once, however often the record is tried
                tracked.stored = self._store_images(tracked.job, pending.result)
            ended = self.records.finish(job_id, "succeeded", images=tracked.stored,
                                        worker_id=pending.result.get("worker_id"),
                                        timings=pending.result.get("timings") or {})
            if not ended:
                self._drop_unrecorded(job_id, tracked.stored)
        elif pending.error is not None:
            if _refused(tracked):
                # No job ran, and a retry (with the same Idempotency-Key) must run, not
                # repeat the refusal: the record goes, and an edit's stored inputs with it.
                removed = self.records.delete(job_id)
                if removed is not None:
                    self.delete_images([_named(input_names(removed.request))])
            else:
                self.fail(job_id, pending.error)

    def _store_images(self, job: JobSpec, result: Message) -> list[dict[str, Any]]:
        images = []
        for info, frame in zip(result["images"], result.payloads, strict=True):
            image: dict[str, Any] = {"name": None, "seed": info.seed, "width": info.width,
                                     "height": info.height, "format": info.format}
            if self.store is not None:
                name = new_name(info.format)
                try:
                    self.store.put(name, _bytes(frame))
                    image["name"] = name
                except StoreError as exc:
                    log.error("job %s: the image store refused an image: %s", job.id, exc,
                              extra=logs.job_fields(job))
            images.append(image)
        return images

    def _drop_unrecorded(self, job_id: str, images: list[dict[str, Any]]) -> None:
        """The record had ended already (cancelled or deleted elsewhere, or an earlier try
        of this settle committed after all): delete the images it does not name."""
        record = self.records.get(job_id)
        kept = {image.get("name") for image in record.images} if record else set()
        self.delete_images([[image for image in images if image.get("name") not in kept]])

    def mark_running(self, job_id: str) -> None:
        self.records.mark_running(job_id)

    def fail(self, job_id: str, error: JobError) -> None:
        """End an unfinished record with ``error``: cancelled or failed."""
        status = "cancelled" if error.code == ErrorCode.CANCELLED else "failed"
        self.records.finish(job_id, status, error=record_error(error))

    def delete(self, record: Record) -> None:
        """Remove a finished job's record and its images, an edit's inputs included."""
        self.records.delete(record.id)
        self.delete_images([record.images, _named(input_names(record.request))])

    def delete_images(self, image_lists: list[list[dict[str, Any]]]) -> None:
        """Delete the stored images these lists name (records' ``images``)."""
        names = [image["name"] for images in image_lists for image in images
                 if image.get("name")]
        if names and self.store is not None:
            try:
                self.store.delete(names)
            except StoreError as exc:  # retention sweeps them later
                log.warning("could not delete %d image(s): %s", len(names), exc)

    # ---------------------------------------------------------------- reading

    def url(self, name: str, base_url: str) -> str:
        return f"{self.public_url or base_url.rstrip('/')}{FILES_PATH}{name}"

    def image_bytes(self, name: str | None) -> bytes | None:
        if name is None or self.store is None:
            return None
        try:
            stored = self.store.get(name)
        except StoreError as exc:
            log.warning("could not read image %s: %s", name, exc)
            return None
        return stored.data if stored is not None else None


def with_input_names(request: dict[str, Any], names: list[str], job: JobSpec
                     ) -> dict[str, Any]:
    """``request`` (an edit's recorded form: ``image`` a list, ``mask`` a map) with the store
    names of its frames: the images', then the mask's."""
    recorded = dict(request)
    images = recorded.get("image")
    if isinstance(images, list) and len(images) == job.inputs:
        recorded["image"] = [{**(item if isinstance(item, dict) else {}), "name": name}
                             for item, name in zip(images, names, strict=False)]
    if job.mask and isinstance(recorded.get("mask"), dict) and len(names) == job.frames:
        recorded["mask"] = {**recorded["mask"], "name": names[-1]}
    elif job.mask and len(names) == job.frames:  # the mask came from the image's alpha
        recorded["mask"] = {"name": names[-1], "from": "alpha"}
    return recorded


REFUSALS = (ErrorCode.QUEUE_FULL, ErrorCode.QUOTA_EXCEEDED, ErrorCode.NO_WORKER,
            ErrorCode.BROKER_UNAVAILABLE)


def _refused(tracked: Tracked) -> bool:
    """Whether the client was told "not now" for a job it was never told exists: refused
    (queue full, a quota, no worker, no broker) before its first step, or stopped by this server's
    shutdown. A retry may run it."""
    pending = tracked.pending
    error = pending.error
    if tracked.acknowledged or error is None:
        return False
    if error.code == ErrorCode.SHUTTING_DOWN:
        return True
    return error.retryable and error.code in REFUSALS and not pending.step


def _named(names: list[str]) -> list[dict[str, Any]]:
    """Store names as ``delete_images`` takes them."""
    return [{"name": name} for name in names]


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
