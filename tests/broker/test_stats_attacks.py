"""A lying worker's stats (issue 14): hostile HEARTBEAT stats must be dropped, never crash the
broker or poison its STATUS_REPLY, and the reply must stay decodable with many workers.
A real Broker on real sockets, fake workers speaking broker/protocol.py."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import protocol
from broker.protocol import MAX_HEADER_BYTES, Message, MsgType, ProtocolError, WorkerStats
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker

pytestmark = pytest.mark.timeout(60)

GOOD = WorkerStats(jobs_done=3, images_done=5, step_seconds=0.25, utilization=0.5)


def status(client: FakeClient) -> Message:
    client.send_msg(MsgType.STATUS)
    return client.expect(MsgType.STATUS_REPLY)


def raw_heartbeat(stats: Any) -> list[bytes]:
    """A HEARTBEAT header packed by hand: msgspec would refuse to build most of these."""
    return [msgspec.msgpack.encode({"v": protocol.VERSION, "t": MsgType.HEARTBEAT.value,
                                    "running": [], "stats": stats})]


HOSTILE: list[Any] = [
    {"jobs_done": 1, "images_done": 1, "step_seconds": math.nan},
    {"jobs_done": 1, "images_done": 1, "step_seconds": math.inf},
    {"jobs_done": 1, "images_done": 1, "images_per_second": -math.inf},
    {"jobs_done": -1, "images_done": 1},
    {"jobs_done": 1, "images_done": -(2 ** 63)},
    {"jobs_done": 1, "images_done": 1, "utilization": 1.5},
    {"jobs_done": 1, "images_done": 1, "utilization": -0.01},
    {"jobs_done": 1, "images_done": 1, "utilization": math.nan},
    {"jobs_done": 1, "images_done": 1, "memory_used_bytes": -5},
    {"jobs_done": "1", "images_done": 1},
    {"jobs_done": 1.5, "images_done": 1},
    {"jobs_done": True, "images_done": 1},
    {"jobs_done": None, "images_done": 1},
    {"jobs_done": 1, "images_done": 1, "batch_size": [1, 2]},
    {"jobs_done": 1, "images_done": 1, "step_seconds": "fast"},
    {"jobs_done": 1, "images_done": 1, "step_seconds": {"a": 1}},
    [1, 2, 3],
    "stats",
    42,
    b"\xff\xfe",
]


@pytest.mark.parametrize("stats", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_stats_are_dropped_never_exported(harness: BrokerHarness,
                                                                 stats: Any) -> None:
    worker = harness.worker("liar")
    with harness.consumes(workers=1):
        worker.send_msg(MsgType.HEARTBEAT, {"running": [], "stats": GOOD})
    with harness.consumes(workers=1):
        worker.send(raw_heartbeat(stats))
    client = harness.client()
    reply = status(client)  # the broker still answers: it did not crash
    (entry,) = reply["workers"]  # the worker is still registered
    # Refused stats are never exported: none at all, or the last good ones.
    assert entry.get("stats") in (None, GOOD.to_wire()), entry.get("stats")
    if "stats" in entry:
        WorkerStats.from_wire(entry["stats"])


def test_huge_but_legal_counts_survive_the_round_trip(harness: BrokerHarness) -> None:
    """msgpack's largest unsigned int (2**64-1) is a legal Count: the broker must keep it and
    still encode its STATUS_REPLY."""
    worker = harness.worker("big")
    huge = {"jobs_done": 2 ** 64 - 1, "images_done": 2 ** 64 - 1,
            "memory_used_bytes": 2 ** 64 - 1, "memory_total_bytes": 2 ** 64 - 1,
            "batch_size": 2 ** 64 - 1, "step_seconds": 1e308, "images_per_second": 1e308,
            "utilization": 1.0}
    with harness.consumes(workers=1):
        worker.send(raw_heartbeat(huge))
    (entry,) = status(harness.client())["workers"]
    assert entry["stats"]["jobs_done"] == 2 ** 64 - 1


def test_an_int_past_64_bits_cannot_even_be_sent() -> None:
    """2**64 is not msgpack: a lying worker cannot get it to the broker at all."""
    with pytest.raises(ProtocolError):
        protocol.encode(MsgType.HEARTBEAT, {"running": [], "stats": {"jobs_done": 2 ** 64,
                                                                      "images_done": 0}})


def test_status_reply_with_many_workers_with_stats_stays_under_the_header_limit(
        harness: BrokerHarness) -> None:
    """Every worker's stats add ~190 bytes to its STATUS_REPLY entry: with stats some 690
    workers pass MAX_HEADER_BYTES, and a reply over it is refused by every frontend, which
    then reports the broker down (dc_broker_up 0, /v1/cluster empty) while the cluster works.
    The broker keeps its reply decodable: past the limit, without the stats."""
    n = 720
    stats = WorkerStats(jobs_done=2 ** 40, images_done=2 ** 40, step_seconds=0.123456789,
                        images_per_second=12.3456789, batch_size=8,
                        memory_used_bytes=80 * 2 ** 30, memory_total_bytes=141 * 2 ** 30,
                        utilization=0.987654321)
    workers: list[FakeWorker] = []
    for i in range(n):
        peer = harness.raw_worker(f"gpu-{i:05d}-worker-0".encode())
        peer.ready(f"gpu-{i:05d}-worker-0", models=("tiny",), max_batch=4, capacity=8)
        workers.append(peer)
    harness.wait_for(lambda: len(list(harness.broker.workers)) == n, timeout=30)
    with harness.consumes(workers=n):
        for peer in workers:
            peer.send_msg(MsgType.HEARTBEAT, {"running": [], "stats": stats})
    client = harness.client()
    client.send_msg(MsgType.STATUS)
    frames: list[bytes] = []
    harness.wait_for(lambda: bool(client.sock.poll(0)) or harness.pump() or False, timeout=10)
    frames = client.sock.recv_multipart()
    assert len(frames[0]) <= MAX_HEADER_BYTES, (
        f"STATUS_REPLY for {n} workers with stats is {len(frames[0])} bytes, over "
        f"MAX_HEADER_BYTES={MAX_HEADER_BYTES}: frontends refuse it and see the broker down")
    reply = protocol.decode(frames)
    assert len(reply["workers"]) == n  # all listed, without their stats
    assert not any("stats" in worker for worker in reply["workers"])


LABEL_BREAKERS = [
    'quote"worker', "back\\slash", "new\nline", "cr\rlf", "tab\tworker", "{brace}",
    "a=b,c=\"d\"", "# HELP fake", "é中文😀", "\u2028sep", "\x00nul", "",
]


def test_metrics_parse_with_hostile_worker_ids_and_models(harness: BrokerHarness) -> None:
    """Worker ids and model names are label values: they must be escaped so that GET /metrics
    still parses (the frontend's families, fed the broker's real reply)."""
    from http_frontend.metrics import _worker_families, _worker_models
    for i, name in enumerate(LABEL_BREAKERS):
        peer = harness.raw_worker(f"id-{i}".encode())
        peer.ready(name, models=(name or "x", "m" + name))
        harness.wait_for(lambda i=i: len(list(harness.broker.workers)) == i + 1)
        with harness.consumes(workers=1):
            peer.send_msg(MsgType.HEARTBEAT, {"running": [], "stats": GOOD})
    reply = status(harness.client())
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    class Fixed(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return iter(_worker_families(reply["workers"]))

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    assert list(_worker_models(reply["workers"]))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ids = {s.labels["worker"] for s in families["dc_worker_step_seconds"].samples}
    assert ids == set(LABEL_BREAKERS)


def test_a_worker_id_cannot_forge_broker_text_lines(harness: BrokerHarness) -> None:
    """The broker logs "job %s dispatched to worker %s" once per job, with the worker's own
    READY worker_id: a worker named "w\\n<timestamp> broker ERROR ..." must not forge a
    broker log line on every job it takes (broker.logs.TextFormatter escapes it)."""
    import io
    import logging

    from broker import logs
    from tests.broker.fakes import make_spec
    forged = "w\n2026-11-30 00:00:00,000 broker ERROR forged line"
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.TextFormatter(logs._text_format("broker")))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        peer = harness.raw_worker(b"liar")
        peer.ready(forged)
        harness.wait_for(lambda: harness.broker.workers.get(b"liar") is not None)
        client = harness.client()
        client.submit(make_spec("job-forged-id"))
        peer.take()
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    lines = out.getvalue().splitlines()
    assert not [line for line in lines if line.startswith("2026-11-30 00:00:00,000")], lines


def test_get_metrics_parses_whatever_a_lying_broker_reports() -> None:
    """GET /metrics on a real app, its broker status full of hostile entries (as a broker of
    another version, or a lying one, could send them): the exposition must still parse."""
    import time

    import falcon.testing

    from broker.protocol import BrokerCounters
    from http_frontend.app import FrontendConfig, create_app
    from http_frontend.broker_client import ClusterStatus
    from tests.http_frontend.test_app import FakeBroker

    good = GOOD.to_wire()
    workers: list[dict[str, Any]] = []
    for name in LABEL_BREAKERS:
        workers.append({"worker_id": name, "models": [name or "x"], "state": name or "ready",
                        "stats": good})
    workers += [
        {"worker_id": "nan", "models": ["tiny"], "state": "ready",
         "stats": {"jobs_done": 1, "images_done": 1, "step_seconds": math.nan}},
        {"worker_id": "inf", "models": ["tiny"], "state": "ready",
         "stats": {"jobs_done": 1, "images_done": 1, "images_per_second": math.inf}},
        {"worker_id": "neg", "models": ["tiny"], "state": "ready",
         "stats": {"jobs_done": -1, "images_done": 1}},
        {"worker_id": "huge", "models": ["tiny"], "state": "ready",
         "stats": {"jobs_done": 2 ** 64 - 1, "images_done": 2 ** 64 - 1, "utilization": 1.0}},
        {"worker_id": "types", "models": [1, None], "state": 3, "stats": "x"},
        {"worker_id": 7, "models": "tiny", "stats": [1]},
        {"models": [], "stats": good},
        {"worker_id": "nomodel", "models": [], "stats": good},
    ]
    workers += [{"worker_id": f"w{i}", "models": ["tiny"], "state": "ready", "stats": good}
                for i in range(1000)]
    counters = BrokerCounters(
        started=time.time(), dispatched={name or "x": 2 ** 64 - 1 for name in LABEL_BREAKERS},
        requeued={"tiny": 1}, failed={"tiny\n": {"made_up_code": 3, "timeout": 2},
                                      'q"': {"worker_lost": 1}})
    broker = FakeBroker(workers)
    broker.status = lambda: ClusterStatus(workers, {"tiny": 0, 'a"\n\\': 5}, time.monotonic(),
                                          round_trip=0.01, counters=counters)
    client = falcon.testing.TestClient(create_app(FrontendConfig(), broker))
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(result.text)}
    assert "dc_broker_up" in families and "dc_worker_step_seconds" in families
    seen = {s.labels["worker"] for s in families["dc_worker_step_seconds"].samples}
    assert "nan" not in seen and "inf" not in seen  # refused stats: no sample
    assert len(seen) == 1000 + len([n for n in LABEL_BREAKERS])
    values = [s.value for f in families.values() for s in f.samples]
    assert all(math.isfinite(v) for v in values
               if not (isinstance(v, float) and v == math.inf)), "a NaN reached /metrics"
