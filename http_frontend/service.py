"""The image service: turn a validated request into a job, wait for it, shape the answer.

Knows nothing of Falcon; raises APIError for everything that goes wrong.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.protocol import ErrorCode, JobSpec, Message, MsgType
from gpu_worker import models
from gpu_worker.models import ModelSpec
from http_frontend import schema
from http_frontend.broker_client import BrokerClient, ClusterStatus, PendingJob
from http_frontend.errors import APIError, job_failure

log = logging.getLogger(__name__)

DEADLINE_SLACK = 5.0  # seconds past a job's deadline before the frontend gives up itself
CLIENT_CHECK_INTERVAL = 0.25  # how often a waiting request checks that its client is there


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    default_model: str | None = None  # None: the model the live workers serve
    default_timeout: float = 300.0  # seconds a request may take, queue included
    max_timeout: float = 3600.0
    retry_after: int = 5  # seconds, sent with 429 and 503


class ImageService:
    def __init__(self, broker: BrokerClient, config: ServiceConfig) -> None:
        self.broker = broker
        self.config = config
        self._lock = threading.Lock()
        self._in_flight = 0
        self._drain_deadline: float | None = None  # set once, when the server begins to stop

    # ---------------------------------------------------------------- draining

    def begin_drain(self, seconds: float) -> None:
        """Take no new work; requests still waiting after ``seconds`` get a retryable 503."""
        with self._lock:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + seconds

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def _shutting_down(self) -> APIError:
        return job_failure(ErrorCode.SHUTTING_DOWN.value, "the server is shutting down",
                           retry_after=self.config.retry_after)

    # ---------------------------------------------------------------- generation

    def generate(self, body: Any, client_gone: Callable[[], bool] | None = None
                 ) -> dict[str, Any]:
        """Generate the images ``body`` asks for; ``client_gone`` says the caller hung up."""
        request = schema.parse_request(body)
        name = self._model_name(request.model)
        spec = self._spec_for(name)
        fitted = schema.fit_to_model(request, spec)
        job = self._job(fitted, spec)
        with self._lock:
            if self._drain_deadline is not None:
                raise self._shutting_down()
            self._in_flight += 1
        try:
            answer = self._wait(self.broker.submit(job), job, client_gone)
        finally:
            with self._lock:
                self._in_flight -= 1
        if answer.type is MsgType.FAILED:
            raise self._failure(answer.fields, name)
        return schema.images_response(
            fitted, created=int(time.time()), model=spec.name,
            images=[self._image(info, frame) for info, frame in
                    zip(answer["images"], answer.payloads, strict=True)],
        ) | {"job_id": job.id, "worker_id": answer.get("worker_id"),
             "timings": answer.get("timings") or {}}

    def _wait(self, pending: PendingJob, job: JobSpec,
              client_gone: Callable[[], bool] | None) -> Message:
        """The job's RESULT or FAILED; cancel it if the client leaves or the deadline passes."""
        # The broker answers deadlines itself; this later one is the backstop for a broker
        # that went silent.
        deadline = time.monotonic() + job.timeout + DEADLINE_SLACK
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.broker.cancel(job.id)
                if not self.broker.connected:
                    raise job_failure(ErrorCode.BROKER_UNAVAILABLE.value,
                                      "lost contact with the broker and it did not come back "
                                      "in time", retry_after=self.config.retry_after)
                raise job_failure(ErrorCode.TIMEOUT.value,
                                  f"no answer within the {job.timeout:.0f} s deadline")
            answer = pending.wait(min(remaining, CLIENT_CHECK_INTERVAL))
            if answer is not None:
                return answer
            drain_deadline = self._drain_deadline
            if drain_deadline is not None and time.monotonic() >= drain_deadline:
                self.broker.cancel(job.id)
                raise self._shutting_down()
            if client_gone is not None and client_gone():
                self.broker.cancel(job.id)
                log.info("job %s cancelled: the client went away", job.id)
                raise APIError(499, "the client closed the connection", code="cancelled")

    def _model_name(self, requested: str | None) -> str:
        if requested:
            return models.canonical_name(requested)
        if self.config.default_model:
            return models.canonical_name(self.config.default_model)
        status = self.broker.status()
        served = sorted(status.served_models()) if status else []
        return served[0] if served else models.TINY

    def _spec_for(self, name: str) -> ModelSpec:
        """The registry entry, else what a worker announced, else generic defaults."""
        spec = models.lookup(name)
        if spec is not None:
            return spec
        status = self.broker.status()
        info = status.model_info(name) if status else None
        if info is not None:
            try:
                return models.ModelSpec.from_limits(info)
            except (TypeError, ValueError):
                log.warning("worker announced unusable limits for %s", name)
        return models.generic(name)

    def _job(self, fitted: schema.FittedRequest, spec: ModelSpec) -> JobSpec:
        req = fitted.request
        first_seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        timeout = min(req.timeout or self.config.default_timeout, self.config.max_timeout)
        return JobSpec(
            id=uuid.uuid4().hex, model=spec.name, prompt=req.prompt,
            width=fitted.width, height=fitted.height, steps=fitted.steps,
            seeds=tuple(first_seed + i for i in range(req.n)),
            negative_prompt=req.negative_prompt if spec.negative_prompt else None,
            guidance=fitted.guidance, output_format=req.output_format,
            output_compression=req.output_compression, timeout=timeout, user=req.user,
        )

    def _failure(self, failed: dict[str, Any], model: str) -> APIError:
        code = failed["code"]
        if code == ErrorCode.NO_WORKER.value and not self._known(model):
            return job_failure(ErrorCode.MODEL_NOT_FOUND.value,
                               f"the model {model!r} does not exist or no worker serves it")
        retry_after = self.config.retry_after if code in (
            ErrorCode.QUEUE_FULL.value, ErrorCode.NO_WORKER.value,
            ErrorCode.BROKER_UNAVAILABLE.value, ErrorCode.SHUTTING_DOWN.value) else None
        return job_failure(code, failed["message"], retry_after=retry_after)

    def _known(self, model: str) -> bool:
        """In the registry, or announced by any worker, ready or not: a 503, never a 404."""
        if models.lookup(model) is not None:
            return True
        status = self.broker.status()
        return status is not None and any(model in w.get("models", []) for w in status.workers)

    @staticmethod
    def _image(info: Any, frame: Any) -> dict[str, Any]:
        data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
        return {"b64_json": base64.b64encode(data).decode("ascii"), "seed": info.seed,
                "width": info.width, "height": info.height}

    # ---------------------------------------------------------------- cluster state

    def list_models(self) -> dict[str, Any]:
        status = self._status()
        served = status.served_models()
        data = []
        for name in sorted(served):
            spec = self._spec_for(name)
            data.append({
                "id": name, "object": "model", "created": 0, "owned_by": "diffusion-cluster",
                "ready_workers": len(served[name]),
                "queued": status.queues.get(name, 0),
                "limits": spec.limits(),
            })
        return {"object": "list", "data": data}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.draining:
            return False, {"ready": False, "reason": "shutting down"}
        status: ClusterStatus | None = self.broker.status()
        if status is None:
            return False, {"ready": False, "reason": "broker not reachable"}
        ready_workers = sum(1 for w in status.workers if w.get("state") == "ready")
        detail = {"ready": ready_workers > 0, "workers": ready_workers,
                  "queues": status.queues}
        if not ready_workers:
            detail["reason"] = "no worker is ready"
        return ready_workers > 0, detail

    def cluster(self) -> dict[str, Any]:
        status = self._status()
        return {"workers": status.workers, "queues": status.queues}

    def _status(self) -> ClusterStatus:
        status = self.broker.status()
        if status is None:
            raise job_failure(ErrorCode.BROKER_UNAVAILABLE.value, "the broker is not reachable",
                              retry_after=self.config.retry_after)
        return status
