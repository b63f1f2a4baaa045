"""GET /metrics on a real cluster: launch.py, broker, two CPU workers, waitress.

(Named apart from tests/http_frontend/test_metrics.py: test modules need unique basenames.)
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
