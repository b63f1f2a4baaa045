"""The wire protocol between frontends, the broker and workers.

Every message is one msgpack *header* frame (a map with the protocol version ``v``, the type
``t`` and the type's fields) followed by a fixed number of opaque *payload* frames (encoded
images, previews). The broker reads headers only; payload frames pass through it untouched.

This is the one module the other packages import the protocol from. Records have defaults for
every optional field, and decoders skip unknown fields unread, so a newer peer can add fields
without breaking an older one; a change that breaks old peers bumps ``VERSION``.

Every header is decoded and checked in one pass by msgspec, against the types below: each
message type is a Struct tagged by ``t``, and the constraints (id lengths, ranges, list
caps) are in the annotations. What msgspec cannot say (finite floats, what a RESULT carries
for its payload frames, maps of anything) is checked after, in ``_check_semantics``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

VERSION = 1

MAX_HEADER_BYTES = 256 * 1024
MAX_STRING = 64 * 1024
MAX_LIST = 1024
MAX_IMAGES = 16
MAX_PREVIEWS = 3
MAX_PAYLOAD_FRAMES = MAX_IMAGES
MAX_INPUTS = 16  # input images of one edit job (OpenAI's image[] takes up to 16)
MAX_JOB_FRAMES = MAX_INPUTS + 1  # its input images and its mask
MAX_BATCH = 16  # jobs in one pipeline call; a worker holds at most 2 batches (capacity)
# A JOBS message carries the input frames of every job in its batch.
MAX_FRAMES = 1 + max(MAX_PAYLOAD_FRAMES, MAX_BATCH * MAX_JOB_FRAMES)
MAX_SEED = 2**63 - 1
MAX_ID = 128  # characters in an id: job, owner, worker, incarnation
MAX_WARNINGS = 8  # notes a worker sends back with a result
MAX_LORAS = 8  # LoRA adapters one job applies at once
MAX_LORA_NAME = 200  # characters in an adapter's name (its file name, or a repo id)
MAX_LORA_SCALE = 4.0  # |scale|: past it an adapter only breaks the image
# An identity's share weight, bounded both ways: past them one identity would starve the rest
# and its virtual time (work / weight per job) would overflow.
MIN_WEIGHT = 0.001
MAX_WEIGHT = 1000.0
# Priority classes, highest first (broker/fair_queue.py): a higher class is served before a
# lower one, which still gets a guaranteed share so that it never starves.
PRIORITIES = ("interactive", "batch")


class ProtocolError(ValueError):
    """A message that does not follow this protocol; receivers log and drop it."""


class MsgType(enum.StrEnum):
    # frontend -> broker
    SUBMIT = "submit"
    CANCEL = "cancel"
    STATUS = "status"
    WATCH = "watch"  # relay a job's progress here too: another frontend follows it
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
    QUOTA_EXCEEDED = "quota_exceeded"  # an identity's limit: its message names which
    NO_WORKER = "no_worker"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    WORKER_ERROR = "worker_error"
    INVALID_REQUEST = "invalid_request"
    CANCELLED = "cancelled"
    BROKER_UNAVAILABLE = "broker_unavailable"
    SHUTTING_DOWN = "shutting_down"


# --------------------------------------------------------------------------------------------
# Field types: the checks every field of that kind gets

Id = Annotated[str, Meta(max_length=MAX_ID)]
JobId = Annotated[str, Meta(min_length=1, max_length=MAX_ID)]  # in lists of held/running jobs
Text = Annotated[str, Meta(max_length=MAX_STRING)]
Positive = Annotated[int, Meta(ge=1)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
OptId = Id | UnsetType | None  # UNSET: absent from the header, so absent from Message.fields
OptText = Text | UnsetType | None
AnyMap = Annotated[dict[str, Any], Meta(max_length=MAX_LIST)]  # values: _check_plain
Count = Annotated[int, Meta(ge=0)]
Amount = Annotated[float, Meta(ge=0)]  # finite too: checked by _check_semantics
Counts = Annotated[dict[Text, Count], Meta(max_length=MAX_LIST)]
LoraName = Annotated[str, Meta(min_length=1, max_length=MAX_LORA_NAME)]


# --------------------------------------------------------------------------------------------
# Records carried inside headers (dataclasses: callers use dataclasses.replace on them)


@dataclass(frozen=True, kw_only=True)
class Quota:
    """An identity's limits (an API key's, from the keys file), enforced by the broker so that
    no frontend can be used to get round them; None: no limit of that kind."""

    # Across all models: jobs waiting at once, jobs on workers at once, and submissions a
    # minute (a token bucket: that many at once, then one every 60/per_minute seconds).
    max_queued: Annotated[int, Meta(ge=1)] | None = None
    max_running: Annotated[int, Meta(ge=1)] | None = None
    per_minute: Annotated[int, Meta(ge=1)] | None = None


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One generation request: everything a worker needs to make ``len(seeds)`` images."""

    id: Id
    model: Text
    prompt: Text
    width: Positive
    height: Positive
    steps: Positive
    seeds: Annotated[tuple[Seed, ...], Meta(min_length=1, max_length=MAX_IMAGES)]
    negative_prompt: Text | None = None
    guidance: float | None = None  # finite: checked by _check_job
    output_format: Text = "png"
    output_compression: int | None = None
    timeout: Annotated[float, Meta(gt=0)] = 300.0  # seconds from submission; finite
    user: Text | None = None
    attempt: int = 0  # set by the broker: how many workers were lost running this job
    previews: Annotated[int, Meta(ge=0, le=MAX_PREVIEWS)] = 0  # partial images while denoising
    # An edit: its input images travel as payload frames of the SUBMIT and the JOBS, never in
    # the header, then its mask (PNG, mode L: white is where to edit) when ``mask``.
    inputs: Annotated[int, Meta(ge=0, le=MAX_INPUTS)] = 0
    mask: bool = False
    strength: float | None = None  # 0..1: how far from the input (img2img and inpainting)
    # LoRA adapters to apply, (name, scale) each, in order; only workers that announce every
    # one of them get the job (WorkerRecord.loras).
    loras: Annotated[tuple[tuple[LoraName, float], ...], Meta(max_length=MAX_LORAS)] = ()
    # Who the job is queued for under fair sharing (broker/fair_queue.py): the API key's name,
    # else the request's ``user``; None is the one anonymous identity. Its weight is its share
    # against the others queued for the same model. On the job, not the SUBMIT, so a job sent
    # again (a broker or frontend restart) is queued for the same identity, as one job.
    tenant: Id | None = None
    weight: Annotated[float, Meta(ge=MIN_WEIGHT, le=MAX_WEIGHT)] = 1.0
    priority: Text = PRIORITIES[0]  # its identity's class, one of PRIORITIES
    quota: Quota | None = None  # its identity's limits (keys with limits only)
    # False: run without the worker's step cache (gpu_worker/step_cache.py), for exact images.
    step_cache: bool = True

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def identity(self) -> str:
        """Who it is queued and counted for: its tenant, "" for the one anonymous identity
        (broker/fair_queue.py, broker/quotas.py)."""
        return self.tenant or ""

    @property
    def frames(self) -> int:
        """The payload frames it travels with: its inputs and its mask."""
        return self.inputs + int(self.mask)

    @property
    def mode(self) -> str:
        """``generate`` from text, ``edit`` an image (img2img), or ``inpaint`` under a mask."""
        if not self.inputs:
            return "generate"
        return "inpaint" if self.mask else "edit"

    @property
    def work(self) -> float:
        """Its denoising work in megapixel-steps: what a worker's time grows with."""
        return self.steps * self.n * self.width * self.height / 1e6

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can run in one pipeline call."""
        return (self.model, self.width, self.height, self.steps, self.guidance, self.previews,
                self.inputs, self.mask, self.strength, self.loras, self.step_cache)

    def to_wire(self) -> dict[str, Any]:
        """The job as a plain map (encode() takes the JobSpec itself)."""
        data = {name: getattr(self, name) for name in _JOB_FIELDS}
        data["seeds"] = list(self.seeds)
        data["quota"] = dataclasses.asdict(self.quota) if self.quota is not None else None
        return data

    @classmethod
    def from_wire(cls, data: Any) -> JobSpec:
        try:
            spec = msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"job: {exc}") from None
        _check_job(spec)
        return spec


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobSpec))


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """What a RESULT says about each payload frame, in the same order."""

    seed: int
    width: int
    height: int
    format: Text

    @classmethod
    def from_wire(cls, data: Any) -> ImageInfo:
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"image: {exc}") from None


class WorkerStats(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a worker measured of itself, sent in its heartbeats (gpu_worker/stats.py).

    A field left None was not measured: not yet (no batch finished), or not on this device
    (memory on CUDA only, utilisation where NVML answers). It is absent on the wire, never 0.
    The heartbeat carries it as a plain map, read by ``from_wire`` apart from the heartbeat,
    so stats a broker cannot read cost only the stats, never the worker's liveness.
    """

    jobs_done: Count = 0  # jobs and images generated since the worker process started
    images_done: Count = 0
    step_seconds: Amount | None = None  # seconds per denoising step, in its last batch
    images_per_second: Amount | None = None  # over the last minute
    batch_size: Count | None = None  # jobs in its last batch
    step_megapixels: Amount | None = None  # what one step of its last batch drew, all images
    memory_used_bytes: Count | None = None  # what its PyTorch allocator holds on the device
    memory_total_bytes: Count | None = None
    utilization: Annotated[float, Meta(ge=0, le=1)] | None = None  # busy share, per NVML

    def to_wire(self) -> dict[str, Any]:
        """The stats as a plain map, None fields left out (STATUS_REPLY's worker entries)."""
        wire: dict[str, Any] = msgspec.to_builtins(self)
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> WorkerStats:
        try:
            stats = msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"stats: {exc}") from None
        stats.check("stats")
        return stats

    def check(self, name: str) -> None:
        """Raise ProtocolError for what the types cannot refuse: an infinite float."""
        _check_finite(name, self.step_seconds, self.images_per_second, self.utilization,
                      self.step_megapixels)


class LoraInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One LoRA adapter a worker can apply (gpu_worker/loras.py), in its READY and heartbeats."""

    loaded: bool = False  # in its memory now: a job needing it starts sooner there
    bytes: Count | None = None  # its weights' size, once loaded (or from its file)
    source: Text | None = None  # "file" (--lora-dir) or "hub" (a repo id)


def loras_from_wire(data: Any) -> dict[str, LoraInfo]:
    """A worker's adapters (name -> LoraInfo), read apart from the message that carried them:
    a bad map costs the adapters, never the worker's liveness."""
    try:
        loras: dict[str, LoraInfo] = msgspec.convert(
            data, Annotated[dict[LoraName, LoraInfo], Meta(max_length=MAX_LIST)])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"loras: {exc}") from None
    return loras


class IdentityLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One identity's jobs of one model (STATUS_REPLY): its name ("" is the anonymous one),
    never a key."""

    model: Text
    identity: Id
    queued: Count
    running: Count


# Identities a STATUS_REPLY lists at most, the busiest first: its size stays bounded however
# many identities have jobs.
MAX_IDENTITIES_LISTED = 100


class BrokerCounters(msgspec.Struct, frozen=True, kw_only=True):
    """What a broker counted since it started, per model (STATUS_REPLY).

    ``started`` is its wall clock then (seconds since the epoch): a counter that goes back
    with a new ``started`` (or incarnation) was reset by a restart, not lost.
    """

    started: Amount
    dispatched: Counts = msgspec.field(default_factory=dict)  # jobs leased to workers
    requeued: Counts = msgspec.field(default_factory=dict)  # put back after a worker was lost
    failed: Annotated[dict[Text, Counts], Meta(max_length=MAX_LIST)] = msgspec.field(
        default_factory=dict)  # model -> failure code (ErrorCode) -> jobs


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
        return encode(self.type, self.fields, self.payloads)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# --------------------------------------------------------------------------------------------
# Headers: one Struct per message type, told apart by ``t``


class _Header(msgspec.Struct, tag_field="t", kw_only=True):
    v: Literal[1]  # VERSION; not True, not 1.0


class Submit(_Header, tag=MsgType.SUBMIT.value):
    job: JobSpec
    owner: OptId = UNSET  # the submitting frontend's stable id; its jobs across reconnects


class Cancel(_Header, tag=MsgType.CANCEL.value):
    job_id: Id
    owner: OptId = UNSET
    incarnation: OptId = UNSET


class Status(_Header, tag=MsgType.STATUS.value):
    pass


class Watch(_Header, tag=MsgType.WATCH.value):
    job_id: Id


class Accepted(_Header, tag=MsgType.ACCEPTED.value):
    job_id: Id
    position: int
    incarnation: OptId = UNSET
    # Megapixel-steps the job's model has to do before it starts: the jobs ahead of it and
    # what is left of the batches its workers run now (finite: checked by _check_semantics).
    work_ahead: Amount | UnsetType = UNSET


class StatusReply(_Header, tag=MsgType.STATUS_REPLY.value):
    workers: Annotated[list[AnyMap], Meta(max_length=MAX_LIST)]
    queues: Annotated[dict[str, int], Meta(max_length=MAX_LIST)]  # model -> queue depth
    incarnation: OptId = UNSET
    counters: BrokerCounters | UnsetType = UNSET
    identities: Annotated[list[IdentityLoad], Meta(max_length=MAX_IDENTITIES_LISTED)] \
        | UnsetType = UNSET


class Progress(_Header, tag=MsgType.PROGRESS.value):
    job_id: Id
    step: int
    steps: int
    image_index: int | UnsetType | None = UNSET  # a payload frame previews this image
    preview_format: OptText = UNSET


class Result(_Header, tag=MsgType.RESULT.value):
    job_id: Id
    images: Annotated[list[ImageInfo], Meta(min_length=1, max_length=MAX_IMAGES)]
    timings: AnyMap | UnsetType = UNSET
    worker_id: OptId = UNSET
    # What the client should know of how its job ran (a prompt cut short): the response's.
    warnings: Annotated[list[Text], Meta(max_length=MAX_WARNINGS)] | UnsetType = UNSET


class Failed(_Header, tag=MsgType.FAILED.value):
    job_id: Id
    code: Text
    message: Text
    retryable: bool = False
    incarnation: OptId = UNSET
    # Seconds until a retry can succeed, where the broker knows (an identity's rate limit).
    retry_after: Annotated[float, Meta(ge=0, le=86400)] | UnsetType = UNSET


class Ready(_Header, tag=MsgType.READY.value):
    worker_id: Id
    host: Text
    device: Text
    models: Annotated[list[Annotated[str, Meta(min_length=1, max_length=MAX_STRING)]],
                      Meta(min_length=1, max_length=MAX_LIST)]
    max_batch: Annotated[int, Meta(ge=1, le=MAX_BATCH)] | UnsetType = UNSET
    capacity: Positive | UnsetType = UNSET
    version: Text | UnsetType = UNSET
    model_info: AnyMap | UnsetType = UNSET
    held: Annotated[list[JobId], Meta(max_length=MAX_LIST)] | UnsetType = UNSET  # its jobs
    session: OptId = UNSET  # random per worker process
    # Seconds between its heartbeats: the broker logs a worker whose interval is not its own.
    heartbeat: Annotated[float, Meta(gt=0)] | UnsetType = UNSET
    loras: AnyMap | UnsetType = UNSET  # its LoRA adapters, as in its heartbeats


class Heartbeat(_Header, tag=MsgType.HEARTBEAT.value):
    running: Annotated[list[JobId], Meta(max_length=MAX_LIST)] | UnsetType = UNSET
    incarnation: OptId = UNSET
    # WorkerStats as a map, from workers only (older ones send none): WorkerStats.from_wire.
    stats: AnyMap | UnsetType = UNSET
    # The LoRA adapters it can apply to its model: name -> {"loaded": bool, "bytes": int,
    # ...}, read by WorkerLoras.from_wire apart from the heartbeat (as the stats are).
    loras: AnyMap | UnsetType = UNSET


class Bye(_Header, tag=MsgType.BYE.value):
    pass


class Jobs(_Header, tag=MsgType.JOBS.value):
    jobs: Annotated[list[JobSpec], Meta(min_length=1, max_length=MAX_LIST)]
    incarnation: OptId = UNSET


class Reconnect(_Header, tag=MsgType.RECONNECT.value):
    incarnation: OptId = UNSET


# Per message type: its header and how many payload frames it may carry. Every message the
# broker makes names its incarnation (a random id per broker process), so a peer notices a
# restart on the first message from the new one, however fast it was.
_HEADERS: dict[MsgType, tuple[type[_Header], range]] = {
    MsgType.SUBMIT: (Submit, range(0, MAX_JOB_FRAMES + 1)),  # an edit's inputs
    MsgType.CANCEL: (Cancel, range(0, 1)),
    MsgType.STATUS: (Status, range(0, 1)),
    MsgType.WATCH: (Watch, range(0, 1)),
    MsgType.ACCEPTED: (Accepted, range(0, 1)),
    MsgType.STATUS_REPLY: (StatusReply, range(0, 1)),
    MsgType.PROGRESS: (Progress, range(0, 2)),
    MsgType.RESULT: (Result, range(1, MAX_PAYLOAD_FRAMES + 1)),
    MsgType.FAILED: (Failed, range(0, 1)),
    MsgType.READY: (Ready, range(0, 1)),
    MsgType.HEARTBEAT: (Heartbeat, range(0, 1)),
    MsgType.BYE: (Bye, range(0, 1)),
    MsgType.JOBS: (Jobs, range(0, MAX_FRAMES)),  # the inputs of its edits, job by job
    MsgType.RECONNECT: (Reconnect, range(0, 1)),
}


def _names(cls: type[_Header]) -> tuple[str, ...]:
    return tuple(name for name in cls.__struct_fields__ if name != "v")


# The fields of each type (for the docs' test): msg type -> (field names, payload counts).
_MESSAGES = {t: (_names(cls), counts) for t, (cls, counts) in _HEADERS.items()}
_BY_CLASS = {cls: (t, _names(cls), counts) for t, (cls, counts) in _HEADERS.items()}
_DECODER = msgspec.msgpack.Decoder(Submit | Cancel | Status | Watch | Accepted | StatusReply
                                   | Progress | Result | Failed | Ready | Heartbeat | Bye | Jobs
                                   | Reconnect)
_ENCODER = msgspec.msgpack.Encoder()


# --------------------------------------------------------------------------------------------
# Encoding and decoding


def encode(msg_type: MsgType, fields: dict[str, Any] | None = None,
           payloads: Sequence[Any] = ()) -> list[Any]:
    """Return the frames of one message: the header, then the payloads as given.

    Raises ProtocolError for fields msgpack cannot encode (a string holding a lone surrogate,
    an integer past 64 bits), so a caller can refuse that one message and carry on.
    """
    header = {"v": VERSION, "t": msg_type.value, **(fields or {})}
    try:
        packed = _ENCODER.encode(header)
    except (UnicodeEncodeError, TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {msg_type.value}: {type(exc).__name__}") from None
    return [packed, *payloads]


def decode(frames: Sequence[Any]) -> Message:
    """Decode and validate one message (frames after any routing identity).

    Raises ProtocolError for anything malformed; the payload frames are returned as given.
    """
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"a message has 1..{MAX_FRAMES} frames, got {len(frames)}")
    # msgspec reads a zmq.Frame through the buffer protocol: no copy, and no memoryview to make.
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("header frame too large")
    try:
        header = _DECODER.decode(frames[0])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid header: {exc}") from None
    except Exception as exc:  # malformed msgpack, or nested too deep (RecursionError)
        raise ProtocolError(f"undecodable header: {type(exc).__name__}") from None
    msg_type, names, payload_counts = _BY_CLASS[type(header)]
    payloads = tuple(frames[1:])
    if len(payloads) not in payload_counts:
        raise ProtocolError(f"{msg_type.value} takes {payload_counts} payload frames")
    _check_semantics(header, payloads)
    fields = {name: value for name in names
              if (value := getattr(header, name)) is not UNSET}
    return Message(msg_type, fields, payloads, header=frames[0])


def _check_job(spec: JobSpec) -> None:
    # A NaN or infinite deadline would never expire, and a NaN at the top of the broker's
    # deadline heap would stop every other job from expiring too.
    if not math.isfinite(spec.timeout):
        raise ProtocolError("job.timeout must be a positive finite number")
    if spec.guidance is not None and not math.isfinite(spec.guidance):
        raise ProtocolError("job.guidance must be a finite number")
    if spec.strength is not None and not 0.0 <= spec.strength <= 1.0:  # NaN fails too
        raise ProtocolError("job.strength must be a number from 0 to 1")
    if spec.mask and not spec.inputs:
        raise ProtocolError("job.mask needs an input image to go with")
    if not all(-MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE for _, scale in spec.loras):
        raise ProtocolError(f"job.loras scales must be numbers from {-MAX_LORA_SCALE:g} to "
                            f"{MAX_LORA_SCALE:g}")  # NaN fails the comparison too
    if len({name for name, _ in spec.loras}) != len(spec.loras):
        raise ProtocolError("job.loras names each adapter once")
    if spec.priority not in PRIORITIES:
        raise ProtocolError(f"job.priority is one of {', '.join(PRIORITIES)}")


def _check_frames(name: str, specs: Sequence[JobSpec], payloads: Sequence[Any]) -> None:
    expected = sum(spec.frames for spec in specs)
    if len(payloads) != expected:
        raise ProtocolError(f"{name} needs {expected} payload frames (the jobs' inputs), "
                            f"got {len(payloads)}")


def _check_finite(name: str, *values: float | None) -> None:
    # msgspec's bounds already refuse NaN (it compares false); infinity passes them.
    if not all(value is None or math.isfinite(value) for value in values):
        raise ProtocolError(f"{name} must hold finite numbers")


_PLAIN = (str, bytes, int, float, bool, type(None))


def _check_plain(name: str, value: Any) -> None:
    """Check a map of anything as msgpack's own limits did: no extension types (msgspec
    decodes Timestamps to datetimes and others to Ext), str keys, no list over MAX_LIST."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if len(item) > MAX_LIST or not all(isinstance(k, str) for k in item):
                raise ProtocolError(f"{name} holds a map too long or with non-string keys")
            stack.extend(item.values())
        elif isinstance(item, list):
            if len(item) > MAX_LIST:
                raise ProtocolError(f"{name} has more than {MAX_LIST} entries")
            stack.extend(item)
        elif not isinstance(item, _PLAIN):
            raise ProtocolError(f"{name}: msgpack extension types are not allowed")


