"""waitress, with what an open network needs added in one place.

- **Errors in OpenAI's shape.** waitress answers some requests itself, before the app sees
  them: a head over ``max_request_header_size`` (431), a body over ``max_request_body_size``
  (413), broken chunked encoding or a malformed request line (400), an unknown transfer
  coding (501). It writes those as plain text; ``JSONErrorTask`` writes the same status as
  ``{"error": {"message", "type", "param", "code"}}``.
- **A deadline for receiving a request.** waitress's ``channel_timeout`` closes idle
  connections only: a client that sends its request a byte at a time (slowloris) is never
  idle. ``Server.maintenance`` closes a connection whose request has not fully arrived
  ``receive_timeout`` seconds after its first byte.
- **A body limit per route.** Uploads (``/v1/images/edits``) may be far larger than a JSON
  request: ``RequestParser`` holds every other route to 4 x ``max_body`` (the app answers
  413 itself up to there) and the upload routes to their own limit, as soon as the head is
  read.
- **A lingering close after an error.** waitress closes at once after an error answer, often
  with the rest of the request body unread; the kernel then resets the connection, and a
  client still sending its body never reads the answer. ``Channel`` shuts its sending side
  instead, and reads and discards what still comes (at most ``LINGER_BYTES``, for at most
  ``LINGER_S``) before it closes.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import time
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from http_frontend import request_ids
from http_frontend.errors import INVALID_REQUEST, SERVER_ERROR, APIError, should_retry

log = logging.getLogger(__name__)

LINGER_S = 5.0
LINGER_BYTES = 32 << 20

# waitress's error classes (waitress.utilities) by status: our code, and the message's start.
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("malformed_request", "the request is not valid HTTP"),
    413: ("request_too_large", "the request body is too large"),
    431: ("request_header_fields_too_large", "the request head is too large"),
    501: ("not_implemented", "the request uses something this server does not implement"),
}


class JSONErrorTask(ErrorTask):
    """waitress's answer to a request it refused, in OpenAI's error shape."""

    def execute(self) -> None:
        error = self.request.error
        code, text = _ERRORS.get(error.code, ("internal_error", "internal server error"))
        if error.code == 413:
            text = f"the request body is larger than {self._limit()} bytes"
        elif error.code in _ERRORS:  # not a 500: waitress's text for one may be a traceback
            text = f"{text}: {error.body}"
        api = APIError(error.code, text, code=code,
                       type=INVALID_REQUEST if error.code < 500 else SERVER_ERROR)
        body = json.dumps(api.body()).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend([("Content-Type", "application/json"),
                                      ("x-should-retry", should_retry(error.code)),
                                      (request_ids.HEADER, self._request_id())])
        self.set_close_on_finish()
        self.channel.linger_on_close = True  # the client may still be sending its body
        self.content_length = len(body)
        self.write(body)

    def _limit(self) -> int:
        """The body limit the refused request's route has."""
        server = self.channel.server
        path = getattr(self.request, "path", None)
        return server.upload_limits.get(path, server.max_body) if path else server.max_body

    def _request_id(self) -> str:
        """The client's X-Request-ID when waitress read a valid one before refusing, else new:
        every answer carries one, these too (http_frontend/request_ids.py)."""
        headers = getattr(self.request, "headers", None) or {}
        given = headers.get("X_REQUEST_ID")  # waitress's key for the header
        return given if isinstance(given, str) and request_ids.valid(given) else \
            request_ids.new_id()


class RequestParser(HTTPRequestParser):
    """waitress's parser, with the body limit of the request's route once its path is read:
    an upload route's own, every other route's 4 x ``max_body``. Subclassed per server
    (``create_server``), which sets the limits."""

    upload_limits: dict[str, int] = {}  # path -> its largest body
    default_adj: Adjustments | None = None  # another route's adjustments: 4 x max_body + 1

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.default_adj is not None and self.path not in self.upload_limits:
            self.adj = self.default_adj


