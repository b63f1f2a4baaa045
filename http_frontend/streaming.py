"""Server-sent events: the wire format, and the two event vocabularies we speak.

``OpenAIStream.events`` turns a job's messages into OpenAI's image-generation stream
(``image_generation.partial_image`` then ``image_generation.completed``; a failure is
``error_event``); ``job_event`` turns a job's events into the jobs API's own for the UI
(``queued``, ``progress``, ``preview``, ``completed``, ``failed``, ``cancelled``). Neither
waits or sends: the service and the jobs API follow the job and drive them. ``ClosingStream``
is the response body that gives back what a stream holds when the server closes it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

from broker.protocol import ErrorCode, Message, MsgType
from http_frontend import schema
from http_frontend.errors import JobError
from http_frontend.pending import Event

# The event shapes' enums (ImageGenPartialImageEvent / ImageGenCompletedEvent).
_EVENT_SIZES = ("1024x1024", "1024x1536", "1536x1024")
_EVENT_QUALITIES = ("low", "medium", "high")
_EVENT_BACKGROUNDS = ("transparent", "opaque")
_NO_USAGE = {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0,
             "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


class ClosingStream:
    """A response body of events whose ``on_close`` runs exactly once when the server closes
    it (PEP 3333), even if it was never iterated: a generator's ``finally`` runs only once
    the generator started, and what it holds (a stream slot, a job) must come back anyway."""

    def __init__(self, events: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> ClosingStream:
        return self

    def __next__(self) -> bytes:
        return next(self._events)

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
        finally:
            if on_close is not None:
                on_close()


def b64(frame: Any) -> str:
    data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    return base64.b64encode(data).decode("ascii")


def _event_fields(fitted: schema.FittedRequest) -> dict[str, Any]:
    req = fitted.request
    size = f"{fitted.width}x{fitted.height}"
    return {
        "size": size if size in _EVENT_SIZES else "auto",
        "quality": req.quality if req.quality in _EVENT_QUALITIES else "auto",
        "background": req.background if req.background in _EVENT_BACKGROUNDS else "auto",
        "output_format": req.output_format,
    }


class OpenAIStream:
    """OpenAI's image stream for one job: partial images, then one completed event per image."""

    def __init__(self, fitted: schema.FittedRequest, created: Callable[[], int], *,
                 kind: str = "image_generation") -> None:
        self.fitted = fitted
        self.created = created
        self.kind = kind  # the events' prefix: image_generation, or image_edit for an edit
        self._partials: dict[int, int] = {}  # image index -> partial images sent

    def events(self, msg: Message, urls: list[str | None] | None = None) -> list[bytes]:
        """The events for one message; ``urls``: where each image of a RESULT is stored
        (the completed events add ``url`` beside the ``b64_json`` the spec requires)."""
        urls = urls or []
        if msg.type is MsgType.PROGRESS and msg.payloads:
            index = msg.get("image_index") or 0
            partial = self._partials.get(index, 0)
            self._partials[index] = partial + 1
            return [sse(f"{self.kind}.partial_image", {
                "type": f"{self.kind}.partial_image", "b64_json": b64(msg.payloads[0]),
                "created_at": self.created(), **_event_fields(self.fitted),
                "partial_image_index": partial, "image_index": index,
                # The spec's size enum says "auto" for most sizes: the real one, as extensions.
                "width": self.fitted.width, "height": self.fitted.height,
            })]
        if msg.type is MsgType.RESULT:
            return [sse(f"{self.kind}.completed", {
                "type": f"{self.kind}.completed", "b64_json": b64(frame),
                "created_at": self.created(), **_event_fields(self.fitted), "usage": _NO_USAGE,
                "image_index": index, "seed": info.seed, "width": info.width,
                "height": info.height,
                **({"url": urls[index]} if index < len(urls) and urls[index] else {}),
            }) for index, (info, frame) in enumerate(
                zip(msg["images"], msg.payloads, strict=True))]
        return []


def error_event(error: dict[str, Any]) -> bytes:
    """A failure after the stream began; the openai client raises it as an APIError."""
    return sse("error", {"type": "error", "error": error})


def job_event(job_id: str, event: Event, completed: Callable[[Message], dict[str, Any]],
              failure: Callable[[JobError], dict[str, Any]], *, cancelled_here: bool = False,
              wait: Callable[[int, float | None], float | None] | None = None) -> bytes | None:
    """The jobs API's event for one of the job's events, or None for those it does not show.

    ``completed`` gives the body for a RESULT, ``failure`` the error body for the job's
    JobError. ``cancelled_here``: this frontend cancelled the job (someone asked it to); a
    "cancelled" failure nobody here asked for is shown as ``failed``. ``wait`` estimates the
    seconds before the job starts from its position and the broker's work ahead of it
    (``eta_seconds``; None: unknown).
    """
    if isinstance(event, JobError):
        if event.code == ErrorCode.CANCELLED and cancelled_here:
            return sse("cancelled", {"id": job_id})
        return sse("failed", {"id": job_id, "error": failure(event)})
    if event.type is MsgType.ACCEPTED:
        position = event["position"]
        eta = wait(position, event.get("work_ahead")) if wait is not None else None
        return sse("queued", {"id": job_id, "position": position, "eta_seconds": eta})
    if event.type is MsgType.PROGRESS and event.payloads:
        return sse("preview", {"id": job_id, "image_index": event.get("image_index") or 0,
                               "step": event["step"], "steps": event["steps"],
                               "b64_json": b64(event.payloads[0]),
                               "output_format": event.get("preview_format") or "png"})
    if event.type is MsgType.PROGRESS:
        return sse("progress", {"id": job_id, "step": event["step"], "steps": event["steps"]})
    if event.type is MsgType.RESULT:
        return sse("completed", completed(event))
    return None
