"""The wire protocol between frontends, the broker and workers.

Every message is one msgpack *header* frame (a map with the protocol version ``v``, the type
``t`` and the type's fields) followed by a fixed number of opaque *payload* frames (encoded
images, previews). The broker reads headers only; payload frames pass through it untouched.

This is the one module the other packages import the protocol from. Records have defaults for
every optional field, and decoders ignore unknown fields, so a newer peer can add fields
without breaking an older one; a change that breaks old peers bumps ``VERSION``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1

MAX_HEADER_BYTES = 256 * 1024
MAX_STRING = 64 * 1024
MAX_LIST = 1024
MAX_IMAGES = 16
MAX_PREVIEWS = 3
MAX_PAYLOAD_FRAMES = MAX_IMAGES
MAX_FRAMES = 1 + MAX_PAYLOAD_FRAMES
MAX_BATCH = 16  # jobs in one pipeline call; a worker holds at most 2 batches (capacity)
MAX_SEED = 2**63 - 1
MAX_ID = 128  # characters in an id: job, owner, worker, incarnation


class ProtocolError(ValueError):
    """A message that does not follow this protocol; receivers log and drop it."""


class MsgType(enum.StrEnum):
    # frontend -> broker
    SUBMIT = "submit"
    CANCEL = "cancel"
    STATUS = "status"
    # broker -> frontend
    ACCEPTED = "accepted"
    STATUS_REPLY = "status_reply"
    # worker -> broker, and forwarded broker -> frontend
    PROGRESS = "progress"
    RESULT = "result"
    FAILED = "failed"
    # worker -> broker
    READY = "ready"
    HEARTBEAT = "heartbeat"  # both ways
    BYE = "bye"
    # broker -> worker
    JOBS = "jobs"
    RECONNECT = "reconnect"


class ErrorCode(enum.StrEnum):
    """Why a job failed; the frontend turns each into one HTTP status (http_frontend.errors)."""

    MODEL_NOT_FOUND = "model_not_found"
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    WORKER_ERROR = "worker_error"
    INVALID_REQUEST = "invalid_request"
    CANCELLED = "cancelled"
    BROKER_UNAVAILABLE = "broker_unavailable"
    SHUTTING_DOWN = "shutting_down"


# --------------------------------------------------------------------------------------------
# Records carried inside headers


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One generation request: everything a worker needs to make ``len(seeds)`` images."""

    id: str
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    guidance: float | None = None
    output_format: str = "png"
    output_compression: int | None = None
    timeout: float = 300.0  # seconds from submission; each hop keeps its own clock
    user: str | None = None
    attempt: int = 0  # set by the broker: how many workers were lost running this job
    previews: int = 0  # partial images to send while denoising (PROGRESS with a payload)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can run in one pipeline call."""
        return (self.model, self.width, self.height, self.steps, self.guidance, self.previews)

    def to_wire(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies and costs 20x more, on the broker's hot path.
        data = {name: getattr(self, name) for name in _JOB_FIELDS}
        data["seeds"] = list(self.seeds)
        return data

    @classmethod
    def from_wire(cls, data: Any) -> JobSpec:
        values = _check_record(data, _JOB_FIELDS, "job")
        seeds = values["seeds"]
        if not 1 <= len(seeds) <= MAX_IMAGES or not all(
                _is_int(s) and 0 <= s <= MAX_SEED for s in seeds):
            raise ProtocolError(f"job.seeds must be 1..{MAX_IMAGES} integers in 0..2**63-1")
        if values["width"] <= 0 or values["height"] <= 0 or values["steps"] <= 0:
            raise ProtocolError("job width, height and steps must be positive")
        values["seeds"] = tuple(seeds)
        if not 0 <= values.get("previews", 0) <= MAX_PREVIEWS:
            raise ProtocolError(f"job.previews must be 0..{MAX_PREVIEWS}")
        if values.get("guidance") is not None:
            if not math.isfinite(values["guidance"]):
                raise ProtocolError("job.guidance must be a finite number")
            values["guidance"] = float(values["guidance"])
        if "timeout" in values:
            # A NaN or infinite deadline would never expire, and a NaN at the top of the
            # broker's deadline heap would stop every other job from expiring too.
            if not (math.isfinite(values["timeout"]) and values["timeout"] > 0):
                raise ProtocolError("job.timeout must be a positive finite number")
            values["timeout"] = float(values["timeout"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """What a RESULT says about each payload frame, in the same order."""

    seed: int
    width: int
    height: int
    format: str

    @classmethod
    def from_wire(cls, data: Any) -> ImageInfo:
        return cls(**_check_record(data, _IMAGE_FIELDS, "image"))


@dataclass(frozen=True)
class Message:
    """A decoded message: its type, its header fields, and its payload frames untouched."""

    type: MsgType
    fields: dict[str, Any]
    payloads: Sequence[Any] = field(default_factory=tuple)
    header: Any = None  # the header frame as received, for relaying without re-encoding

    def frames(self) -> list[Any]:
        """The message as frames again: the received header when there is one."""
        if self.header is not None:
            return [self.header, *self.payloads]
        return encode(self.type, _to_wire(self.fields), self.payloads)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# --------------------------------------------------------------------------------------------
# Field tables: name -> (accepted types, required)

_Spec = dict[str, tuple[tuple[type, ...], bool]]
_STR, _INT, _NUM, _BOOL = (str,), (int,), (int, float), (bool,)
_LIST, _MAP = (list,), (dict,)
_OPT_STR = (str, type(None))
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))

_JOB_FIELDS: _Spec = {
    "id": (_STR, True),
    "model": (_STR, True),
    "prompt": (_STR, True),
    "width": (_INT, True),
    "height": (_INT, True),
    "steps": (_INT, True),
    "seeds": (_LIST, True),
    "negative_prompt": (_OPT_STR, False),
    "guidance": (_OPT_NUM, False),
    "output_format": (_STR, False),
    "output_compression": (_OPT_INT, False),
    "timeout": (_NUM, False),
    "user": (_OPT_STR, False),
    "attempt": (_INT, False),
    "previews": (_INT, False),
}

_IMAGE_FIELDS: _Spec = {
    "seed": (_INT, True),
    "width": (_INT, True),
    "height": (_INT, True),
    "format": (_STR, True),
}

# Per message type: its fields and how many payload frames it may carry.
_MESSAGES: dict[MsgType, tuple[_Spec, range]] = {
    # owner: the submitting frontend's stable id; its jobs are its own across reconnects.
    MsgType.SUBMIT: ({"job": (_MAP, True), "owner": (_OPT_STR, False)}, range(0, 1)),
    MsgType.CANCEL: ({"job_id": (_STR, True), "owner": (_OPT_STR, False)}, range(0, 1)),
    MsgType.STATUS: ({}, range(0, 1)),
    MsgType.ACCEPTED: ({"job_id": (_STR, True), "position": (_INT, True)}, range(0, 1)),
    MsgType.STATUS_REPLY: ({"workers": (_LIST, True), "queues": (_MAP, True)}, range(0, 1)),
    MsgType.PROGRESS: (
        {"job_id": (_STR, True), "step": (_INT, True), "steps": (_INT, True),
         "image_index": (_OPT_INT, False), "preview_format": (_OPT_STR, False)},
        range(0, 2),  # a payload frame is a preview of image `image_index`
    ),
    MsgType.RESULT: (
        {"job_id": (_STR, True), "images": (_LIST, True), "timings": (_MAP, False),
         "worker_id": (_OPT_STR, False)},
        range(1, MAX_PAYLOAD_FRAMES + 1),
    ),
    MsgType.FAILED: (
        {"job_id": (_STR, True), "code": (_STR, True), "message": (_STR, True),
         "retryable": (_BOOL, False)},
        range(0, 1),
    ),
    MsgType.READY: (
        {"worker_id": (_STR, True), "host": (_STR, True), "device": (_STR, True),
         "models": (_LIST, True), "max_batch": (_INT, False), "capacity": (_INT, False),
         "version": (_STR, False), "model_info": (_MAP, False),
         "held": (_LIST, False),  # ids of the jobs it holds (running or waiting), if any
         "session": (_OPT_STR, False)},  # random per worker process
        range(0, 1),
    ),
    MsgType.HEARTBEAT: ({"running": (_LIST, False)}, range(0, 1)),
    MsgType.BYE: ({}, range(0, 1)),
    MsgType.JOBS: ({"jobs": (_LIST, True)}, range(0, 1)),
    MsgType.RECONNECT: ({}, range(0, 1)),
}


# Every message the broker makes names its incarnation (a random id per broker process), so a
# peer notices a restart on the first message from the new one, however fast it was.
_INCARNATION: _Spec = {"incarnation": (_OPT_STR, False)}
for _type in (MsgType.ACCEPTED, MsgType.STATUS_REPLY, MsgType.FAILED, MsgType.HEARTBEAT,
              MsgType.JOBS, MsgType.CANCEL, MsgType.RECONNECT):
    _MESSAGES[_type][0].update(_INCARNATION)

_TYPE_NAMES = frozenset(t.value for t in MsgType)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # bool is an int subclass; never accept True as a width
    return isinstance(value, types)


_ID_FIELDS = frozenset({"id", "job_id", "owner", "incarnation", "worker_id", "session"})


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, str) and name.rpartition(".")[2] in _ID_FIELDS and len(value) > MAX_ID:
        raise ProtocolError(f"{name} is longer than {MAX_ID} characters")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ProtocolError(f"{name} is longer than {MAX_STRING} characters")
    if isinstance(value, (list, dict)) and len(value) > MAX_LIST:
        raise ProtocolError(f"{name} has more than {MAX_LIST} entries")