# The fields of each header that hold maps of anything, checked as msgpack's own limits did.
_PLAIN_MAPS: dict[type[_Header], tuple[str, ...]] = {
    Result: ("timings",), Ready: ("model_info", "loras"), Heartbeat: ("stats", "loras"),
    StatusReply: ("workers",),
}


def _check_semantics(header: _Header, payloads: Sequence[Any]) -> None:
    """Checks that the types cannot say: finite floats, payload counts, maps of anything."""
    if isinstance(header, Submit):
        _check_job(header.job)
        _check_frames("submit", [header.job], payloads)
    elif isinstance(header, Jobs):
        for spec in header.jobs:
            _check_job(spec)
        _check_frames("jobs", header.jobs, payloads)
    elif isinstance(header, Result) and len(header.images) != len(payloads):
        raise ProtocolError("result needs one payload frame per image")
    elif isinstance(header, Accepted) and not isinstance(header.work_ahead, UnsetType):
        _check_finite("accepted.work_ahead", header.work_ahead)
    elif isinstance(header, StatusReply) and isinstance(header.counters, BrokerCounters):
        _check_finite("status_reply.counters", header.counters.started)
    for name in _PLAIN_MAPS.get(type(header), ()):
        value = getattr(header, name)
        if value:
            _check_plain(f"{header.__struct_config__.tag}.{name}", value)


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


