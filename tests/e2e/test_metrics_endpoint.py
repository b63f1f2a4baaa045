"""GET /metrics on a real cluster: launch.py, broker, CPU workers, waitress.

(Named apart from tests/http_frontend/test_metrics.py: test modules need unique basenames.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import defaults
from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(cluster: Cluster) -> Samples:
    with cluster.client() as http:
        resp = http.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(resp.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_generation_moves_the_counters_and_the_cluster_is_seen(cluster: Cluster) -> None:
    # Another test may have left a job running on this shared cluster: start from an idle one.
    wait_until(lambda: value(scrape(cluster), "dc_workers", model="tiny", state="ready") == 2,
               30, "both workers ready")
    generations = {"route": "/v1/images/generations", "method": "POST", "status": "200"}
    before = scrape(cluster)
    with cluster.client() as http:
        resp = http.post("/v1/images/generations",
                         json={"prompt": "a red fox", "n": 2, "size": "64x64"})
    assert resp.status_code == 200, resp.text
    after = scrape(cluster)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("dc_images_generated_total", model="tiny") == 2
    assert moved("dc_http_requests_total", **generations) == 1
    assert moved("dc_request_duration_seconds_count", model="tiny") == 1
    assert moved("dc_queue_wait_seconds_count", model="tiny") == 1
    assert moved("dc_generation_seconds_count", model="tiny") == 1  # the workers send steps
    assert value(after, "dc_workers", model="tiny", state="ready") == 2
    assert value(after, "dc_broker_up") == 1
    assert value(after, "dc_queue_depth", model="tiny") == 0
    assert 0 < value(after, "dc_broker_round_trip_seconds") < 5


@pytest.fixture(scope="module")
def default_cluster(cache_dir: Path) -> Iterator[Cluster]:
    """One CPU worker heartbeating at the default interval, as a user's cluster does; its
    own, so that the broker's counters move by this module's jobs only."""
    running = Cluster(cache_dir, workers=1, heartbeat=defaults.HEARTBEAT_INTERVAL)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_worker_reports_its_stats_and_the_broker_counts_its_jobs(
        default_cluster: Cluster) -> None:
    cluster = default_cluster
    (worker,) = wait_until(lambda: [w for w in cluster.cluster_status()["workers"]
                                    if w["state"] == "ready"], 30, "the worker ready")
    ours = {"worker": worker["worker_id"], "model": "tiny"}
    before = scrape(cluster)
    with cluster.client() as http:
        for n in (2, 1):
            resp = http.post("/v1/images/generations",
                             json={"prompt": "a red fox", "n": n, "size": "64x64"})
            assert resp.status_code == 200, resp.text

    def moved(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    def counted_both() -> Samples | None:
        samples = scrape(cluster)
        return samples if moved(samples, "dc_worker_jobs_total", **ours) >= 2 else None

    # The worker's next heartbeat carries its stats, the frontend's next status poll them.
    after = wait_until(counted_both, 10 * defaults.HEARTBEAT_INTERVAL,
                       "the worker's heartbeat to count both jobs")
    assert moved(after, "dc_worker_jobs_total", **ours) == 2
    assert moved(after, "dc_worker_images_total", **ours) == 3
    assert value(after, "dc_worker_step_seconds", **ours) > 0
    assert value(after, "dc_worker_images_per_second", **ours) > 0
    assert value(after, "dc_worker_batch_size", **ours) == 1
    # A CPU has no device memory or utilisation to report: no series, not zeros.
    assert not [name for name, _ in after if name.startswith("dc_worker_device_")]
    assert {dict(labels).get("worker") for name, labels in after
            if name.startswith("dc_worker_")} == {worker["worker_id"]}

    assert moved(after, "dc_broker_jobs_dispatched_total", model="tiny") == 2
    assert value(after, "dc_broker_jobs_dispatched_created", model="tiny") > 0
    assert moved(after, "dc_broker_jobs_requeued_total", model="tiny") == 0
    assert not [name for name, _ in after if name == "dc_broker_jobs_failed_total"]

    # The public API shows the same stats (launch.py status reads them there).
    (described,) = cluster.cluster_status()["workers"]
    assert described["stats"]["jobs_done"] >= 2
    assert "memory_used_bytes" not in described["stats"]
