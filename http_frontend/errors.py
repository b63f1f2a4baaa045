"""Errors as values with codes, turned into OpenAI's error shape at one edge.

A job that fails, wherever it failed (the broker, a worker, this frontend), carries a
``JobError``; ``job_failure`` turns one into an ``APIError``. Code inside the frontend raises
``APIError`` (or lets Falcon raise its own HTTP errors); ``install_error_handlers`` makes every
failure, Falcon's 404/405/413 and unexpected exceptions included, answer
``{"error": {"message", "type", "param", "code"}}``. Tracebacks go to the log only.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import falcon

from broker.protocol import ErrorCode, Message, MsgType
from http_frontend.database import DatabaseError
from http_frontend.image_store import StoreError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# Status codes a retry can help with; every other error says x-should-retry: false, so the
# openai client does not resend a request that can only fail again.
_RETRYABLE_STATUS = {408, 429, 502, 503, 504}


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a code, what to tell the client, and whether a retry may help.

    ``code`` is an ``ErrorCode`` when this frontend made the error; from the broker it is
    whatever string came, since a newer broker may send codes this frontend does not know.
    """

    code: str
    message: str
    retryable: bool = False
    # Seconds until a retry can succeed, where the broker knows (an identity's rate limit);
    # None: the frontend's own hint (ServiceConfig.retry_after) goes in Retry-After.
    retry_after: float | None = None

    @classmethod
    def from_failed(cls, failed: Message) -> JobError:
        """The error a FAILED message from the broker carries."""
        if failed.type is not MsgType.FAILED:
            raise ValueError(f"not a FAILED message: {failed.type.value}")
        return cls(failed["code"], failed["message"], bool(failed.get("retryable", False)),
                   failed.get("retry_after"))


# Failures this frontend finds itself, before or without the broker.
SHUTTING_DOWN = JobError(ErrorCode.SHUTTING_DOWN, "the server is shutting down", retryable=True)
BROKER_UNREACHABLE = JobError(ErrorCode.BROKER_UNAVAILABLE, "the broker is not reachable",
                              retryable=True)