class Channel(HTTPChannel):
    """waitress's connection, with JSON errors, a receive deadline and a lingering close."""

    error_task_class = JSONErrorTask
    request_started: float | None = None  # first byte of a request not yet served
    linger_on_close = False
    lingering_until: float | None = None
    _linger_budget = 0

    def received(self, data: bytes) -> bool:
        if data and self.request_started is None:
            self.request_started = time.monotonic()
        return super().received(data)

    def service(self) -> None:
        super().service()
        self.request_started = None  # the next request's clock starts with its first byte

    # ------------------------------------------------------------ lingering close

    def handle_close(self) -> None:
        if self.linger_on_close and self.lingering_until is None and self.connected:
            self.linger_on_close = False
            try:
                self.socket.shutdown(socket.SHUT_WR)  # the answer is out; say we are done
            except OSError:
                super().handle_close()
                return
            self.will_close = False
            self.lingering_until = time.monotonic() + LINGER_S
            self._linger_budget = LINGER_BYTES
            return
        self.lingering_until = None
        super().handle_close()

    def readable(self) -> bool:
        return True if self.lingering_until is not None else super().readable()

    def writable(self) -> bool:
        if self.lingering_until is not None:
            return time.monotonic() >= self.lingering_until  # then handle_write closes
        return super().writable()

    def handle_read(self) -> None:
        if self.lingering_until is None:
            super().handle_read()
            return
        try:
            data = self.socket.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._linger_budget -= len(data)
        if not data or self._linger_budget <= 0:
            self.handle_close()

    def handle_write(self) -> None:
        if self.lingering_until is not None:
            self.handle_close()  # the linger's time is up
            return
        super().handle_write()


class Server(TcpWSGIServer):
    """A listening socket whose connections are ``Channel``s, with a receive deadline."""

    channel_class = Channel
    receive_timeout = 30.0
    max_body = 0
    upload_limits: dict[str, int] = {}  # path -> its body limit, for the 413's text

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # closes connections idle past channel_timeout
        cutoff = time.monotonic() - self.receive_timeout
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", None)
            if started is not None and started < cutoff and not channel.requests \
                    and not channel.will_close:
                log.info("closing the connection from %s: its request did not arrive within "
                         "%.0f s", channel.addr, self.receive_timeout)
                channel.will_close = True


def close_everything(server: Server | MultiSocketServer) -> None:
    """Stop listening and close every connection, idle keep-alive ones included: waitress's
    loop runs while any connection is open, so closing only the listener would leave the
    process up until each client hung up or --channel-timeout passed."""
    socket_map = server._map if isinstance(server, Server) else server.map
    server.close()
    wasyncore.close_all(socket_map)


def create_server(app: Any, *, receive_timeout: float, max_body: int,
                  upload_limits: dict[str, int] | None = None, **adjustments: Any
                  ) -> Server | MultiSocketServer:
    """``waitress.create_server`` for TCP, with ``Server`` and ``Channel`` in place of
    waitress's own classes (it offers no hook for them). ``upload_limits``: paths whose
    bodies may be larger than waitress's 4 x ``max_body`` (``max_request_body_size`` must
    allow the largest)."""
    uploads = dict(upload_limits or {})
    adj = Adjustments(**adjustments)
    default_adj = copy.copy(adj)
    default_adj.max_request_body_size = min(adj.max_request_body_size, 4 * max_body + 1)
    class ServerParser(RequestParser):
        upload_limits = uploads
    ServerParser.default_adj = default_adj

    class ServerChannel(Channel):
        parser_class = ServerParser
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict[int, Any] = {}
    servers = []
    for sockinfo in adj.listen:
        server = Server(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
        server.receive_timeout = receive_timeout
        server.max_body = max_body
        server.upload_limits = uploads
        server.channel_class = ServerChannel
        servers.append(server)
    if len(servers) == 1:
        return servers[0]
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, servers[-1].log_info)
