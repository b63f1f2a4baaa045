"""GET /metrics in-process: each counter and histogram moves by exactly what happened."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from prometheus_client import Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from broker import protocol
from broker.protocol import BrokerCounters, ErrorCode, IdentityLoad, JobSpec, Message, MsgType
from http_frontend.__main__ import load_metrics_token, parse_args
from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import ApiKey
from http_frontend.broker_client import BrokerClient, ClusterStatus
from http_frontend.errors import UNKNOWN_FAILURE
from http_frontend.pending import PendingJob
from http_frontend.service import ServiceConfig
from tests.http_frontend.test_app import FakeBroker, worker
from tests.http_frontend.test_history import Frontend, make_frontend, make_history

GENERATIONS = "/v1/images/generations"
FOX = {"prompt": "a fox", "size": "64x64"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class SteppingBroker(FakeBroker):
    """FakeBroker whose workers report a step before they answer."""

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: tuple[bytes, ...] = ()) -> PendingJob:
        if self.fail_with is not None or self.silent:
            return super().submit(job, owner=owner)
        self.submitted.append(job)
        pending = PendingJob(job.id, job)
        pending.update(Message(MsgType.ACCEPTED, {"job_id": job.id, "position": 0}))
        pending.update(Message(MsgType.PROGRESS, {"job_id": job.id, "step": 1, "steps": 2}))
        time.sleep(0.01)  # so the generation takes a measurable time
        pending.update(self._answer(job))
        return pending


@pytest.fixture
def frontend(tmp_path: Path) -> Iterator[Frontend]:
    history = make_history(tmp_path)
    yield make_frontend(SteppingBroker(), history)
    history.close()


def scrape(client: falcon.testing.TestClient, **kwargs: Any) -> Samples:
    result = client.simulate_get("/metrics", **kwargs)
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == CONTENT_TYPE_LATEST
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(result.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def requests(route: str, method: str, status: int) -> dict[str, str]:
    return {"route": route, "method": method, "status": str(status)}


def test_generations_and_failures_move_each_metric_by_exactly_what_happened(
        frontend: Frontend) -> None:
    client, broker = frontend.client, frontend.broker
    before = scrape(client)
    assert client.simulate_post(GENERATIONS, json=FOX).status_code == 200
    assert client.simulate_post(GENERATIONS, json={**FOX, "n": 2}).status_code == 200
    assert client.simulate_post(GENERATIONS, json={"size": "64x64"}).status_code == 400
    unknown = client.simulate_post(GENERATIONS, json={**FOX, "model": "no-such-model"})
    assert unknown.status_code == 404
    broker.fail_with = ErrorCode.WORKER_ERROR
    assert client.simulate_post(GENERATIONS, json=FOX).status_code == 500
    after = scrape(client)

    route = GENERATIONS
    assert moved(before, after, "dc_http_requests_total", **requests(route, "POST", 200)) == 2
    assert moved(before, after, "dc_http_requests_total", **requests(route, "POST", 400)) == 1
    assert moved(before, after, "dc_http_requests_total", **requests(route, "POST", 404)) == 1
    assert moved(before, after, "dc_http_requests_total", **requests(route, "POST", 500)) == 1
    assert moved(before, after, "dc_images_generated_total", model="tiny") == 3
    # A model nobody serves is counted as "other": a client may name any model.
    assert moved(before, after, "dc_job_errors_total", model="other", code="no_worker") == 1
    assert moved(before, after, "dc_job_errors_total", model="tiny", code="worker_error") == 1
    # Only the two jobs that ran reach the histograms; the failures never started.
    for histogram in ("dc_queue_wait_seconds", "dc_generation_seconds",
                      "dc_request_duration_seconds"):
        assert moved(before, after, f"{histogram}_count", model="tiny") == 2, histogram
    assert moved(before, after, "dc_generation_seconds_sum", model="tiny") >= 0.02
    assert not any(labels and dict(labels).get("model") == "no-such-model"
                   for _, labels in after)


def test_a_streamed_generation_is_timed_when_its_stream_ends(frontend: Frontend) -> None:
    before = scrape(frontend.client)
    result = frontend.client.simulate_post(GENERATIONS, json={**FOX, "stream": True})
    assert result.status_code == 200 and "image_generation.completed" in result.text
    after = scrape(frontend.client)
    assert moved(before, after, "dc_request_duration_seconds_count", model="tiny") == 1
    assert moved(before, after, "dc_images_generated_total", model="tiny") == 1


def test_jobs_api_jobs_count_images_and_errors(frontend: Frontend) -> None:
    before = scrape(frontend.client)
    assert frontend.client.simulate_post("/v1/jobs", json=FOX).status_code == 202
    after = scrape(frontend.client)
    assert moved(before, after, "dc_images_generated_total", model="tiny") == 1
    assert moved(before, after, "dc_http_requests_total", **requests("/v1/jobs", "POST", 202)) == 1
    # Not a generation request: its duration is the jobs API's, not a generation's.
    assert moved(before, after, "dc_request_duration_seconds_count", model="tiny") == 0


@pytest.mark.filterwarnings("ignore::wsgiref.validate.WSGIWarning")  # BREW, a made-up method
def test_routes_are_counted_under_their_template_never_the_raw_path(frontend: Frontend) -> None:
    job_id = uuid.uuid4().hex
    before = scrape(frontend.client)
    assert frontend.client.simulate_get(f"/v1/jobs/{job_id}").status_code == 404
    assert frontend.client.simulate_get(f"/no/such/{job_id}").status_code == 404
    assert frontend.client.simulate_request("BREW", "/healthz").status_code == 405
    after = scrape(frontend.client)
    assert moved(before, after, "dc_http_requests_total",
                 **requests("/v1/jobs/{job_id}", "GET", 404)) == 1
    assert moved(before, after, "dc_http_requests_total", **requests("other", "GET", 404)) == 1
    assert moved(before, after, "dc_http_requests_total",
                 **requests("/healthz", "other", 405)) == 1
    assert job_id not in frontend.client.simulate_get("/metrics").text
    # The scrape itself counts too, under its own route.
    assert moved(before, after, "dc_http_requests_total", **requests("/metrics", "GET", 200)) == 1


def test_cluster_gauges_come_from_the_brokers_status(frontend: Frontend) -> None:
    broker = frontend.broker
    broker.workers = [worker("w1", "tiny"), worker("w2", "tiny", "big"),
                      worker("w3", "tiny", state="loading")]
    broker.queues = {"tiny": 3, "gone": 1}
    samples = scrape(frontend.client)
    assert value(samples, "dc_broker_up") == 1
    assert value(samples, "dc_workers", model="tiny", state="ready") == 2
    assert value(samples, "dc_workers", model="tiny", state="loading") == 1
    assert value(samples, "dc_workers", model="big", state="ready") == 1
    assert value(samples, "dc_queue_depth", model="tiny") == 3
    assert ("dc_queue_depth", frozenset({("model", "big")})) in samples  # served, none queued
    assert value(samples, "dc_queue_depth", model="gone") == 1
    assert value(samples, "dc_open_event_streams") == 0

    broker.reachable = False
    samples = scrape(frontend.client)
    assert value(samples, "dc_broker_up") == 0
    assert not any(name in ("dc_queue_depth", "dc_workers") for name, _ in samples)


def test_each_workers_stats_are_exported_under_its_id_and_model(frontend: Frontend) -> None:
    gpu = {**worker("gpu-1", "flux"), "stats": {
        "jobs_done": 12, "images_done": 30, "step_seconds": 0.04, "images_per_second": 2.5,
        "batch_size": 4, "memory_used_bytes": 7 << 30, "memory_total_bytes": 80 << 30,
        "utilization": 0.93}}
    cpu = {**worker("cpu-1", "tiny"), "stats": {"jobs_done": 3, "images_done": 3,
                                                "step_seconds": 0.5}}
    old = worker("old-1", "tiny")  # a worker from before stats
    frontend.broker.workers = [gpu, cpu, old]
    samples = scrape(frontend.client)
    on_gpu = {"worker": "gpu-1", "model": "flux"}
    assert value(samples, "dc_worker_step_seconds", **on_gpu) == 0.04
    assert value(samples, "dc_worker_images_per_second", **on_gpu) == 2.5
    assert value(samples, "dc_worker_batch_size", **on_gpu) == 4
    assert value(samples, "dc_worker_jobs_total", **on_gpu) == 12
    assert value(samples, "dc_worker_images_total", **on_gpu) == 30
    assert value(samples, "dc_worker_device_memory_used_bytes", **on_gpu) == 7 << 30
    assert value(samples, "dc_worker_device_memory_total_bytes", **on_gpu) == 80 << 30
    assert value(samples, "dc_worker_device_utilization_ratio", **on_gpu) == 0.93
    on_cpu = {"worker": "cpu-1", "model": "tiny"}
    assert value(samples, "dc_worker_step_seconds", **on_cpu) == 0.5
    assert value(samples, "dc_worker_jobs_total", **on_cpu) == 3
    # What the CPU worker did not measure is absent, not 0; the old worker has no series.
    for name in ("dc_worker_device_memory_used_bytes", "dc_worker_device_utilization_ratio",
                 "dc_worker_images_per_second", "dc_worker_batch_size"):
        assert (name, frozenset(on_cpu.items())) not in samples
    assert not any(("worker", "old-1") in labels for _, labels in samples)


def test_without_a_gpu_worker_no_device_series_exist(frontend: Frontend) -> None:
    frontend.broker.workers = [{**worker("cpu-1", "tiny"),
                                "stats": {"jobs_done": 0, "images_done": 0}}]
    result = frontend.client.simulate_get("/metrics")
    assert "dc_worker_jobs_total" in result.text
    assert "dc_worker_device_" not in result.text


@pytest.mark.parametrize("stats", [
    "fast", [], {"images_done": "1"}, {"jobs_done": -1, "images_done": 1},
    {"jobs_done": 1, "images_done": 1, "step_seconds": float("inf")},
    {"jobs_done": 1, "images_done": 1, "utilization": 7},
])
def test_stats_the_protocol_refuses_export_nothing(frontend: Frontend, stats: Any) -> None:
    frontend.broker.workers = [{**worker("w1", "tiny"), "stats": stats},
                               {**worker("w2", "tiny"), "stats": {"jobs_done": 1,
                                                                  "images_done": 1}}]
    samples = scrape(frontend.client)
    assert not any(("worker", "w1") in labels for _, labels in samples)
    assert value(samples, "dc_worker_jobs_total", worker="w2", model="tiny") == 1


def test_the_brokers_counters_are_exported_with_its_start(frontend: Frontend) -> None:
    counters = BrokerCounters(
        started=1_790_000_000.0, dispatched={"tiny": 7, "other": 1}, requeued={"tiny": 2},
        failed={"tiny": {"timeout": 1, "worker_lost": 2, "from_the_future": 3,
                         "another_new_one": 1}})
    status = ClusterStatus([worker("w1", "tiny")], {}, time.monotonic(), counters=counters)
    frontend.broker.status = lambda: status
    samples = scrape(frontend.client)
    assert value(samples, "dc_broker_jobs_dispatched_total", model="tiny") == 7
    assert value(samples, "dc_broker_jobs_dispatched_total", model="other") == 1
    assert value(samples, "dc_broker_jobs_dispatched_created", model="tiny") == 1_790_000_000
    assert value(samples, "dc_broker_jobs_requeued_total", model="tiny") == 2
    assert value(samples, "dc_broker_jobs_failed_total", model="tiny", reason="timeout") == 1
    assert value(samples, "dc_broker_jobs_failed_total", model="tiny",
                 reason="worker_lost") == 2
    # Codes this frontend does not know share one label: reasons stay ErrorCode values.
    assert value(samples, "dc_broker_jobs_failed_total", model="tiny",
                 reason=UNKNOWN_FAILURE) == 4
    reasons = {dict(labels)["reason"] for name, labels in samples
               if name == "dc_broker_jobs_failed_total"}
    assert reasons <= {code.value for code in ErrorCode} | {UNKNOWN_FAILURE}


def test_a_broker_without_counters_exports_none(frontend: Frontend) -> None:
    samples = scrape(frontend.client)  # FakeBroker's status has no counters: an old broker
    assert not any(name.startswith("dc_broker_jobs_") for name, _ in samples)


def test_open_event_streams_counts_each_stream_while_it_is_open(frontend: Frontend) -> None:
    close = frontend.service.open_stream()
    assert value(scrape(frontend.client), "dc_open_event_streams") == 1
    close()
    assert value(scrape(frontend.client), "dc_open_event_streams") == 0


def test_the_brokers_round_trip_is_exported_when_measured(frontend: Frontend) -> None:
    status = ClusterStatus([worker("w1", "tiny")], {}, time.monotonic(), round_trip=0.25)
    frontend.broker.status = lambda: status
    assert value(scrape(frontend.client), "dc_broker_round_trip_seconds") == 0.25


def test_the_broker_client_measures_status_to_reply() -> None:
    client = BrokerClient("tcp://127.0.0.1:9")  # never started: the hooks are called here
    client.on_beat()
    time.sleep(0.01)
    client._conn.last_heard = time.monotonic()
    client.on_message(Message(MsgType.STATUS_REPLY, {"workers": [], "queues": {}}))
    status = client._status
    assert status is not None and status.round_trip is not None
    assert 0.01 <= status.round_trip < 5
    client.on_message(Message(MsgType.STATUS_REPLY, {"workers": [], "queues": {}}))
    assert client._status is not None and client._status.round_trip is None  # unasked


def test_the_broker_client_keeps_the_counters_of_the_last_reply() -> None:
    client = BrokerClient("tcp://127.0.0.1:9")  # never started: the hooks are called here
    counters = BrokerCounters(started=1.0, dispatched={"tiny": 1})
    client.on_message(protocol.decode(protocol.encode(
        MsgType.STATUS_REPLY, {"workers": [], "queues": {}, "counters": counters})))
    assert client._status is not None and client._status.counters == counters
    client.on_message(Message(MsgType.STATUS_REPLY, {"workers": [], "queues": {}}))
    assert client._status is not None and client._status.counters is None  # an old broker


def test_a_metrics_token_guards_metrics_and_only_metrics() -> None:
    broker = FakeBroker()
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0),
                            metrics_token="s3cret-token")
    client = falcon.testing.TestClient(create_app(config, broker))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        result = client.simulate_get("/metrics", headers=headers)
        assert result.status_code == 401
        assert result.json["error"]["code"] == "invalid_api_key"
        assert result.headers["www-authenticate"] == "Bearer"
    scrape(client, headers={"Authorization": "Bearer s3cret-token"})
    assert client.simulate_get("/healthz").status_code == 200
    assert "s3cret" not in repr(config)


def test_apps_in_one_process_count_apart(tmp_path: Path) -> None:
    histories = [make_history(tmp_path / name) for name in ("a", "b")]
    try:
        one, two = (make_frontend(FakeBroker(), history) for history in histories)
        assert one.client.simulate_post(GENERATIONS, json=FOX).status_code == 200
        assert value(scrape(one.client), "dc_images_generated_total", model="tiny") == 1
        assert value(scrape(two.client), "dc_images_generated_total", model="tiny") == 0
    finally:
        for history in histories:
            history.close()


def test_a_failing_metric_never_fails_a_request_and_is_logged_once(
        frontend: Frontend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(Counter, "labels", broken)  # every request and job counter
    with caplog.at_level(logging.ERROR, logger="http_frontend.metrics"):
        for _ in range(2):
            assert frontend.client.simulate_post(GENERATIONS, json=FOX).status_code == 200
            assert frontend.client.simulate_get("/healthz").status_code == 200
    failures = [r for r in caplog.records if "metrics:" in r.getMessage()]
    hooks = sorted(str(r.args[0]) for r in failures if isinstance(r.args, tuple))
    assert hooks == ["job", "request"]


def test_api_keys_leave_metrics_open_and_their_refusals_are_counted(tmp_path: Path) -> None:
    history = make_history(tmp_path)
    try:
        keyed = make_frontend(FakeBroker(), history, api_keys=(ApiKey("k-1", "alice"),))
        before = scrape(keyed.client)  # no key needed: /metrics is outside /v1
        assert keyed.client.simulate_get("/v1/models").status_code == 401
        after = scrape(keyed.client)
        # Refused before routing: no route template yet.
        assert moved(before, after, "dc_http_requests_total", **requests("other", "GET", 401)) == 1
    finally:
        history.close()


def test_the_metrics_token_comes_from_the_flag_or_the_first_line_of_its_file(
        tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file  \nsecond line\n")
    assert load_metrics_token(None, None) is None
    assert load_metrics_token(" given ", None) == "given"
    assert load_metrics_token(None, str(token_file)) == "from-the-file"
    with pytest.raises(ValueError, match="cannot go together"):
        load_metrics_token("given", str(token_file))
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="no token"):
        load_metrics_token(None, str(token_file))
    args = parse_args(["--metrics-token-file", str(token_file)])
    assert args.metrics_token is None and args.metrics_token_file == str(token_file)


def test_each_identitys_jobs_are_gauged_by_name(frontend: Frontend) -> None:
    frontend.broker.identities = [
        IdentityLoad(model="tiny", identity="alice", queued=20, running=1),
        IdentityLoad(model="tiny", identity="", queued=2, running=0)]
    samples = scrape(frontend.client)
    assert value(samples, "dc_identity_jobs", model="tiny", identity="alice",
                 state="queued") == 20
    assert value(samples, "dc_identity_jobs", model="tiny", identity="alice",
                 state="running") == 1
    assert value(samples, "dc_identity_jobs", model="tiny", identity="", state="queued") == 2
