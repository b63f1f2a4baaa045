"""Prometheus metrics for GET /metrics: this frontend's requests and jobs, and the cluster.

Each app has a registry of its own (never the process-wide default), so several apps in one
process count apart. Requests are counted by a middleware, under their route template (never
the raw path: unbounded label values would grow without end); jobs are counted when they end,
from the ``PendingJob`` every job this frontend submits passes through. The cluster's gauges
are read from the broker's last status at scrape time, by a collector: nothing runs in the
background. A metrics failure never fails a request: each hook logs it once and goes on.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

import falcon
import falcon.constants
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from broker.protocol import (
    BrokerCounters,
    ErrorCode,
    IdentityLoad,
    JobSpec,
    ProtocolError,
    WorkerStats,
)
from http_frontend import model_resolver, streaming
from http_frontend.broker_client import BrokerClient
from http_frontend.errors import UNKNOWN_FAILURE
from http_frontend.pending import PendingJob

log = logging.getLogger(__name__)

OTHER = "other"  # the label of a route, method or model outside the bounded set
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: image generation takes from a tenth of a second (tiny models) to minutes (queues).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
           float("inf"))
_CODES = frozenset(code.value for code in ErrorCode)
# Each worker's last heartbeat, per worker and model: (its stats field, metric, help).
_WORKER_GAUGES = (
    ("step_seconds", "dc_worker_step_seconds", "Seconds per denoising step in the worker's "
     "last batch"),
    ("images_per_second", "dc_worker_images_per_second", "Images the worker generated per "
     "second over the last minute"),
    ("batch_size", "dc_worker_batch_size", "Jobs in the worker's last batch"),
    ("memory_used_bytes", "dc_worker_device_memory_used_bytes", "Device memory the worker's "
     "PyTorch allocator holds (CUDA only)"),
    ("memory_total_bytes", "dc_worker_device_memory_total_bytes", "The worker's device "
     "memory (CUDA only)"),
    ("utilization", "dc_worker_device_utilization_ratio", "Share of the last sample period "
     "a kernel ran on the worker's device, per NVML (CUDA with NVML only)"),
)
_WORKER_COUNTERS = (
    ("jobs_done", "dc_worker_jobs", "Jobs the worker generated since it started"),
    ("images_done", "dc_worker_images", "Images the worker generated since it started"),
)


class Metrics:
    """One app's metrics: what its middleware and job hooks count, and the cluster gauges."""

    def __init__(self, broker: BrokerClient, *, open_streams: Callable[[], int],
                 name_identities: bool = True) -> None:
        """``name_identities``: export each identity's jobs by name (dc_identity_jobs); off
        where /metrics is open to callers the API keys would not show those names to."""
        self.broker = broker
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dc_http_requests", "HTTP requests answered, by route template, method, status",
            ["route", "method", "status"], registry=self.registry)
        self.queue_wait = Histogram(
            "dc_queue_wait_seconds", "From a job's submission to its first step (or its "
            "result, when no step came)", ["model"], buckets=BUCKETS, registry=self.registry)
        self.generation = Histogram(
            "dc_generation_seconds", "From a job's first step to its result, on this "
            "frontend's clock", ["model"], buckets=BUCKETS, registry=self.registry)
        self.request_duration = Histogram(
            "dc_request_duration_seconds", "A successful image generation request, from its "
            "arrival to its answer's end", ["model"], buckets=BUCKETS, registry=self.registry)
        self.images = Counter("dc_images_generated", "Images generated for this frontend's "
                              "jobs", ["model"], registry=self.registry)
        self.job_errors = Counter("dc_job_errors", "Jobs that ended without images, by "
                                  "failure code", ["model", "code"], registry=self.registry)
        self.registry.register(ClusterCollector(broker, open_streams=open_streams,
                                                guard=self._guard,
                                                name_identities=name_identities))
        self._failed: set[str] = set()  # the hooks that failed, each logged once

    def render(self) -> bytes:
        """The registry in Prometheus's text format (its type: ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def middleware(self) -> RequestMetrics:
        return RequestMetrics(self)

    # ---------------------------------------------------------------- hooks

    def job_submitted(self, job: JobSpec, pending: PendingJob) -> None:
        """Count ``job`` when it ends (``ImageService`` calls this for every job it sends)."""
        self._guard("job", lambda: pending.when_done(
            lambda done: self._guard("job", lambda: self._job_ended(job, done))))

    def request_answered(self, req: falcon.Request, resp: falcon.Response) -> None:
        route = req.uri_template or OTHER
        method = req.method if req.method in falcon.constants.COMBINED_METHODS else OTHER
        status = falcon.http_status_to_code(resp.status)
        self.requests.labels(route, method, str(status)).inc()
        model = getattr(req.context, "generation_model", None)
        started = getattr(req.context, "metrics_started", None)
        if model is None or started is None or status != 200:
            return
        histogram = self.request_duration.labels(self.model_label(model))
        events = resp.stream
        if isinstance(events, Iterator):  # an event stream: it ends with its last event
            resp.stream = streaming.ClosingStream(events, lambda: self._guard(
                "stream", lambda: histogram.observe(time.monotonic() - started)))
        else:
            histogram.observe(time.monotonic() - started)

    def model_label(self, model: str) -> str:
        """``model`` when it exists (a worker announced it, or the registry knows it), else
        ``other``: a client may name any model, and every name would be a series."""
        return model if model_resolver.is_known(self.broker.status(), model) else OTHER

    # ---------------------------------------------------------------- inside

    def _job_ended(self, job: JobSpec, pending: PendingJob) -> None:
        ended = time.monotonic()
        model = self.model_label(job.model)
        started = pending.started_at
        if started is not None or pending.result is not None:
            self.queue_wait.labels(model).observe((started or ended) - pending.submitted_at)
        if pending.result is not None:
            self.images.labels(model).inc(len(pending.result["images"]))
            if started is not None:
                self.generation.labels(model).observe(ended - started)
        elif pending.error is not None:
            code = str(pending.error.code)
            self.job_errors.labels(model, code if code in _CODES else UNKNOWN_FAILURE).inc()

    def _guard(self, hook: str, work: Callable[[], Any]) -> None:
        """Run ``work``; a failure is logged (once per hook), never raised."""
        try:
            work()
        except Exception:
            if hook not in self._failed:
                self._failed.add(hook)
                log.exception("metrics: the %s hook failed (logged once; counting goes on)",
                              hook)


class RequestMetrics:
    """Falcon middleware: count every request, its route's template as the label. First in
    the middleware list, so a request another middleware refuses (401) is counted too."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.monotonic()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        self.metrics._guard("request", lambda: self.metrics.request_answered(req, resp))


