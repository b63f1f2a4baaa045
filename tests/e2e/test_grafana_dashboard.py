"""docs/grafana-dashboard.json against a real cluster and a real Prometheus scraping it.

Every metric a panel's query or a template variable names must be one the cluster's /metrics
declares, so a renamed metric cannot leave an empty panel behind unnoticed; and every query
must be PromQL that Prometheus runs, returning data wherever the metrics it reads have it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from http_frontend.broker_client import ClusterStatus
from http_frontend.metrics import Metrics
from tests.cluster import Cluster, wait_until
from tests.prometheus import prometheus_scraping

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bdc_[a-z0-9_]+\b")
# The sample names each metric type writes, after its family's name.
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                               "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "unknown": ("",)}


# What Grafana puts in place of the dashboard's variables: every model; a window holding
# several of the test server's one-second scrapes.
VARIABLES = {"$__rate_interval": "15s", "$model": ".*"}


def queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression in the dashboard: the panels' targets and the variables'."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition declares, whether or not a sample was written yet (a
    labelled counter has its TYPE line before its first label set is counted)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def test_the_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(list(queries(dashboard))) >= 20


# What CPU workers do not measure, so a CPU cluster never exports: checked against the
# exposition of a CUDA worker's stats as its heartbeats carry them.
DEVICE_ONLY = {"dc_worker_device_memory_used_bytes", "dc_worker_device_memory_total_bytes",
               "dc_worker_device_utilization_ratio"}
GPU_WORKER = {"worker_id": "gpu-1", "host": "gpu-host", "device": "cuda:0", "state": "ready",
              "models": ["flux"], "max_batch": 4, "running": [],
              "stats": {"jobs_done": 12, "images_done": 30, "step_seconds": 0.04,
                        "images_per_second": 2.5, "batch_size": 4,
                        "memory_used_bytes": 7 << 30, "memory_total_bytes": 80 << 30,
                        "utilization": 0.93}}
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")  # Grafana's, not PromQL


def as_prometheus_sees_it(query: str) -> str:
    """The PromQL Grafana would send: variables filled in; for label_values(), its series."""
    query = LABEL_VALUES.sub(r"\1", query)
    for variable, value in VARIABLES.items():
        query = query.replace(variable, value)
    return query


class GpuClusterBroker:
    """A broker client whose last status has one CUDA worker."""

    def status(self) -> ClusterStatus:
        return ClusterStatus([GPU_WORKER], {"flux": 0}, time.monotonic())


def test_a_cuda_workers_stats_export_the_device_metrics_the_dashboard_names() -> None:
    metrics = Metrics(GpuClusterBroker(), open_streams=lambda: 0)  # type: ignore[arg-type]
    exported = exported_names(metrics.render().decode())
    assert DEVICE_ONLY - exported == set()


def test_every_metric_the_dashboard_names_is_in_a_live_scrape_and_every_query_runs(
        cluster: Cluster) -> None:
    with cluster.client() as http:
        for _ in range(2):
            resp = http.post("/v1/images/generations",
                             json={"prompt": "a dashboard", "size": "64x64"})
            assert resp.status_code == 200, resp.text

        def scrape() -> str:
            resp = http.get("/metrics")
            assert resp.status_code == 200
            return resp.text

        # A worker's step time comes with its next heartbeat, which the frontend's next
        # status poll brings.
        wait_until(lambda: "dc_worker_step_seconds{" in scrape(), 30, "the workers' stats")
        text = scrape()
    exported = exported_names(text) | DEVICE_ONLY
    with_samples = {sample.name for family in text_string_to_metric_families(text)
                    for sample in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    named = {name for query in queries(dashboard) for name in METRIC.findall(query)}
    assert named - exported == set(), \
        f"the dashboard names metrics /metrics lacks: {sorted(named - exported)}"

    with prometheus_scraping(cluster.url.removeprefix("http://")) as prometheus:
        prometheus.wait_for_scrapes(4)
        for query in queries(dashboard):
            result = prometheus.query(as_prometheus_sees_it(query))
            if set(METRIC.findall(query)) <= with_samples:
                assert result, f"no data for {query!r}, though its metrics have samples"
