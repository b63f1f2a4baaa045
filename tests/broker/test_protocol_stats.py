"""broker.protocol's metrics fields: a worker's stats in HEARTBEAT, the broker's counters in
STATUS_REPLY. Round trips, old peers without them, and hostile values refused.

A heartbeat carries its stats as a plain map, read by WorkerStats.from_wire apart from the
heartbeat: stats the broker cannot read must cost the stats only, never the heartbeat."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import protocol
from broker.protocol import MAX_LIST, BrokerCounters, MsgType, ProtocolError, WorkerStats

FULL_STATS = WorkerStats(jobs_done=12, images_done=30, step_seconds=0.04,
                         images_per_second=2.5, batch_size=4, memory_used_bytes=7 << 30,
                         memory_total_bytes=80 << 30, utilization=0.93)
COUNTERS = BrokerCounters(started=1_790_000_000.5, dispatched={"tiny": 5},
                          requeued={"tiny": 1},
                          failed={"tiny": {"timeout": 2, "worker_lost": 1}})


def heartbeat(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "t": "heartbeat", **fields})


def status_reply(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "t": "status_reply", "workers": [], "queues": {}, **fields})


def test_a_heartbeats_stats_round_trip() -> None:
    msg = protocol.decode(protocol.encode(MsgType.HEARTBEAT,
                                          {"running": ["j1"], "stats": FULL_STATS}))
    assert WorkerStats.from_wire(msg["stats"]) == FULL_STATS
    assert msg["running"] == ["j1"]


def test_stats_not_measured_are_absent_on_the_wire_not_zero() -> None:
    stats = WorkerStats(jobs_done=3, images_done=5)
    (frame,) = protocol.encode(MsgType.HEARTBEAT, {"stats": stats})
    assert msgpack.unpackb(frame)["stats"] == {"jobs_done": 3, "images_done": 5}
    assert stats.to_wire() == {"jobs_done": 3, "images_done": 5}
    assert WorkerStats.from_wire(FULL_STATS.to_wire()) == FULL_STATS


def test_a_heartbeat_without_stats_still_decodes() -> None:
    # Workers from before stats, and the broker's own heartbeats.
    assert protocol.decode([heartbeat(running=[])]).fields == {"running": []}
    assert protocol.decode([heartbeat()]).fields == {}


def test_unknown_stats_fields_are_skipped() -> None:
    # A newer worker may measure more: this version keeps what it knows.
    msg = protocol.decode([heartbeat(stats={"jobs_done": 1, "images_done": 2,
                                            "power_watts": 300.0})])
    assert WorkerStats.from_wire(msg["stats"]) == WorkerStats(jobs_done=1, images_done=2)


def test_stats_of_a_worker_that_leaves_fields_out_are_read() -> None:
    assert WorkerStats.from_wire({"step_seconds": 0.5}) == WorkerStats(step_seconds=0.5)


def test_status_reply_counters_round_trip() -> None:
    msg = protocol.decode(protocol.encode(MsgType.STATUS_REPLY,
                                          {"workers": [], "queues": {}, "counters": COUNTERS}))
    assert msg["counters"] == COUNTERS


def test_a_status_reply_without_counters_still_decodes() -> None:
    assert "counters" not in protocol.decode([status_reply()]).fields


_GOOD = {"jobs_done": 1, "images_done": 1}


@pytest.mark.parametrize("stats", [
    {**_GOOD, "step_seconds": math.nan},
    {**_GOOD, "step_seconds": math.inf},
    {**_GOOD, "images_per_second": -math.inf},
    {**_GOOD, "images_per_second": -0.5},
    {**_GOOD, "utilization": 1.5},
    {**_GOOD, "utilization": math.nan},
    {**_GOOD, "utilization": -0.1},
    {**_GOOD, "batch_size": -1},
    {**_GOOD, "batch_size": 2.0},
    {**_GOOD, "memory_used_bytes": "lots"},
    {**_GOOD, "memory_total_bytes": True},
    {**_GOOD, "step_seconds": "0.1"},
    {**_GOOD, "step_seconds": True},
    {"jobs_done": -1, "images_done": 1},
])
def test_hostile_stats_are_refused_but_leave_the_heartbeat_readable(stats: Any) -> None:
    msg = protocol.decode([heartbeat(running=["j1"], stats=stats)])
    assert msg["running"] == ["j1"]
    with pytest.raises(ProtocolError):
        WorkerStats.from_wire(msg["stats"])


@pytest.mark.parametrize("stats", [[], "stats", None, {1: 2}])
def test_stats_that_are_not_a_map_make_the_heartbeat_a_protocol_error(stats: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode([heartbeat(stats=stats)])


def test_a_stats_map_over_the_list_cap_is_refused() -> None:
    many = {**_GOOD, **{f"field{i}": i for i in range(MAX_LIST + 1)}}
    with pytest.raises(ProtocolError):
        protocol.decode([heartbeat(stats=many)])


def test_stats_past_the_header_cap_are_refused() -> None:
    huge = {**_GOOD, "padding": "x" * protocol.MAX_HEADER_BYTES}
    with pytest.raises(ProtocolError):
        protocol.decode([heartbeat(stats=huge)])


@pytest.mark.parametrize("counters", [
    {"started": math.inf},
    {"started": math.nan},
    {"started": -1.0},
    {"started": "yesterday"},
    {},
    {"started": 1.0, "dispatched": {"tiny": -1}},
    {"started": 1.0, "dispatched": {"tiny": 1.5}},
    {"started": 1.0, "dispatched": {"tiny": True}},
    {"started": 1.0, "dispatched": {"m" * (protocol.MAX_STRING + 1): 1}},
    {"started": 1.0, "dispatched": {f"m{i}": 1 for i in range(MAX_LIST + 1)}},
    {"started": 1.0, "requeued": ["tiny"]},
    {"started": 1.0, "failed": {"tiny": 3}},
    {"started": 1.0, "failed": {"tiny": {"timeout": -2}}},
    {"started": 1.0, "failed": {f"m{i}": {} for i in range(MAX_LIST + 1)}},
    "counters",
])
def test_hostile_counters_make_the_status_reply_a_protocol_error(counters: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode([status_reply(counters=counters)])


def test_from_wire_refuses_what_decode_refuses() -> None:
    with pytest.raises(ProtocolError):
        WorkerStats.from_wire({**_GOOD, "step_seconds": math.inf})
    with pytest.raises(ProtocolError):
        WorkerStats.from_wire({"images_done": -1})


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_taken_only_when_finite_and_not_negative(value: float) -> None:
    frame = heartbeat(stats={**_GOOD, "step_seconds": value, "images_per_second": value})
    stats = protocol.decode([frame])["stats"]
    if math.isfinite(value) and value >= 0:
        assert WorkerStats.from_wire(stats).step_seconds == value
    else:
        with pytest.raises(ProtocolError):
            WorkerStats.from_wire(stats)