class ClusterCollector(Collector):
    """The cluster as the broker's last status says, read at scrape time; the same on every
    frontend (dashboards take one frontend's value, or the max, never the sum)."""

    def __init__(self, broker: BrokerClient, *, open_streams: Callable[[], int],
                 guard: Callable[[str, Callable[[], Any]], None],
                 name_identities: bool = True) -> None:
        self.broker = broker
        self.open_streams = open_streams
        self.guard = guard
        self.name_identities = name_identities

    def collect(self) -> Iterator[Metric]:
        found: list[Metric] = []
        self.guard("collector", lambda: found.extend(self._families()))
        return iter(found)

    def _families(self) -> list[Metric]:
        streams = GaugeMetricFamily("dc_open_event_streams",
                                    "Event streams this frontend has open")
        streams.add_metric([], self.open_streams())
        status = self.broker.status()
        up = GaugeMetricFamily("dc_broker_up", "1 when the broker answers this frontend's "
                                               "status polls, else 0")
        up.add_metric([], 0 if status is None else 1)
        families: list[Metric] = [streams, up]
        if status is None:
            return families
        depth = GaugeMetricFamily("dc_queue_depth", "Jobs waiting in the broker's queue",
                                  labels=["model"])
        workers = GaugeMetricFamily("dc_workers", "Workers announcing each model, by state",
                                    labels=["model", "state"])
        tally = Tally(_worker_models(status.workers))
        models = {model for model, _ in tally} | set(status.queues)
        for model in sorted(models):
            depth.add_metric([model], status.queues.get(model, 0))
        for (model, state), count in sorted(tally.items()):
            workers.add_metric([model, state], count)
        families += [depth, workers, *_worker_families(status.workers)]
        if self.name_identities:
            families.append(_identity_jobs(status.identities))
        if status.counters is not None:
            families += _broker_counters(status.counters)
        if status.round_trip is not None:
            trip = GaugeMetricFamily("dc_broker_round_trip_seconds",
                                     "The last status poll, from STATUS sent to reply")
            trip.add_metric([], status.round_trip)
            families.append(trip)
        return families


