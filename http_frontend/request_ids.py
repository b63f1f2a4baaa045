"""X-Request-ID: take the client's (or make one), answer with it, log it with the request.

A well-formed incoming id (1 to 128 visible ASCII characters, no comma) is kept, so a proxy's
or a client's id finds this frontend's log lines. Anything else — too long, control
characters, non-ASCII, empty, several headers joined with a comma — is replaced by a fresh
id rather than refused: the id is for finding log lines, and a request must not fail over it.
Every response carries the id, errors included.

While a request is handled (and its answer streamed), its id is also this thread's
``current()``; ``LogFilter`` puts it on every log line the thread writes, and the service
logs it with the jobs it sends.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import falcon

HEADER = "X-Request-ID"
MAX_LENGTH = 128
_VISIBLE = frozenset(chr(code) for code in range(0x21, 0x7F)) - {","}

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                       default=None)


def current() -> str | None:
    """The id of the request this thread is handling; None outside a request."""
    return _current.get()


def valid(value: str | None) -> bool:
    return value is not None and 1 <= len(value) <= MAX_LENGTH and set(value) <= _VISIBLE


def new_id() -> str:
    return uuid.uuid4().hex


class RequestIds:
    """Falcon middleware: ``req.context.request_id``, and the header on every response."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header(HEADER)
        request_id = given if given is not None and valid(given) else new_id()
        req.context.request_id = request_id
        _current.set(request_id)
        resp.set_header(HEADER, request_id)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        # Again here: an error handler may have rebuilt the headers, and a middleware before
        # this one may have refused the request before process_request ran.
        request_id = getattr(req.context, "request_id", None) or new_id()
        resp.set_header(HEADER, request_id)
        # Left set: a streamed answer is written by this thread after the app returns, and
        # its lines are the request's too. The thread's next request sets its own.
        _current.set(request_id)


class LogFilter(logging.Filter):
    """Put the current request's id on records that do not name one (a handler's filter:
    ``logs.add_filter``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            request_id = current()
            if request_id is not None:
                record.request_id = request_id
        return True