class APIError(Exception):
    """An error for the client: HTTP status plus OpenAI's type, param and code."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error_object()}

    def error_object(self) -> dict[str, Any]:
        """OpenAI's error object: what ``body`` holds under "error"."""
        return {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """A 400 naming the request field that is wrong."""
    return APIError(400, message, param=param, code=code)


# One table from job failure codes (broker.protocol.ErrorCode) to HTTP. "cancelled" is not in
# it: only a cancel this frontend asked for is a 499 (see job_failure).
_JOB_FAILURES: dict[str, tuple[int, str]] = {
    ErrorCode.MODEL_NOT_FOUND.value: (404, INVALID_REQUEST),
    ErrorCode.QUEUE_FULL.value: (429, "rate_limit_error"),
    ErrorCode.QUOTA_EXCEEDED.value: (429, "rate_limit_error"),  # its message names the limit
    ErrorCode.NO_WORKER.value: (503, SERVER_ERROR),
    ErrorCode.BROKER_UNAVAILABLE.value: (503, SERVER_ERROR),
    ErrorCode.SHUTTING_DOWN.value: (503, SERVER_ERROR),
    ErrorCode.TIMEOUT.value: (504, SERVER_ERROR),
    ErrorCode.WORKER_LOST.value: (500, SERVER_ERROR),
    ErrorCode.WORKER_ERROR.value: (500, SERVER_ERROR),
    ErrorCode.INVALID_REQUEST.value: (400, INVALID_REQUEST),
}
# Failures a client may retry after a while: these answers say how long (Retry-After).
_RETRY_LATER = {ErrorCode.QUEUE_FULL.value, ErrorCode.QUOTA_EXCEEDED.value,
                ErrorCode.NO_WORKER.value, ErrorCode.BROKER_UNAVAILABLE.value,
                ErrorCode.SHUTTING_DOWN.value}
UNKNOWN_FAILURE = "unknown_error"


def job_failure(error: JobError, *, retry_after: int | None = None,
                cancelled_here: bool = False) -> APIError:
    """The APIError for a job that failed with ``error``.

    ``retry_after``: the seconds to send in Retry-After, for the codes a later retry can help,
    unless the error knows better (``JobError.retry_after``: whole seconds, rounded up).
    ``cancelled_here``: this frontend cancelled the job itself (its client left or asked), so
    "cancelled" is the client's own doing (499). Any other "cancelled", and any code this
    table does not know, is the cluster's failure: a 500.
    """
    code, message = str(error.code), error.message
    if code == ErrorCode.CANCELLED.value:
        if cancelled_here:
            return APIError(499, message, code=code)
        return APIError(500, f"the cluster cancelled the job: {message}", type=SERVER_ERROR,
                        code=code)
    if code not in _JOB_FAILURES:
        return APIError(500, f"the job failed with a code this server does not know "
                             f"({str(code)[:64]!r}): {message}", type=SERVER_ERROR,
                        code=UNKNOWN_FAILURE)
    status, kind = _JOB_FAILURES[code]
    param = "model" if code in (ErrorCode.MODEL_NOT_FOUND.value, ErrorCode.NO_WORKER.value) \
        else None
    if error.retry_after is not None:
        retry_after = max(1, math.ceil(error.retry_after))  # Retry-After takes whole seconds
    headers = {"Retry-After": str(retry_after)} \
        if retry_after is not None and code in _RETRY_LATER else None
    return APIError(status, message, type=kind, param=param, code=code, headers=headers)


def should_retry(status: int) -> str:
    """The x-should-retry header for an error with ``status``."""
    return "true" if status in _RETRYABLE_STATUS else "false"


def _respond(resp: falcon.Response, error: APIError) -> None:
    resp.status = falcon.code_to_http_status(error.status)
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(error.body())
    for name, value in error.headers.items():
        resp.set_header(name, value)
    resp.set_header("x-should-retry", should_retry(error.status))


def _handle_api_error(req: falcon.Request, resp: falcon.Response, ex: APIError,
                      params: dict[str, Any]) -> None:
    _respond(resp, ex)


def _handle_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError,
                       params: dict[str, Any]) -> None:
    status = falcon.http_status_to_code(ex.status)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
            415: "unsupported_media_type"}.get(status, "http_error")
    message = ex.description or ex.title or "error"
    # Both come from the client: never echo them back at any length.
    path = req.path if len(req.path) <= 200 else req.path[:200] + "..."
    method = req.method if len(req.method) <= 20 else req.method[:20] + "..."
    if status == 404:
        message = f"no route for {method} {path}"
    elif status == 405:
        message = f"{method} is not allowed on {path}"
    headers = dict(ex.headers or {})
    _respond(resp, APIError(status, message, type=INVALID_REQUEST if status < 500 else
                            SERVER_ERROR, code=code, headers=headers))


def _handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception,
                       params: dict[str, Any]) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path)
    _respond(resp, APIError(500, "internal server error; the server log has the details",
                            type=SERVER_ERROR, code="internal_error"))


def _handle_storage_error(req: falcon.Request, resp: falcon.Response, ex: Exception,
                          params: dict[str, Any]) -> None:
    """The job records or the image store cannot be reached: the operator's log says why;
    the client gets a retryable 503 without the details (they may name hosts or paths)."""
    log.error("%s %s: %s", req.method, req.path[:200], ex)
    _respond(resp, APIError(503, "this server's storage is not reachable right now; try "
                                 "again shortly", type=SERVER_ERROR, code="storage_unavailable",
                            headers={"Retry-After": "5"}))


def install_error_handlers(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    # Falcon picks the most specific handler for an exception's class.
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(DatabaseError, _handle_storage_error)
    app.add_error_handler(StoreError, _handle_storage_error)
    app.add_error_handler(falcon.HTTPError, _handle_http_error)
    app.add_error_handler(APIError, _handle_api_error)
