"""Thin Falcon resources: read the request, call the service, write the answer.

Each resource answers GET and HEAD where it can be read, and only the methods it defines:
Falcon answers every other method with a 405 listing them in ``Allow`` (errors.py gives it
OpenAI's shape), and ``MethodCheck`` does the same for methods Falcon does not know.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon
import falcon.constants
import falcon.routing

from http_frontend.auth import check_metrics_token, identity_of
from http_frontend.cluster_view import ClusterView
from http_frontend.edit_requests import read_edit
from http_frontend.errors import APIError, invalid
from http_frontend.history import Caller, History
from http_frontend.image_fetch import ImageFetcher
from http_frontend.image_store import CONTENT_TYPES, valid_name
from http_frontend.jobs_api import JobsAPI, ListQuery
from http_frontend.metrics import CONTENT_TYPE, Metrics
from http_frontend.service import ImageService, Prepared

MAX_IDEMPOTENCY_KEY = 255


def read_json(req: falcon.Request, max_body: int) -> Any:
    """The request body as JSON, bounded, with a clear error for each way it can be wrong."""
    if req.content_length is not None and req.content_length > max_body:
        raise _too_large(max_body)
    media_type = (req.content_type or "").split(";")[0].strip().lower()
    if media_type not in ("application/json", ""):
        raise APIError(415, f"send the body as application/json, not {media_type}",
                       code="unsupported_media_type")
    raw = _read_body(req, max_body)
    if len(raw) > max_body:
        raise _too_large(max_body)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise invalid(None, "the request body is not valid UTF-8", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise invalid(None, f"the request body is not valid JSON: {exc.msg} at line "
                            f"{exc.lineno} column {exc.colno}", "invalid_json") from None
    except (ValueError, RecursionError):  # a 5000-digit number, nesting thousands deep
        raise invalid(None, "the request body is JSON this server does not take: a number "
                            "too long or nesting too deep", "invalid_json") from None


def _too_large(max_body: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_body} bytes",
                    code="request_too_large")


def _reject_constant(name: str) -> Any:
    raise invalid(None, f"the request body is not valid JSON: {name} is not a JSON value",
                  "invalid_json")


def _read_body(req: falcon.Request, max_body: int) -> bytes:
    """Up to ``max_body + 1`` bytes of the body, so a larger one is noticed without reading it."""
    if req.content_length is not None:
        stream: Any = req.bounded_stream
    elif req.env.get("wsgi.input_terminated"):
        stream = req.stream  # a de-chunked upload without Content-Length: read to EOF
    else:
        return b""  # PEP 3333: no Content-Length and no EOF-terminated input means no body
    chunks: list[bytes] = []
    size = 0
    while size <= max_body:
        chunk = stream.read(min(1 << 16, max_body + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def client_gone(req: falcon.Request) -> Callable[[], bool] | None:
    """waitress says whether the client hung up (it needs channel_request_lookahead > 0)."""
    return req.env.get("waitress.client_disconnected")


def caller(req: falcon.Request, body: Any, history: History) -> Caller:
    """Who sent ``req``: the owner its job is recorded under, where its image URLs start,
    and its Idempotency-Key."""
    user = body.get("user") if isinstance(body, dict) else None
    identity = identity_of(req)
    owner = identity.owner(user if isinstance(user, str) else None)
    return Caller(owner, base_url(req, history), idempotency_key(req), identity.share)


def base_url(req: falcon.Request, history: History) -> str:
    """Where image URLs start: --public-url, else this request's own scheme and host."""
    return history.public_url or req.prefix


def idempotency_key(req: falcon.Request) -> str | None:
    key = req.get_header("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or \
            not key.isprintable():
        raise invalid("Idempotency-Key", f"an Idempotency-Key is 1 to {MAX_IDEMPOTENCY_KEY} "
                                         f"printable ASCII characters")
    return key


def stream_events(resp: falcon.Response, events: Iterator[bytes]) -> None:
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once
    resp.stream = events


class ImageGenerations:
    def __init__(self, service: ImageService, *, max_body: int) -> None:
        self.service = service
        self.max_body = max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self.max_body)
        who = caller(req, body, self.service.history)
        prepared = self.service.prepare(body, user=who.owner, share=who.share)
        req.context.generation_model = prepared.job.model  # for dc_request_duration_seconds
        if prepared.stream:
            stream_events(resp, self.service.stream_openai(prepared, who, client_gone(req)))
        else:
            resp.media = self.service.generate(prepared, who, client_gone(req))


