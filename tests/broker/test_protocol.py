"""Tests for broker.protocol: encoding, decoding and rejecting malformed messages."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol
from broker.protocol import (
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_IMAGES,
    MAX_LIST,
    MAX_STRING,
    VERSION,
    ErrorCode,
    ImageInfo,
    JobSpec,
    Message,
    MsgType,
    ProtocolError,
)

FULL_SPEC = JobSpec(
    id="job-42", model="sdxl-turbo", prompt="a red fox in snow", width=1024, height=768,
    steps=4, seeds=(1, 2, 3), negative_prompt="blurry", guidance=3.5, output_format="webp",
    output_compression=80, timeout=120.0, user="alice", attempt=2,
)
MIN_SPEC = JobSpec(id="j", model="tiny", prompt="", width=8, height=8, steps=1, seeds=(0,))
IMAGES = [ImageInfo(seed=1, width=64, height=32, format="png"),
          ImageInfo(seed=2, width=64, height=32, format="png")]


def header(msg_type: str, **fields: Any) -> bytes:
    """Pack a header by hand, bypassing encode(), so tests can build invalid ones."""
    return msgpack.packb({"v": VERSION, "t": msg_type, **fields}, use_bin_type=True)


def job_map(**overrides: Any) -> dict[str, Any]:
    data = MIN_SPEC.to_wire()
    data.update(overrides)
    return data


# --------------------------------------------------------------------------------------------
# Round trips

# One valid message of every type: (type, header fields, payload frames).
EVERY_TYPE: list[tuple[MsgType, dict[str, Any], list[bytes]]] = [
    (MsgType.SUBMIT, {"job": FULL_SPEC.to_wire()}, []),
    (MsgType.CANCEL, {"job_id": "job-42"}, []),
    (MsgType.STATUS, {}, []),
    (MsgType.WATCH, {"job_id": "job-42"}, []),
    (MsgType.ACCEPTED, {"job_id": "job-42", "position": 3}, []),
    (MsgType.STATUS_REPLY, {"workers": [{"worker_id": "w1", "running": ["a"]}],
                            "queues": {"tiny": 2}}, []),
    (MsgType.PROGRESS, {"job_id": "job-42", "step": 2, "steps": 4, "image_index": 0},
     [b"\x89PNG preview"]),
    (MsgType.RESULT, {"job_id": "job-42", "images": [
        {"seed": 1, "width": 64, "height": 32, "format": "png"}],
        "timings": {"generate_s": 1.5}, "worker_id": "w1"}, [b"\x89PNG\r\n\x1a\n\x00\xff"]),
    (MsgType.FAILED, {"job_id": "job-42", "code": "worker_error", "message": "oom",
                      "retryable": True}, []),
    (MsgType.READY, {"worker_id": "w1", "host": "h", "device": "cuda:0", "models": ["tiny"],
                     "max_batch": 4, "capacity": 2, "version": "0.1.0",
                     "model_info": {"tiny": {"max_steps": 50}}}, []),
    (MsgType.HEARTBEAT, {"running": ["job-1"]}, []),
    (MsgType.BYE, {}, []),
    (MsgType.JOBS, {"jobs": [FULL_SPEC.to_wire(), MIN_SPEC.to_wire()]}, []),
    (MsgType.RECONNECT, {}, []),
]


def test_every_type_is_covered() -> None:
    assert {t for t, _, _ in EVERY_TYPE} == set(MsgType)


@pytest.mark.parametrize(("msg_type", "fields", "payloads"), EVERY_TYPE,
                         ids=[t.value for t, _, _ in EVERY_TYPE])
def test_round_trip_every_type(msg_type: MsgType, fields: dict[str, Any],
                               payloads: list[bytes]) -> None:
    frames = protocol.encode(msg_type, fields, payloads)
    assert len(frames) == 1 + len(payloads)
    msg = protocol.decode(frames)
    assert msg.type is msg_type
    assert list(msg.payloads) == payloads
    # Nested records come back as objects; everything else exactly as sent.
    expected = dict(fields)
    if msg_type is MsgType.SUBMIT:
        expected["job"] = FULL_SPEC
    elif msg_type is MsgType.JOBS:
        expected["jobs"] = [FULL_SPEC, MIN_SPEC]
    elif msg_type is MsgType.RESULT:
        expected["images"] = [ImageInfo(seed=1, width=64, height=32, format="png")]
    assert msg.fields == expected


def test_round_trip_through_zmq_frames() -> None:
    """decode() takes zmq.Frame objects (copy=False receives) as well as bytes."""
    frames = protocol.result("j", IMAGES, [b"one", b"two"])
    msg = protocol.decode([zmq.Frame(f) for f in frames])
    assert msg.type is MsgType.RESULT
    assert [p.bytes for p in msg.payloads] == [b"one", b"two"]


def test_submit_constructor() -> None:
    msg = protocol.decode(protocol.submit(FULL_SPEC))
    assert msg.type is MsgType.SUBMIT
    assert msg["job"] == FULL_SPEC
    assert msg["job"].n == 3


def test_jobs_constructor() -> None:
    msg = protocol.decode(protocol.jobs([MIN_SPEC, FULL_SPEC]))
    assert msg.type is MsgType.JOBS
    assert msg["jobs"] == [MIN_SPEC, FULL_SPEC]


def test_failed_constructor() -> None:
    msg = protocol.decode(protocol.failed("j", ErrorCode.QUEUE_FULL, "full", retryable=True))
    assert msg.type is MsgType.FAILED
    assert msg.fields == {"job_id": "j", "code": "queue_full", "message": "full",
                          "retryable": True}


def test_failed_retryable_defaults_to_false() -> None:
    msg = protocol.decode([header("failed", job_id="j", code="timeout", message="late")])
    assert msg["retryable"] is False


def test_result_constructor_keeps_payloads_and_order() -> None:
    payloads = [bytes(range(256)) * 4, b"\x00" * 10]
    frames = protocol.result("j", IMAGES, payloads, timings={"generate_s": 0.5},
                             worker_id="w7")
    msg = protocol.decode(frames)
    assert msg.type is MsgType.RESULT
    assert msg["images"] == IMAGES
    assert list(msg.payloads) == payloads
    assert msg["timings"] == {"generate_s": 0.5}
    assert msg["worker_id"] == "w7"


def test_message_accessors() -> None:
    msg = protocol.decode(protocol.encode(MsgType.CANCEL, {"job_id": "x"}))
    assert isinstance(msg, Message)
    assert msg["job_id"] == "x"
    assert msg.get("missing", 5) == 5


def test_jobspec_wire_round_trip() -> None:
    for spec in (FULL_SPEC, MIN_SPEC):
        wire = spec.to_wire()
        assert isinstance(wire["seeds"], list)
        assert JobSpec.from_wire(wire) == spec
        assert JobSpec.from_wire(msgpack.unpackb(msgpack.packb(wire))) == spec


def test_jobspec_integer_guidance_becomes_float() -> None:
    spec = JobSpec.from_wire(job_map(guidance=7, timeout=30))
    assert spec.guidance == 7.0 and isinstance(spec.guidance, float)
    assert spec.timeout == 30.0 and isinstance(spec.timeout, float)


def test_batch_key_ignores_prompt_and_seeds() -> None:
    other = JobSpec(**{**FULL_SPEC.to_wire(), "seeds": (9,), "prompt": "x", "id": "other"})
    assert other.batch_key() == FULL_SPEC.batch_key()
    bigger = JobSpec(**{**FULL_SPEC.to_wire(), "seeds": (9,), "width": 512})
    assert bigger.batch_key() != FULL_SPEC.batch_key()


# --------------------------------------------------------------------------------------------
# Forward compatibility


def test_unknown_header_fields_are_ignored() -> None:
    msg = protocol.decode([header("cancel", job_id="j", future_field={"a": [1, 2]})])
    assert msg.fields == {"job_id": "j"}


def test_unknown_job_fields_are_ignored() -> None:
    msg = protocol.decode([header("submit", job=job_map(lora="x", nsfw_filter=3))])
    assert msg["job"] == MIN_SPEC


def test_unknown_image_fields_are_ignored() -> None:
    image = {"seed": 1, "width": 2, "height": 3, "format": "png", "nsfw": False}
    msg = protocol.decode([header("result", job_id="j", images=[image]), b"x"])
    assert msg["images"] == [ImageInfo(seed=1, width=2, height=3, format="png")]


def test_optional_fields_may_be_absent() -> None:
    ready = protocol.decode([header("ready", worker_id="w", host="h", device="cpu",
                                    models=["tiny"])])
    assert ready.get("capacity") is None and ready.get("max_batch") is None
    minimal = {"id": "j", "model": "m", "prompt": "p", "width": 8, "height": 8, "steps": 1,
               "seeds": [5]}
    spec = JobSpec.from_wire(minimal)
    assert (spec.guidance, spec.timeout, spec.attempt, spec.output_format) == \
        (None, 300.0, 0, "png")


# --------------------------------------------------------------------------------------------
# Rejection


def rejects(frames: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(frames)


@pytest.mark.parametrize("version", [0, 2, -1, None, "1", 1.0, True, [1]])
def test_rejects_wrong_version(version: Any) -> None:
    rejects([msgpack.packb({"v": version, "t": "status"})])


def test_rejects_missing_version() -> None:
    rejects([msgpack.packb({"t": "status"})])


@pytest.mark.parametrize("msg_type", ["nope", "SUBMIT", "", None, 1, b"status", ["status"]])
def test_rejects_unknown_type(msg_type: Any) -> None:
    rejects([msgpack.packb({"v": VERSION, "t": msg_type}, use_bin_type=True)])


@pytest.mark.parametrize(("msg_type", "fields"), [
    ("submit", {}),
    ("cancel", {}),
    ("accepted", {"job_id": "j"}),
    ("progress", {"job_id": "j", "step": 1}),
    ("result", {"images": []}),
    ("failed", {"job_id": "j", "code": "x"}),
    ("ready", {"worker_id": "w", "host": "h", "models": ["m"]}),
    ("jobs", {}),
    ("status_reply", {"workers": []}),
])
def test_rejects_missing_required_field(msg_type: str, fields: dict[str, Any]) -> None:
    rejects([header(msg_type, **fields)])


@pytest.mark.parametrize("missing", ["id", "model", "prompt", "width", "height", "steps",
                                     "seeds"])
def test_rejects_job_missing_required_field(missing: str) -> None:
    data = job_map()
    del data[missing]
    rejects([header("submit", job=data)])


@pytest.mark.parametrize(("field", "value"), [
    ("width", True), ("height", False), ("steps", "4"), ("width", 64.0), ("id", 5),
    ("prompt", None), ("seeds", 5), ("seeds", [True]), ("seeds", ["1"]), ("seeds", [1.5]),
    ("guidance", "7"), ("guidance", True), ("timeout", "30"), ("timeout", None),
    ("attempt", True), ("output_compression", 80.0), ("negative_prompt", 3), ("user", b"u"),
])
def test_rejects_job_field_of_wrong_type(field: str, value: Any) -> None:
    rejects([header("submit", job=job_map(**{field: value}))])


@pytest.mark.parametrize(("msg_type", "fields", "payloads"), [
    ("accepted", {"job_id": "j", "position": True}, []),
    ("accepted", {"job_id": "j", "position": "0"}, []),
    ("accepted", {"job_id": 1, "position": 0}, []),
    ("progress", {"job_id": "j", "step": "1", "steps": 2}, []),
    ("progress", {"job_id": "j", "step": 1, "steps": False}, []),
    ("failed", {"job_id": "j", "code": "x", "message": "m", "retryable": 1}, []),
    ("ready", {"worker_id": "w", "host": "h", "device": "d", "models": ["m"],
               "capacity": True}, []),
    ("ready", {"worker_id": "w", "host": "h", "device": "d", "models": "m"}, []),
    ("submit", {"job": [1, 2]}, []),
    ("jobs", {"jobs": {"a": 1}}, []),
    ("status_reply", {"workers": {}, "queues": {}}, []),
    ("heartbeat", {"running": "j"}, []),
    ("result", {"job_id": "j", "images": [{"seed": "1", "width": 1, "height": 1,
                                           "format": "png"}]}, [b"x"]),
    ("result", {"job_id": "j", "images": ["png"]}, [b"x"]),
])
def test_rejects_field_of_wrong_type(msg_type: str, fields: dict[str, Any],
                                     payloads: list[bytes]) -> None:
    rejects([header(msg_type, **fields), *payloads])


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("field", ["width", "height", "steps"])
def test_rejects_non_positive_job_sizes(field: str, value: int) -> None:
    rejects([header("submit", job=job_map(**{field: value}))])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["timeout", "guidance"])
def test_rejects_non_finite_job_numbers(field: str, value: float) -> None:
    # A NaN deadline would sit at the top of the broker's deadline heap and stop every
    # other job from ever timing out.
    rejects([header("submit", job=job_map(**{field: value}))])


@pytest.mark.parametrize("value", [0, -5.0])
def test_rejects_non_positive_timeout(value: float) -> None:
    rejects([header("submit", job=job_map(timeout=value))])


@pytest.mark.parametrize("seeds", [[], list(range(MAX_IMAGES + 1))])
def test_rejects_seed_count_out_of_range(seeds: list[int]) -> None:
    rejects([header("submit", job=job_map(seeds=seeds))])


def test_accepts_max_images_seeds() -> None:
    spec = protocol.decode([header("submit", job=job_map(seeds=list(range(MAX_IMAGES))))])["job"]
    assert spec.n == MAX_IMAGES


def test_rejects_no_frames_and_too_many_frames() -> None:
    rejects([])
    rejects([header("status")] + [b""] * MAX_FRAMES)
    rejects([header("status")] * 2000)


@pytest.mark.parametrize(("msg_type", "fields", "count"), [
    ("status", {}, 1),
    ("cancel", {"job_id": "j"}, 1),
    ("submit", {"job": job_map()}, 1),
    ("progress", {"job_id": "j", "step": 1, "steps": 2}, 2),
    ("heartbeat", {}, 1),
    ("ready", {"worker_id": "w", "host": "h", "device": "d", "models": ["m"]}, 1),
])
def test_rejects_too_many_payload_frames(msg_type: str, fields: dict[str, Any],
                                         count: int) -> None:
    rejects([header(msg_type, **fields)] + [b"p"] * count)


def image(seed: int) -> dict[str, Any]:
    return {"seed": seed, "width": 8, "height": 8, "format": "png"}


def test_result_needs_one_payload_per_image() -> None:
    one = [image(1)]
    two = [image(1), image(2)]
    rejects([header("result", job_id="j", images=one)])  # no payload
    rejects([header("result", job_id="j", images=one), b"a", b"b"])  # one too many
    rejects([header("result", job_id="j", images=two), b"a"])  # one too few
    rejects([header("result", job_id="j", images=[])])  # an answer with no image
    msg = protocol.decode([header("result", job_id="j", images=two), b"a", b"b"])
    assert list(msg.payloads) == [b"a", b"b"]


@pytest.mark.parametrize("value", [[1, 2], "status", 1, None, b"\x81"])
def test_rejects_header_that_is_not_a_map(value: Any) -> None:
    rejects([msgpack.packb(value, use_bin_type=True)])


def test_rejects_truncated_msgpack() -> None:
    full = protocol.submit(FULL_SPEC)[0]
    for cut in (1, len(full) // 2, len(full) - 1):
        rejects([full[:cut]])


def test_rejects_trailing_bytes_after_header() -> None:
    rejects([protocol.encode(MsgType.STATUS)[0] + b"\x00"])


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\xff" * 10, b"\x00\x01\x02",
                                 b"GET / HTTP/1.1\r\n\r\n"])
def test_rejects_random_bytes(raw: bytes) -> None:
    rejects([raw])


def test_rejects_ext_type() -> None:
    rejects([header("cancel", job_id=msgpack.ExtType(1, b""))])
    rejects([header("ready", worker_id="w", host="h", device="d", models=["m"],
                    model_info={"m": [msgpack.ExtType(5, b"abc")]})])


def test_rejects_timestamp_ext_type() -> None:
    # Extension -1 is a Timestamp: decoded as a datetime where a field takes anything.
    rejects([header("result", job_id="j", images=[image(1)],
                    timings={"at": msgpack.Timestamp(5, 0)}), b"x"])
    rejects([header("status_reply", workers=[{"at": msgpack.Timestamp(5, 0)}], queues={})])


def test_unknown_fields_are_skipped_unread() -> None:
    # Nothing in an unknown field is decoded or kept, so nothing in it can do harm.
    for odd in (msgpack.ExtType(5, b"abc"), msgpack.Timestamp(5, 0),
                list(range(MAX_LIST + 1)), {5: "x"}):
        assert protocol.decode([header("cancel", job_id="j", x=odd)]).fields == {"job_id": "j"}


def test_rejects_nesting_too_deep_even_in_unknown_fields() -> None:
    rejects([header("status")[:-1] + b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0"])


def test_rejects_non_string_map_keys() -> None:
    rejects([msgpack.packb({"v": VERSION, "t": "status", 5: "x"})])


def test_rejects_oversized_header() -> None:
    big = header("cancel", job_id="j", pad="x" * MAX_HEADER_BYTES)
    assert len(big) > MAX_HEADER_BYTES
    rejects([big])


def test_rejects_strings_over_max_string() -> None:
    rejects([header("failed", job_id="j", code="c", message="m" * (MAX_STRING + 1))])
    rejects([header("submit", job=job_map(prompt="p" * (MAX_STRING + 1)))])
    assert protocol.decode([header("failed", job_id="j", code="c", message="m" * MAX_STRING)]
                           )["message"] == "m" * MAX_STRING


@pytest.mark.parametrize("frame", [
    header("cancel", job_id="j" * (protocol.MAX_ID + 1)),
    header("cancel", job_id="j", owner="o" * (protocol.MAX_ID + 1)),
    header("heartbeat", incarnation="i" * (protocol.MAX_ID + 1)),
    header("submit", job=job_map(id="j" * (protocol.MAX_ID + 1))),
    header("heartbeat", running=["j" * (protocol.MAX_ID + 1)]),
    header("heartbeat", running=[7]),
])
def test_rejects_ids_over_max_id(frame: bytes) -> None:
    rejects([frame])


@pytest.mark.parametrize("fields", [
    {"max_batch": protocol.MAX_BATCH + 1, "capacity": 1},
    {"max_batch": 2, "capacity": 0},
    {"held": ["j", 5]},
])
def test_rejects_ready_that_would_hoard_jobs(fields: dict[str, Any]) -> None:
    rejects([header("ready", worker_id="w", host="h", device="cpu", models=["tiny"],
                    **fields)])


@pytest.mark.parametrize("seed", [-1, protocol.MAX_SEED + 1])
def test_rejects_seeds_outside_the_documented_range(seed: int) -> None:
    rejects([header("submit", job=job_map(seeds=[seed]))])


@pytest.mark.parametrize(("frame", "name"), [
    (header("submit", job=job_map(seeds=[-1])), "job.seeds"),
    (header("submit", job=job_map(width=0)), "job.width"),
    (header("cancel", job_id="j" * (protocol.MAX_ID + 1)), "job_id"),
    (header("ready", worker_id="w", host="h", device="d", models=["m"], max_batch=99),
     "max_batch"),
])
def test_rejection_names_the_field(frame: bytes, name: str) -> None:
    with pytest.raises(ProtocolError, match=name.replace(".", r"\.")):
        protocol.decode([frame])


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb"])
def test_encoding_a_string_that_is_not_unicode_raises_protocol_error(text: str) -> None:
    # A lone surrogate cannot be UTF-8: the one message is refused, nothing else breaks.
    with pytest.raises(ProtocolError):
        protocol.encode(MsgType.SUBMIT, {"job": job_map(prompt=text)})
    with pytest.raises(ProtocolError):
        protocol.encode(MsgType.STATUS, {"pad": 2**64})


def test_rejects_lists_over_max_list() -> None:
    rejects([header("heartbeat", running=["j"] * (MAX_LIST + 1))])
    rejects([header("result", job_id="j", images=[image(1)],
                    timings={"x": list(range(MAX_LIST + 1))}), b"x"])  # at any depth
    assert len(protocol.decode([header("heartbeat", running=["j"] * MAX_LIST)])["running"]) \
        == MAX_LIST


@pytest.mark.parametrize("models", [[], [""], [1], ["tiny", None]])
def test_rejects_ready_with_bad_models(models: list[Any]) -> None:
    rejects([header("ready", worker_id="w", host="h", device="d", models=models)])


@pytest.mark.parametrize("field", ["capacity", "max_batch"])
def test_rejects_ready_with_zero_capacity(field: str) -> None:
    rejects([header("ready", worker_id="w", host="h", device="d", models=["m"],
                    **{field: 0})])


def test_rejects_jobs_with_empty_list() -> None:
    rejects([header("jobs", jobs=[])])


def test_rejects_jobs_with_an_invalid_job() -> None:
    rejects([header("jobs", jobs=[job_map(), job_map(width=0)])])


# --------------------------------------------------------------------------------------------
# Properties

_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_leaf = st.none() | st.booleans() | _ints | st.floats() | st.text(max_size=20) \
    | st.binary(max_size=20)
_values = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(sorted(
    {"job", "job_id", "position", "workers", "queues", "step", "steps", "image_index",
     "images", "timings", "worker_id", "code", "message", "retryable", "host", "device",
     "models", "max_batch", "capacity", "version", "model_info", "running", "jobs"}))
# Headers that get past the envelope checks, so the per-type validation is what gets fuzzed.
_headers = st.builds(
    lambda t, fields, v: {**fields, "v": v, "t": t},
    st.sampled_from([t.value for t in MsgType]),
    st.dictionaries(_field_names, _values | st.just(job_map()) | st.just([job_map()])
                    | st.just([image(1)]), max_size=6),
    st.just(VERSION) | _values,
)


def decodes_or_rejects(frames: list[Any]) -> None:
    try:
        msg = protocol.decode(frames)
    except ProtocolError:
        return
    assert isinstance(msg, Message)
    assert isinstance(msg.type, MsgType)


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_protocol_error(raw: bytes) -> None:
    decodes_or_rejects([raw])


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=MAX_FRAMES + 3))
def test_arbitrary_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    decodes_or_rejects(frames)


@FUZZ
@given(_headers, st.lists(st.binary(max_size=8), max_size=3))
def test_arbitrary_headers_decode_or_raise_protocol_error(
        head: dict[str, Any], payloads: list[bytes]) -> None:
    decodes_or_rejects([msgpack.packb(head, use_bin_type=True), *payloads])


_text = st.text(max_size=40)
_positive = st.integers(min_value=1, max_value=2**31)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_specs = st.builds(
    JobSpec,
    id=_text, model=_text, prompt=st.text(max_size=200), width=_positive, height=_positive,
    steps=_positive,
    seeds=st.lists(st.integers(min_value=0, max_value=protocol.MAX_SEED), min_size=1,
                   max_size=MAX_IMAGES).map(tuple),
    negative_prompt=st.none() | _text,
    guidance=st.none() | _finite,
    output_format=st.sampled_from(["png", "jpeg", "webp"]),
    output_compression=st.none() | st.integers(min_value=0, max_value=100),
    timeout=st.floats(min_value=1e-3, max_value=1e9),
    user=st.none() | _text,
    attempt=st.integers(min_value=0, max_value=100),
)


@settings(max_examples=200, deadline=None)
@given(_specs)
def test_valid_jobspecs_round_trip(spec: JobSpec) -> None:
    assert JobSpec.from_wire(spec.to_wire()) == spec
    assert protocol.decode(protocol.submit(spec))["job"] == spec
    assert protocol.decode(protocol.jobs([spec, spec]))["jobs"] == [spec, spec]


@pytest.mark.parametrize("fields", [
    {"workers": [5], "queues": {}},
    {"workers": [{"worker_id": "w"}, "x"], "queues": {}},
    {"workers": [], "queues": {"tiny": "3"}},
    {"workers": [], "queues": {"tiny": True}},
])
def test_status_reply_with_malformed_entries_is_rejected(fields: dict) -> None:
    # A frontend stores the reply and reads every entry: garbage must stop at the decoder.
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode(MsgType.STATUS_REPLY, fields))


def test_jobspec_fair_sharing_fields_round_trip_and_default() -> None:
    spec = JobSpec(id="j", model="tiny", prompt="", width=8, height=8, steps=1, seeds=(0,),
                   tenant="alice", weight=2.5)
    msg = protocol.decode(protocol.submit(spec))
    assert (msg["job"].tenant, msg["job"].weight) == ("alice", 2.5)
    # An old frontend sends neither: the anonymous identity, weight 1.
    old = protocol.decode([header("submit", job=job_map())])
    assert (old["job"].tenant, old["job"].weight) == (None, 1.0)


@pytest.mark.parametrize("fields", [
    {"weight": 0}, {"weight": -1.0}, {"weight": math.nan}, {"weight": math.inf},
    {"weight": 1000.5}, {"weight": 0.0001}, {"weight": True}, {"weight": "2"},
    {"tenant": "x" * 129}, {"tenant": 7},
])
def test_rejects_bad_fair_sharing_fields(fields: dict[str, Any]) -> None:
    rejects([header("submit", job=job_map(**fields))])
