"""The image service: turn a validated request into a job, follow it, shape the answer.

Knows nothing of Falcon; raises APIError for everything that goes wrong. A request is
``prepare``d (validated against its model, turned into a JobSpec), then either run to its end
(``generate``) or submitted (``submit_until_taken``) and followed as it happens (``follow``,
which the streaming endpoints turn into server-sent events). A job's failure is a JobError
value until ``failure`` turns it into the APIError the client gets.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from broker import logs
from broker.protocol import MAX_ID, ErrorCode, JobSpec, Message
from gpu_worker.models import ModelSpec
from http_frontend import edit_jobs, loras, model_resolver, request_ids, schema, streaming
from http_frontend import history as history_module
from http_frontend.auth import DEFAULT_SHARE, Share
from http_frontend.broker_client import EXPIRY_SLACK, BrokerClient
from http_frontend.database import open_database
from http_frontend.edit_requests import EditUpload
from http_frontend.errors import (
    BROKER_UNREACHABLE,
    SHUTTING_DOWN,
    APIError,
    JobError,
    invalid,
    job_failure,
)
from http_frontend.history import Caller, History, Tracked, error_of
from http_frontend.job_log import log_job
from http_frontend.pending import Event, PendingJob
from http_frontend.records import TERMINAL, JobRecords, Record

log = logging.getLogger(__name__)

# Past a job's deadline, the broker client answers it itself (EXPIRY_SLACK); this backstop
# comes a moment later, for a waiter that somehow missed that answer.
DEADLINE_SLACK = EXPIRY_SLACK + 1.0
CLIENT_CHECK_INTERVAL = 0.25  # how often a waiting request checks that its client is there
FIRST_ANSWER_WAIT = 5.0  # seconds a streaming request waits for the broker to take its job
SETTLE_WAIT = 30.0  # seconds an answer waits for its images to be stored (then: b64 only)
REPLAY_POLL = 0.25  # seconds between looks at the job a repeated Idempotency-Key names

ClientGone = Callable[[], bool]
JobWatcher = Callable[[JobSpec, PendingJob], None]


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    default_model: str | None = None  # None: the one model the workers serve, if only one
    # Names that mean another model (--model-alias NAME=MODEL); OpenAI's own model names
    # not listed here mean the default model.
    model_aliases: tuple[tuple[str, str], ...] = ()
    # Seconds a request may take, queue included: the default, and the most one may ask for.
    default_timeout: float = 300.0
    retry_after: int = 5  # seconds, sent with 429 and 503
    # Requests that may hold a waitress thread waiting for a job (generations, streams, job
    # submissions), all together; the server's other threads stay free for health checks.
    max_waiting: int = 28
    max_streams: int = 16  # event streams open at once; each holds a waitress thread
    keepalive: float = 10.0  # seconds between keep-alive comments on an idle stream
    # The answer for a request that sends no `response_format` (some clients never do, and
    # read `url`).
    default_response_format: str = "b64_json"
    # Edits whose images are decoded at once: a 50-megapixel upload takes 200 MB while it
    # is, so a burst of them must queue rather than all decode together.
    max_decodes: int = 2
    decode_wait: float = 30.0  # seconds an edit waits for its turn to decode (then 429)


@dataclass(frozen=True)
class Prepared:
    """A validated request (``body`` as the client sent it) and the job it becomes."""

    fitted: schema.FittedRequest
    job: JobSpec
    body: dict[str, Any]
    inputs: tuple[bytes, ...] = ()  # an edit's frames: its images, then its mask

    @property
    def stream(self) -> bool:
        return self.fitted.request.stream

    @property
    def response_format(self) -> str:
        return self.fitted.request.response_format or "b64_json"

    @classmethod
    def restore(cls, body: dict[str, Any], job: JobSpec) -> Prepared:
        """A recorded job as it was prepared (after a restart): the request is parsed again,
        and the job keeps what it was resolved to then."""
        request = schema.parse_request(body)
        fitted = schema.FittedRequest(request, job.width, job.height, job.steps, job.guidance)
        return cls(fitted, job, body)


def tenant_for(user: str | None) -> str | None:
    """The identity a job is queued for in the broker's fair sharing: ``user`` (an API key's
    name, or the request's own ``user`` without keys: client-chosen, so best effort), a
    digest of it when it is longer than the protocol takes; None: the anonymous one."""
    if not user:
        return None
    if len(user) <= MAX_ID:
        return user
    return "user-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:40]


class ImageService:
    def __init__(self, broker: BrokerClient, config: ServiceConfig, *,
                 history: History | None = None) -> None:
        self.broker = broker
        self.config = config
        self.history = history or in_memory_history(getattr(broker, "owner", "frontend"))
        self._lock = threading.Lock()
        self._in_flight = 0
        self._drain_deadline: float | None = None  # set once, when the server begins to stop
        self._streams = threading.BoundedSemaphore(config.max_streams)
        self._open_streams = 0
        self._job_watchers: list[JobWatcher] = []
        self._waiting = threading.BoundedSemaphore(config.max_waiting)
        self._decodes = threading.BoundedSemaphore(config.max_decodes)

    def watch_jobs(self, watcher: JobWatcher) -> None:
        """Call ``watcher(job, pending)`` for every job sent from now on (metrics); it must
        not block or raise."""
        self._job_watchers.append(watcher)

    # ---------------------------------------------------------------- draining

    def begin_drain(self, seconds: float) -> None:
        """Take no new work; requests still waiting after ``seconds`` get a retryable 503."""
        with self._lock:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + seconds

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def open_streams(self) -> int:
        with self._lock:
            return self._open_streams

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def refuse_if_draining(self) -> None:
        """Raise the retryable 503 for new work once the server began to stop."""
        if self.draining:
            raise self._error(SHUTTING_DOWN)

    def _enter_flight(self) -> None:
        """Count a request as in flight, so a drain waits for it; refuse one while draining."""
        with self._lock:
            self.refuse_if_draining()
            self._in_flight += 1

    def _leave_flight(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def take_waiting_slot(self) -> Callable[[], None]:
        """Take one of the bounded slots for requests that wait for a job, or refuse at once
        with a 429; returns the function that gives it back."""
        if not self._waiting.acquire(blocking=False):
            raise APIError(429, f"this server already has {self.config.max_waiting} requests "
                                f"waiting for images; try again shortly",
                           type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": str(self.config.retry_after)})
        return self._waiting.release

    # ---------------------------------------------------------------- preparing

    def prepare(self, body: Any, *, user: str | None = None,
                share: Share = DEFAULT_SHARE) -> Prepared:
        """Validate ``body`` against its model and build the job; nothing is sent yet.
        ``user``: who sends it (``Caller.owner``: the API key's name when keys are on), the
        job's user in every program's logs and its identity in the broker's fair sharing;
        else the body's own ``user`` field. ``share``: that identity's (its key's)."""
        request = self._request(body)
        spec = model_resolver.spec_for(self.broker.status(), self.model_name(request.model))
        loras.check_available(self.broker.status(), spec.name, request.loras)
        fitted = schema.fit_to_model(request, spec)
        return Prepared(fitted, self._job(fitted, spec, user, share), body)

    def prepare_edit(self, upload: EditUpload, *, user: str | None = None,
                     share: Share = DEFAULT_SHARE) -> Prepared:
        """Validate an edit (``edit_requests.read_edit``'s upload): its fields as for a
        generation, its images decoded and checked, its size the first image's fitted to
        the model unless ``size`` says otherwise; the frames it travels with made."""
        request = self._request(upload.fields)
        spec = model_resolver.spec_for(self.broker.status(), self.model_name(request.model))
        loras.check_available(self.broker.status(), spec.name, request.loras)
        if not self._decodes.acquire(timeout=self.config.decode_wait):
            raise APIError(429, "this server is decoding as many uploads as it takes at "
                                "once; try again shortly", type="rate_limit_error",
                           code="too_many_requests",
                           headers={"Retry-After": str(self.config.retry_after)})
        try:
            edit = edit_jobs.EditPlan.make(request, spec, upload)
            fitted = schema.fit_to_model(edit.request, spec)
            fitted = dataclasses.replace(fitted, warnings=fitted.warnings + edit.warnings)
            edit.check_steps(fitted.steps, spec)
            frames = edit.frames(fitted.width, fitted.height)
        finally:
            self._decodes.release()
        job = dataclasses.replace(self._job(fitted, spec, user, share), inputs=len(edit.images),
                                  mask=edit.mask is not None, strength=edit.strength)
        return Prepared(fitted, job, upload.recorded(), inputs=frames)

    def _request(self, body: Any) -> schema.ImageRequest:
        """``body`` parsed, with this server's defaults and limits applied."""
        request = schema.parse_request(body)
        if request.response_format is None:
            request = dataclasses.replace(
                request, response_format=self._default_format(request.model))
        if request.response_format == "url" and self.history.store is None:
            raise invalid("response_format", "this server keeps no images (it was started "
                                             "with --no-image-store), so it cannot answer "
                                             "with URLs; use 'b64_json'", "unsupported_value")
        limit = self.config.default_timeout
        if request.timeout is not None and request.timeout > limit:
            raise invalid("timeout", f"'timeout' may be at most {limit:g} seconds on this "
                                     f"server; got {request.timeout:g}")
        return request

    def _default_format(self, requested_model: str | None) -> str:
        """The answer for a request without ``response_format``: url for a DALL·E model name
        when images are stored (as OpenAI's DALL·E answers), else the operator's default."""
        if requested_model in model_resolver.DALL_E_NAMES and self.history.store is not None:
            return "url"
        return self.config.default_response_format

    def model_name(self, requested: str | None) -> str:
        """The model a request names (through --model-alias; OpenAI's names mean the
        default); else the configured default; else the only one served."""
        if requested:
            requested = dict(self.config.model_aliases).get(requested, requested)
        if requested and not model_resolver.is_openai_name(requested):
            return model_resolver.canonical_name(requested)
        if self.config.default_model:
            return model_resolver.canonical_name(self.config.default_model)
        status = self.broker.status()
        if status is None:
            raise self._error(BROKER_UNREACHABLE)
        served = model_resolver.announced_models(status)
        if len(served) == 1:
            return served[0]
        if not served:
            raise APIError(503, "no worker serves any model yet; try again shortly",
                           type="server_error", param="model",
                           code=ErrorCode.NO_WORKER.value,
                           headers={"Retry-After": str(self.config.retry_after)})
        shown = ", ".join(served[:20]) + (", ..." if len(served) > 20 else "")
        raise invalid("model", f"this server has no default model and serves several: "
                               f"{shown}; name one in 'model'", "missing_required_parameter")

    def _job(self, fitted: schema.FittedRequest, spec: ModelSpec,
             user: str | None, share: Share) -> JobSpec:
        req = fitted.request
        first_seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        timeout = req.timeout or self.config.default_timeout
        user = user if user is not None else req.user
        return JobSpec(
            id=uuid.uuid4().hex, model=spec.name, prompt=req.prompt,
            width=fitted.width, height=fitted.height, steps=fitted.steps,
            seeds=tuple(first_seed + i for i in range(req.n)),
            negative_prompt=req.negative_prompt if spec.negative_prompt else None,
            guidance=fitted.guidance, output_format=req.output_format,
            output_compression=req.output_compression, timeout=timeout,
            user=user, previews=req.partial_images, loras=req.loras,
            tenant=tenant_for(user), weight=share.weight, priority=share.priority,
            quota=share.quota, step_cache=req.step_cache,
        )

    # ---------------------------------------------------------------- running

    def generate(self, prepared: Prepared, caller: Caller,
                 client_gone: ClientGone | None = None) -> dict[str, Any]:
        """Run the job and answer with an ImagesResponse; ``client_gone`` cancels it.

        A repeated Idempotency-Key answers with the first request's job, waiting for it
        while it runs."""
        release = self.take_waiting_slot()
        try:
            self._enter_flight()
            try:
                record = self.open_record(prepared, caller, kind="generation")
                if record.id != prepared.job.id:
                    return self._replay(record, prepared, caller, client_gone)
                tracked = self.submit(prepared)
                # A client that sent an Idempotency-Key and left will retry (the SDKs do on
                # a timeout): its job runs on, and the retry gets its answer.
                retried = caller.idempotency_key is not None
                try:
                    for _ in self.follow(tracked.pending, prepared.job, client_gone,
                                         cancel_on_leave=not retried):
                        pass
                except APIError as exc:  # the client left, the deadline passed, ...
                    self._left_early(tracked, exc, retried)
                    raise
                finally:
                    if not retried:
                        self.end_here(tracked, JobError(
                            ErrorCode.CANCELLED, "the request ended before its job did"))
            finally:
                self._leave_flight()
        finally:
            release()
        pending = tracked.pending
        tracked.settled.wait(SETTLE_WAIT)  # recorded before answered: a retry finds it
        if pending.error is not None:
            raise self.failure(pending.error, prepared.job.model)
        assert pending.result is not None  # follow() ends with the outcome or raises
        return self.images_response(prepared, pending.result, tracked, caller.base_url)

    def open_record(self, prepared: Prepared, caller: Caller, *, kind: str) -> Record:
        """Record the job before it is sent (or find the job a reused Idempotency-Key
        names: a key used for another request is a 409)."""
        record = self.history.open(prepared.job, prepared.body, kind=kind, caller=caller,
                                   submitter=self.broker.owner, inputs=prepared.inputs)
        # (With --no-history a finished job's digest is scrubbed: nothing left to compare.)
        if record.id != prepared.job.id and record.request_hash is not None and \
                record.request_hash != history_module.request_hash(prepared.body):
            raise APIError(409, "this Idempotency-Key was used for a different request; "
                                "use a new key for a new request",
                           param="Idempotency-Key", code="idempotency_key_reused")
        return record

    def submit(self, prepared: Prepared) -> Tracked:
        """Send a recorded job; its record is settled when it ends, however it ends."""
        return self.track(prepared.job, self.broker.submit(prepared.job,
                                                           inputs=prepared.inputs))

    def track(self, job: JobSpec, pending: PendingJob) -> Tracked:
        """Follow a job just sent: it is logged, its watchers see it, its record is settled
        when it ends."""
        log_job(job, pending)
        for watcher in self._job_watchers:
            watcher(job, pending)
        return self.history.track(job, pending)

    def _left_early(self, tracked: Tracked, exc: APIError, retried: bool) -> None:
        """A generation's request ended before its job: how the record ends.

        - The server stops: the job is cancelled and the record goes (a retry elsewhere
          runs it; follow() told the broker only when no retry was announced).
        - A client that will retry (it sent an Idempotency-Key) hung up: the job runs on,
          and the retry gets it.
        - Otherwise the record ends with what the client was told.
        """
        if exc.code == ErrorCode.SHUTTING_DOWN:
            if retried:
                self.broker.cancel(tracked.job.id)
            self.end_here(tracked, SHUTTING_DOWN)
        elif not (retried and exc.status == 499):
            self.end_here(tracked, JobError(exc.code or ErrorCode.CANCELLED, exc.message))

    def end_here(self, tracked: Tracked, error: JobError) -> None:
        """End a job this frontend stops following (its client left, its deadline passed):
        the broker was told already; this ends the record too."""
        if not tracked.pending.done:
            tracked.pending.fail(error)

    def submit_until_taken(self, prepared: Prepared) -> Tracked:
        """Submit, and wait (briefly) for the broker to take the job, so that its refusals
        (unknown model, full queue, no worker) are plain errors; for streams and the jobs
        API, which follow the job afterwards."""
        tracked = self.submit(prepared)
        tracked.pending.wait_taken(FIRST_ANSWER_WAIT)
        if tracked.pending.error is not None:
            tracked.settled.wait(SETTLE_WAIT)  # recorded before answered: a retry finds it
            raise self.failure(tracked.pending.error, prepared.job.model)
        return tracked

    def _replay(self, record: Record, prepared: Prepared, caller: Caller,
                client_gone: ClientGone | None) -> dict[str, Any]:
        """The answer of the job ``record`` names: waits for it to end (it may run on
        another frontend), then answers as it did."""
        deadline = record.deadline + DEADLINE_SLACK
        while record.status not in TERMINAL:
            if time.time() >= deadline:
                raise self._error(JobError(ErrorCode.TIMEOUT, "the first request with this "
                                           "Idempotency-Key did not end in time"))
            if client_gone is not None and client_gone():
                raise APIError(499, "the client closed the connection", code="cancelled")
            time.sleep(REPLAY_POLL)
            found = self.history.records.get(record.id)
            if found is None:
                raise APIError(409, "the job this Idempotency-Key names was deleted; use a "
                                    "new key", param="Idempotency-Key",
                               code="idempotency_key_reused")
            record = found
        if record.status != "succeeded":
            raise self.failure(error_of(record), record.model)
        return self.record_response(record, prepared.response_format, caller.base_url)

    def open_stream(self) -> Callable[[], None]:
        """Take one of the bounded event-stream slots (each pins a waitress thread), a waiting
        slot, and count it in flight; returns the function that gives all back. Call before
        streaming, so a refusal is a plain 429 or 503."""
        if not self._streams.acquire(blocking=False):
            raise APIError(429, f"too many open event streams (the limit is "
                                f"{self.config.max_streams}); try again shortly",
                           type="rate_limit_error", code="too_many_streams",
                           headers={"Retry-After": str(self.config.retry_after)})
        try:
            release = self.take_waiting_slot()
        except APIError:
            self._streams.release()
            raise
        try:
            self._enter_flight()
        except APIError:
            release()
            self._streams.release()
            raise
        with self._lock:
            self._open_streams += 1

        def close() -> None:
            with self._lock:
                self._open_streams -= 1
            self._leave_flight()
            release()
            self._streams.release()
        return close

    def stream_openai(self, prepared: Prepared, caller: Caller,
                      client_gone: ClientGone | None) -> Iterator[bytes]:
        """OpenAI's image stream for ``prepared``: checks and submission happen now, the
        events as the caller iterates."""
        close = self.open_stream()
        try:
            record = self.open_record(prepared, caller, kind="generation")
            if record.id != prepared.job.id:
                raise APIError(409, "a streamed request cannot be repeated with the same "
                                    "Idempotency-Key; fetch the first job with GET "
                                    f"/v1/jobs/{record.id}", param="Idempotency-Key",
                               code="idempotency_key_reused")
            tracked = self.submit_until_taken(prepared)
        except BaseException:
            close()
            raise

        def closed() -> None:
            if not tracked.pending.done:
                self.broker.cancel(prepared.job.id)  # the client stopped reading
                self.end_here(tracked, JobError(ErrorCode.CANCELLED,
                                                "the client stopped reading the stream"))
            close()
        return streaming.ClosingStream(
            self._openai_events(prepared, tracked, caller, client_gone), closed)

    def _openai_events(self, prepared: Prepared, tracked: Tracked, caller: Caller,
                       client_gone: ClientGone | None) -> Iterator[bytes]:
        shapes = streaming.OpenAIStream(prepared.fitted, lambda: int(time.time()),
                                        kind="image_edit" if prepared.job.inputs
                                        else "image_generation")
        try:
            for event in self.follow(tracked.pending, prepared.job, client_gone,
                                     keepalive=self.config.keepalive):
                if event is None:
                    yield streaming.KEEPALIVE
                elif isinstance(event, JobError):
                    yield streaming.error_event(
                        self.failure(event, prepared.job.model).error_object())
                elif event is tracked.pending.result:
                    tracked.settled.wait(SETTLE_WAIT)  # so the events can carry URLs
                    yield from shapes.events(event, self._urls(tracked, caller.base_url))
                else:
                    yield from shapes.events(event)
        except APIError as exc:
            if exc.status != 499:  # nobody is left to tell when the client hung up
                yield streaming.error_event(exc.error_object())

    def follow(self, pending: PendingJob, job: JobSpec, client_gone: ClientGone | None,
               *, keepalive: float | None = None, cancel_on_leave: bool = True
               ) -> Iterator[Event | None]:
        """Every event of the job as it comes, ending with its outcome (RESULT or JobError).

        Yields None every ``keepalive`` seconds of silence. Raises when the client leaves,
        the deadline passes or the server stops; cancels the job then, unless
        ``cancel_on_leave`` is false (a watcher of a jobs-API job: the job is not its
        client's, and outlives it).
        """
        # The broker answers deadlines itself; this later one is the backstop for a broker
        # that went silent.
        deadline = time.monotonic() + job.timeout + DEADLINE_SLACK
        cursor = 0
        quiet_since = time.monotonic()
        while True:
            wait = min(deadline - time.monotonic(), CLIENT_CHECK_INTERVAL)
            events, cursor = pending.events_after(cursor, wait)
            for event in events:
                quiet_since = time.monotonic()
                yield event
                if event is pending.outcome:
                    return
            self._check_still_wanted(job, deadline, client_gone, cancel_on_leave)
            if keepalive is not None and time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield None

    def _check_still_wanted(self, job: JobSpec, deadline: float,
                            client_gone: ClientGone | None, cancel_on_leave: bool) -> None:
        now = time.monotonic()
        if now >= deadline:
            self.broker.cancel(job.id)
            if not self.broker.connected:
                raise self._error(JobError(
                    ErrorCode.BROKER_UNAVAILABLE,
                    "lost contact with the broker and it did not come back in time",
                    retryable=True))
            raise self._error(JobError(ErrorCode.TIMEOUT,
                                       f"no answer within the {job.timeout:.0f} s deadline"))
        drain_deadline = self._drain_deadline
        if drain_deadline is not None and now >= drain_deadline:
            if cancel_on_leave:
                self.broker.cancel(job.id)
            raise self._error(SHUTTING_DOWN)
        if client_gone is not None and client_gone():
            if cancel_on_leave:
                self.broker.cancel(job.id)
                log.info("job %s cancelled: the client went away", job.id,
                         extra=logs.job_fields(job, request_id=request_ids.current()))
            raise APIError(499, "the client closed the connection", code="cancelled")

    # ---------------------------------------------------------------- answers

    def failure(self, error: JobError, model: str, *, cancelled_here: bool = False
                ) -> APIError:
        """The APIError for a job on ``model`` that failed with ``error``: "no worker" for a
        model nobody knows is a 404; ``cancelled_here``: this frontend cancelled the job."""
        if error.code == ErrorCode.NO_WORKER and \
                not model_resolver.is_known(self.broker.status(), model):
            error = JobError(ErrorCode.MODEL_NOT_FOUND,
                             f"the model {model!r} does not exist or no worker serves it")
        return self._error(error, cancelled_here=cancelled_here)

    def _error(self, error: JobError, *, cancelled_here: bool = False) -> APIError:
        return job_failure(error, retry_after=self.config.retry_after,
                           cancelled_here=cancelled_here)

    def images_response(self, prepared: Prepared, answer: Message, tracked: Tracked | None,
                        base_url: str, *, response_format: str | None = None
                        ) -> dict[str, Any]:
        """The ImagesResponse for a RESULT, in the request's response format (or
        ``response_format``); URLs come from the settled record (``tracked``)."""
        response_format = response_format or prepared.response_format
        urls = self._urls(tracked, base_url) if tracked is not None else []
        images = []
        for index, (info, frame) in enumerate(zip(answer["images"], answer.payloads,
                                                  strict=True)):
            image: dict[str, Any] = {"seed": info.seed, "width": info.width,
                                     "height": info.height}
            url = urls[index] if index < len(urls) else None
            if response_format == "url" and url is not None:
                image["url"] = url
            else:  # b64_json, or no URL: the image store refused it (logged)
                image["b64_json"] = base64.b64encode(_bytes(frame)).decode("ascii")
            images.append(image)
        # The worker's notes (a prompt cut short) join the frontend's own.
        fitted = dataclasses.replace(prepared.fitted, warnings=prepared.fitted.warnings
                                     + tuple(answer.get("warnings") or ()))
        return schema.images_response(
            fitted, created=int(time.time()), model=prepared.job.model, images=images,
        ) | {"job_id": prepared.job.id, "worker_id": answer.get("worker_id"),
             "timings": answer.get("timings") or {}}

    def record_response(self, record: Record, response_format: str, base_url: str, *,
                        missing_ok: bool = False) -> dict[str, Any]:
        """The ImagesResponse of a finished record (its images read back from the store
        for b64_json); a 410 when they are gone, unless ``missing_ok``: then such an image
        has ``"url": null`` and no bytes."""
        job = record.job
        images = []
        for image in record.images:
            entry: dict[str, Any] = {"seed": image["seed"], "width": image["width"],
                                     "height": image["height"]}
            name = image.get("name")
            if response_format == "url" and name:
                entry["url"] = self.history.url(name, base_url)
            else:
                data = self.history.image_bytes(name)
                if data is not None:
                    entry["b64_json"] = base64.b64encode(data).decode("ascii")
                elif missing_ok:
                    entry["url"] = None
                else:
                    raise APIError(410, f"the images of job {record.id} are no longer kept",
                                   code="images_expired")
            images.append(entry)
        return {"created": int(record.finished or record.created), "data": images,
                "output_format": job.get("output_format", "png"), "model": record.model,
                "width": job.get("width"), "height": job.get("height"),
                "steps": job.get("steps"), "guidance": job.get("guidance"),
                "job_id": record.id, "worker_id": record.worker_id, "timings": record.timings}

    def _urls(self, tracked: Tracked | None, base_url: str) -> list[str | None]:
        if tracked is None:
            return []
        return [self.history.url(name, base_url) if name else None
                for name in tracked.image_names]


def in_memory_history(frontend: str) -> History:
    """Records in memory and no image store: for a service built without one (tests)."""
    return History(JobRecords(open_database(":memory:")), None, frontend=frontend)


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