def _check_record(data: Any, spec: _Spec, what: str) -> dict[str, Any]:
    """Return the known fields of ``data`` after checking their types; ignore unknown ones."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a map")
    values: dict[str, Any] = {}
    for name, (types, required) in spec.items():
        if name not in data:
            if required:
                raise ProtocolError(f"{what}.{name} is missing")
            continue
        value = data[name]
        if not _type_ok(value, types):
            raise ProtocolError(f"{what}.{name} has the wrong type {type(value).__name__}")
        _check_value(f"{what}.{name}", value)
        values[name] = value
    return values


# --------------------------------------------------------------------------------------------
# Encoding and decoding


def _to_wire(fields: dict[str, Any]) -> dict[str, Any]:
    """Decoded fields back to plain msgpack values (records become maps)."""
    def plain(value: Any) -> Any:
        if isinstance(value, JobSpec):
            return value.to_wire()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return {k: plain(v) for k, v in fields.items()}


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack extension types are not allowed")


def encode(msg_type: MsgType, fields: dict[str, Any] | None = None,
           payloads: Sequence[Any] = ()) -> list[Any]:
    """Return the frames of one message: the header, then the payloads as given.

    Raises ProtocolError for fields msgpack cannot encode (a string holding a lone surrogate,
    an integer past 64 bits), so a caller can refuse that one message and carry on.
    """
    header = {"v": VERSION, "t": msg_type.value, **(fields or {})}
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (UnicodeEncodeError, TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {msg_type.value}: {type(exc).__name__}") from None
    return [packed, *payloads]


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _frame_len(frame: Any) -> int:
    return len(frame.buffer) if hasattr(frame, "buffer") else len(frame)


def decode(frames: Sequence[Any]) -> Message:
    """Decode and validate one message (frames after any routing identity).

    Raises ProtocolError for anything malformed; the payload frames are returned as given.
    """
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"a message has 1..{MAX_FRAMES} frames, got {len(frames)}")
    if _frame_len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("header frame too large")
    header = _unpack_header(_frame_bytes(frames[0]))
    if not _is_int(header.get("v")) or header["v"] != VERSION:  # not True, not 1.0
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r}")
    name = header.get("t")
    if not isinstance(name, str) or name not in _TYPE_NAMES:
        raise ProtocolError(f"unknown message type {name!r}")
    msg_type = MsgType(name)
    spec, payload_counts = _MESSAGES[msg_type]
    payloads = tuple(frames[1:])
    if len(payloads) not in payload_counts:
        raise ProtocolError(f"{msg_type.value} takes {payload_counts} payload frames")
    fields = _check_record(header, spec, msg_type.value)
    _check_semantics(msg_type, fields, payloads)
    return Message(msg_type, fields, payloads, header=frames[0])


def _unpack_header(raw: bytes) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
            max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_LIST, max_map_len=MAX_LIST,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable header: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    _reject_timestamps(header)
    return header


_PLAIN = (str, bytes, int, float, bool, type(None))


def _reject_timestamps(header: dict[str, Any]) -> None:
    """Reject msgpack Timestamps: extension -1 is decoded without asking ``ext_hook``."""
    stack: list[Any] = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())  # keys are str or bytes (strict_map_key)
        elif isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, _PLAIN):
            raise ProtocolError("msgpack extension types are not allowed")


def _check_semantics(msg_type: MsgType, fields: dict[str, Any], payloads: Sequence[Any]) -> None:
    """Checks that span fields: nested records and payload counts that depend on the header."""
    if msg_type is MsgType.SUBMIT:
        fields["job"] = JobSpec.from_wire(fields["job"])
    elif msg_type is MsgType.JOBS:
        fields["jobs"] = [JobSpec.from_wire(j) for j in fields["jobs"]]
        if not fields["jobs"]:
            raise ProtocolError("jobs must not be empty")
    elif msg_type is MsgType.RESULT:
        fields["images"] = [ImageInfo.from_wire(i) for i in fields["images"]]
        if len(fields["images"]) != len(payloads):
            raise ProtocolError("result needs one payload frame per image")
    elif msg_type is MsgType.READY:
        models = fields["models"]
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ProtocolError("ready.models must be a non-empty list of names")
        max_batch, capacity = fields.get("max_batch", 1), fields.get("capacity", 1)
        if not 1 <= max_batch <= MAX_BATCH:
            raise ProtocolError(f"ready.max_batch must be 1..{MAX_BATCH}")
        if capacity < 1:
            raise ProtocolError("ready.capacity must be at least 1")
        _check_ids("ready.held", fields.get("held", []))
    elif msg_type is MsgType.HEARTBEAT:
        _check_ids("heartbeat.running", fields.get("running", []))
    elif msg_type is MsgType.FAILED:
        fields.setdefault("retryable", False)
    elif msg_type is MsgType.STATUS_REPLY:
        if not all(isinstance(w, dict) for w in fields["workers"]):
            raise ProtocolError("status_reply.workers must be a list of maps")
        if not all(isinstance(k, str) and _is_int(v) for k, v in fields["queues"].items()):
            raise ProtocolError("status_reply.queues must map model names to depths")


def _check_ids(name: str, ids: list[Any]) -> None:
    if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID for i in ids):
        raise ProtocolError(f"{name} must be a list of job ids")


class DropLog:
    """Log dropped messages at most once per second, with a count of the ones not logged.

    A peer that floods us with garbage must not flood the log too.
    """

    def __init__(self, logger: logging.Logger, what: str = "dropped a message from") -> None:
        self._log = logger
        self._what = what
        self._last = float("-inf")
        self._suppressed = 0

    def __call__(self, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._suppressed += 1
            return
        extra = f" ({self._suppressed} more dropped since)" if self._suppressed else ""
        self._log.warning("%s %s: %s%s", self._what, peer, reason, extra)
        self._last, self._suppressed = now, 0


# --------------------------------------------------------------------------------------------
# Constructors for the messages with nested records, so callers never build maps by hand


def submit(job: JobSpec, owner: str | None = None) -> list[Any]:
    return encode(MsgType.SUBMIT, {"job": job.to_wire(), "owner": owner})


def jobs(specs: Sequence[JobSpec], incarnation: str | None = None) -> list[Any]:
    return encode(MsgType.JOBS, {"jobs": [s.to_wire() for s in specs],
                                 "incarnation": incarnation})


def failed(job_id: str, code: ErrorCode, message: str, *, retryable: bool = False,
           incarnation: str | None = None) -> list[Any]:
    fields = {"job_id": job_id, "code": code.value, "message": message, "retryable": retryable}
    if incarnation is not None:
        fields["incarnation"] = incarnation
    return encode(MsgType.FAILED, fields)


def result(job_id: str, images: Sequence[ImageInfo], payloads: Sequence[Any], *,
           timings: dict[str, float] | None = None, worker_id: str | None = None) -> list[Any]:
    return encode(
        MsgType.RESULT,
        {"job_id": job_id, "images": [dataclasses.asdict(i) for i in images],
         "timings": timings or {}, "worker_id": worker_id},
        payloads,
    )
