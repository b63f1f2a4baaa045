"""What the cluster looks like right now, for /v1/models, /v1/cluster and /readyz."""

from __future__ import annotations

from typing import Any

from http_frontend import loras, model_resolver
from http_frontend.auth import Identity
from http_frontend.broker_client import BrokerClient, ClusterStatus
from http_frontend.errors import BROKER_UNREACHABLE, APIError, job_failure


class ClusterView:
    def __init__(self, broker: BrokerClient, *, retry_after: int) -> None:
        self.broker = broker
        self.retry_after = retry_after

    def list_models(self) -> dict[str, Any]:
        """OpenAI's model list: each served model with its workers, queue, defaults, limits."""
        status = self._status()
        served = status.served_models()
        return {"object": "list",
                "data": [self._model(status, name, name) for name in sorted(served)]}

    def get_model(self, asked: str, served_as: str) -> dict[str, Any]:
        """OpenAI's Model for the name a client asked for (``served_as``: the model that name
        runs on, after aliases); a 404 when no worker serves it."""
        status = self._status()
        if served_as not in status.served_models():
            raise APIError(404, f"the model {asked!r} does not exist or no worker serves it",
                           param="model", code="model_not_found")
        return self._model(status, asked, served_as)

    def _model(self, status: ClusterStatus, asked: str, name: str) -> dict[str, Any]:
        spec = model_resolver.spec_for(status, name)
        model = {"id": asked, "object": "model", "created": 0,
                 "owned_by": "diffusion-cluster",
                 "ready_workers": len(status.served_models()[name]),
                 "queued": status.queues.get(name, 0),
                 # generate, edit (img2img), inpaint: what every worker serving it can do
                 "capabilities": list(spec.modes),
                 "loras": loras.of_model(status, name),  # adapters its workers can apply
                 "limits": spec.describe()}
        if asked != name:
            model["served_by"] = name  # an alias: the model that actually runs
        return model

    def readiness(self, *, draining: bool) -> tuple[bool, dict[str, Any]]:
        # `alive`: the broker client's I/O thread runs. Without it nothing reaches the broker
        # again; the process exits so that its supervisor restarts it (see __main__).
        if not getattr(self.broker, "alive", True):
            return False, {"ready": False, "reason": "broker connection thread died"}
        if draining:
            return False, {"ready": False, "reason": "shutting down"}
        status = self.broker.status()
        if status is None:
            return False, {"ready": False, "reason": "broker not reachable"}
        ready_workers = sum(1 for w in status.workers if w.get("state") == "ready")
        detail: dict[str, Any] = {"ready": ready_workers > 0, "workers": ready_workers,
                                  "queues": status.queues}
        if not ready_workers:
            detail["reason"] = "no worker is ready"
        return ready_workers > 0, detail

    def adapters(self) -> dict[str, Any]:
        """GET /v1/loras."""
        return loras.listing(self._status())

    def cluster(self, identity: Identity) -> dict[str, Any]:
        """GET /v1/cluster: the workers, the queues, and each identity's jobs per model (the
        busiest the broker lists); a key that does not see every identity's jobs sees its
        own line only, never the other identities' names."""
        status = self._status()
        shown = [load for load in status.identities
                 if identity.sees_all or load.identity == identity.key]
        return {"workers": status.workers, "queues": status.queues,
                "identities": [{"model": load.model, "identity": load.identity or None,
                                "queued": load.queued, "running": load.running}
                               for load in shown]}

    def _status(self) -> ClusterStatus:
        status = self.broker.status()
        if status is None:
            raise job_failure(BROKER_UNREACHABLE, retry_after=self.retry_after)
        return status