class ImageEdits:
    """POST /v1/images/edits: OpenAI's image edit, as multipart/form-data or JSON."""

    def __init__(self, service: ImageService, *, max_body: int,
                 fetcher: ImageFetcher | None) -> None:
        self.service = service
        self.max_body = max_body
        self.fetcher = fetcher

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        who, prepared = read_and_prepare_edit(req, self.service, self.max_body, self.fetcher)
        req.context.generation_model = prepared.job.model  # for dc_request_duration_seconds
        if prepared.stream:
            stream_events(resp, self.service.stream_openai(prepared, who, client_gone(req)))
        else:
            resp.media = self.service.generate(prepared, who, client_gone(req))


class EditJobs:
    """POST /v1/jobs/edits: an edit (the form of /v1/images/edits) as a job, answered 202 at
    once and followed with GET /v1/jobs/{id} and its events, as POST /v1/jobs is."""

    def __init__(self, jobs: JobsAPI, *, max_body: int, fetcher: ImageFetcher | None) -> None:
        self.jobs = jobs
        self.max_body = max_body
        self.fetcher = fetcher

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        who, prepared = read_and_prepare_edit(req, self.jobs.service, self.max_body,
                                              self.fetcher)
        status, resp.media = self.jobs.submit_prepared(prepared, who)
        resp.status = falcon.code_to_http_status(status)


def read_and_prepare_edit(req: falcon.Request, service: ImageService, max_body: int,
                          fetcher: ImageFetcher | None
                          ) -> tuple[Caller, Prepared]:
    """An edit read (its URLs fetched), decoded and checked. That can take seconds, so it
    holds one of the waiting slots, never the threads kept for health checks, and a server
    that is stopping refuses it before doing any of it."""
    service.refuse_if_draining()
    release = service.take_waiting_slot()
    try:
        upload = read_edit(req, max_body=max_body, fetcher=fetcher)
        who = caller(req, upload.fields, service.history)
        return who, service.prepare_edit(upload, user=who.owner, share=who.share)
    finally:
        release()


class Jobs:
    def __init__(self, jobs: JobsAPI, *, max_body: int) -> None:
        self.jobs = jobs
        self.max_body = max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self.max_body)
        status, resp.media = self.jobs.submit(body, caller(req, body, self.jobs.history))
        resp.status = falcon.code_to_http_status(status)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        query = ListQuery.parse(req.params)
        resp.media = self.jobs.listing(identity_of(req), query,
                                    base_url(req, self.jobs.history))

    on_head = on_get