def _worker_models(workers: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(model, state) for each model each worker announced."""
    for worker in workers:
        state = worker.get("state")
        models = worker.get("models")
        if not isinstance(state, str) or not isinstance(models, list):
            continue
        for model in set(models):
            if isinstance(model, str):
                yield model, state


def _worker_families(workers: list[dict[str, Any]]) -> list[Metric]:
    """Each worker's stats from its last heartbeat, labelled by worker id and model.

    A stat the worker did not measure (device memory on a CPU) has no sample, and a family
    without samples is left out: absent, not 0.
    """
    labels = ["worker", "model"]
    families: list[GaugeMetricFamily | CounterMetricFamily] = [
        *(GaugeMetricFamily(name, text, labels=labels) for _, name, text in _WORKER_GAUGES),
        *(CounterMetricFamily(name, text, labels=labels) for _, name, text in _WORKER_COUNTERS)]
    fields = [field for field, _, _ in (*_WORKER_GAUGES, *_WORKER_COUNTERS)]
    for worker_id, model, stats in _worker_stats(workers):
        for field, family in zip(fields, families, strict=True):
            measured = getattr(stats, field)
            if measured is not None:
                family.add_metric([worker_id, model], measured)
    return [family for family in families if family.samples]


def _worker_stats(workers: list[dict[str, Any]]) -> Iterator[tuple[str, str, WorkerStats]]:
    """(worker id, model, stats) of each worker that sent stats the protocol accepts."""
    for worker in workers:
        worker_id, models = worker.get("worker_id"), worker.get("models")
        if not isinstance(worker_id, str) or not isinstance(models, list) or not models:
            continue
        try:
            stats = WorkerStats.from_wire(worker.get("stats"))
        except ProtocolError:
            continue  # none sent (an older worker), or not stats
        yield worker_id, str(models[0]), stats  # one pipeline per worker: one model


def _identity_jobs(identities: list[IdentityLoad]) -> GaugeMetricFamily:
    """Each identity's queued and running jobs per model: its name ("" for the anonymous
    one), never its key; the busiest 100 the broker lists, so the series stay bounded."""
    jobs = GaugeMetricFamily("dc_identity_jobs", "Jobs of each identity (API key name, else "
                             "the request's user) per model, queued or running; the busiest "
                             "100", labels=["model", "identity", "state"])
    for load in identities:
        jobs.add_metric([load.model, load.identity, "queued"], load.queued)
        jobs.add_metric([load.model, load.identity, "running"], load.running)
    return jobs


def _broker_counters(counters: BrokerCounters) -> list[Metric]:
    """The broker's job counts since it started (``_created``: then, so a restart's reset
    reads as one)."""
    dispatched = CounterMetricFamily("dc_broker_jobs_dispatched", "Jobs the broker leased to "
                                     "a worker (a requeued job counts again)", labels=["model"])
    requeued = CounterMetricFamily("dc_broker_jobs_requeued", "Jobs the broker put back in "
                                   "their queue after losing their worker", labels=["model"])
    failed = CounterMetricFamily("dc_broker_jobs_failed", "Jobs the broker failed, by "
                                 "reason (ErrorCode)", labels=["model", "reason"])
    started = counters.started
    for model, jobs in sorted(counters.dispatched.items()):
        dispatched.add_metric([model], jobs, created=started)
    for model, jobs in sorted(counters.requeued.items()):
        requeued.add_metric([model], jobs, created=started)
    for model, codes in sorted(counters.failed.items()):
        # A code this frontend does not know (a newer broker's) is one bounded label.
        by_reason: Tally[str] = Tally()
        for code, jobs in codes.items():
            by_reason[code if code in _CODES else UNKNOWN_FAILURE] += jobs
        for reason, jobs in sorted(by_reason.items()):
            failed.add_metric([model, reason], jobs, created=started)
    return [dispatched, requeued, failed]