def submit(job: JobSpec, owner: str | None = None, inputs: Sequence[Any] = ()) -> list[Any]:
    """SUBMIT ``job``; ``inputs``: an edit's frames (``JobSpec.frames`` of them)."""
    return encode(MsgType.SUBMIT, {"job": job, "owner": owner}, inputs)


def jobs(specs: Sequence[JobSpec], incarnation: str | None = None,
         inputs: Sequence[Any] = ()) -> list[Any]:
    """JOBS: ``specs`` and, in their order, each one's input frames."""
    return encode(MsgType.JOBS, {"jobs": specs, "incarnation": incarnation}, inputs)


def failed(job_id: str, code: ErrorCode, message: str, *, retryable: bool = False,
           incarnation: str | None = None, retry_after: float | None = None) -> list[Any]:
    fields: dict[str, Any] = {"job_id": job_id, "code": code.value, "message": message,
                              "retryable": retryable}
    if incarnation is not None:
        fields["incarnation"] = incarnation
    if retry_after is not None:
        fields["retry_after"] = round(retry_after, 3)
    return encode(MsgType.FAILED, fields)


def result(job_id: str, images: Sequence[ImageInfo], payloads: Sequence[Any], *,
           timings: dict[str, float] | None = None, worker_id: str | None = None,
           warnings: Sequence[str] = ()) -> list[Any]:
    fields: dict[str, Any] = {"job_id": job_id, "images": images, "timings": timings or {},
                              "worker_id": worker_id}
    if warnings:
        fields["warnings"] = list(warnings)[:MAX_WARNINGS]
    return encode(MsgType.RESULT, fields, payloads)