class Job:
    def __init__(self, jobs: JobsAPI) -> None:
        self.jobs = jobs

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = self.jobs.status(job_id, identity_of(req),
                                      base_url(req, self.jobs.history))

    on_head = on_get

    def on_delete(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = self.jobs.delete(job_id, identity_of(req),
                                      base_url(req, self.jobs.history))


class JobCancel:
    """POST /v1/jobs/{id}/cancel: cancel a running job; a finished one stays as it is."""

    def __init__(self, jobs: JobsAPI) -> None:
        self.jobs = jobs

    def on_post(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = self.jobs.cancel(job_id, identity_of(req),
                                      base_url(req, self.jobs.history))


class JobEvents:
    def __init__(self, jobs: JobsAPI) -> None:
        self.jobs = jobs

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        stream_events(resp, self.jobs.events(job_id, identity_of(req), client_gone(req),
                                             base_url(req, self.jobs.history)))

    def on_head(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        """The stream's headers, without opening it (no stream slot is taken)."""
        self.jobs.check(job_id, identity_of(req))
        stream_events(resp, iter(()))


class ImageFiles:
    """GET /v1/images/files/{name}: a stored image, cacheable for as long as it is kept
    (its name never names other bytes); no API key needed (auth.OPEN_PREFIXES)."""

    def __init__(self, history: History, *, max_age: float | None) -> None:
        self.history = history
        self.max_age = max_age

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        self._answer(req, resp, name, body=True)

    def on_head(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        self._answer(req, resp, name, body=False)

    def _answer(self, req: falcon.Request, resp: falcon.Response, name: str, *,
                body: bool) -> None:
        store = self.history.store
        image = store.get(name) if store is not None and valid_name(name) else None
        if image is not None and self.max_age and time.time() - image.modified > self.max_age:
            image = None  # expired: the sweeper deletes it on its next round
        if image is None:
            raise APIError(404, "no such image: it expired, was deleted, or never was",
                           code="image_not_found")
        etag = f'"{name.split(".")[0]}"'
        resp.set_header("ETag", etag)
        resp.set_header("Cache-Control", self._cache_control(image.modified))
        if _matches(req.get_header("If-None-Match"), etag):
            resp.status = falcon.HTTP_304
            return
        resp.content_type = CONTENT_TYPES[name.rsplit(".", 1)[1]]
        resp.content_length = len(image.data)
        if body:
            resp.data = image.data

    def _cache_control(self, modified: float) -> str:
        """Cacheable for the rest of the image's life (a year when kept forever): a cache
        never outlives the expiry. A DELETE cannot reach caches: they may keep a deleted
        image until then."""
        left = 31536000 if not self.max_age else \
            max(0, int(self.max_age - (time.time() - modified)))
        return f"public, max-age={left}, immutable"


class Models:
    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.view.list_models()

    on_head = on_get


class Model:
    """GET /v1/models/{id}: OpenAI's Model, for a served model or a name that means one."""

    def __init__(self, view: ClusterView, service: ImageService) -> None:
        self.view = view
        self.service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        if len(model_id) > 256:
            raise APIError(404, "no such model", param="model", code="model_not_found")
        resp.media = self.view.get_model(model_id, self.service.model_name(model_id))

    on_head = on_get


class Loras:
    """GET /v1/loras: the LoRA adapters the workers can apply, and to which models."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.view.adapters()

    on_head = on_get


class Cluster:
    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.view.cluster(identity_of(req))

    on_head = on_get


class MetricsPage:
    """GET /metrics: Prometheus's text format; behind ``token`` when one is set."""

    def __init__(self, metrics: Metrics, *, token: str | None) -> None:
        self.metrics = metrics
        self.token = token

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        check_metrics_token(req, self.token)
        resp.content_type = CONTENT_TYPE
        resp.data = self.metrics.render()

    on_head = on_get


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}

    on_head = on_get  # load balancers probe with either


class Ready:
    def __init__(self, view: ClusterView, service: ImageService) -> None:
        self.view = view
        self.service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, detail = self.view.readiness(draining=self.service.draining)
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = detail

    on_head = on_get


class Index:
    def __init__(self, static_dir: Path) -> None:
        self.index = static_dir / "index.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self.index.read_bytes()

    on_head = on_get


class StaticFiles:
    """The web UI's files, for GET and HEAD only (Falcon's own static route takes any
    method)."""

    PREFIX = "/static"

    def __init__(self, static_dir: Path) -> None:
        self._files = falcon.routing.StaticRoute(self.PREFIX, str(static_dir))

    def on_get(self, req: falcon.Request, resp: falcon.Response, path: str) -> None:
        self._files(req, resp)

    def on_head(self, req: falcon.Request, resp: falcon.Response, path: str) -> None:
        self._files(req, resp)  # sets Content-Type and Content-Length; the file stays unread
        close = getattr(resp.stream, "close", None)
        if close is not None:
            close()
        resp.stream = None


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether If-None-Match names ``etag``: a weak comparison (RFC 9110 13.1.2), so a proxy
    that weakened the tag (W/"…") still gets a 304; ``*`` matches any image that exists."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


class MethodCheck:
    """Falcon middleware: a method Falcon does not know is a 405 on a route that exists (Falcon
    itself answers 400 "Invalid HTTP method")."""

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        if resource is None or req.method in falcon.constants.COMBINED_METHODS:
            return
        allowed = [m for m in falcon.constants.COMBINED_METHODS
                   if hasattr(resource, f"on_{m.lower()}")]
        raise falcon.HTTPMethodNotAllowed(sorted({*allowed, "OPTIONS"}))
