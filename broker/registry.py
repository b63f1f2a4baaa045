"""The broker's worker registry: who is connected, what they serve, whether they are alive."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from broker.protocol import Message


class WorkerState(enum.StrEnum):
    READY = "ready"  # takes work up to its capacity
    DRAINING = "draining"  # said BYE or is shutting down: finishes what it has, gets nothing new


@dataclass(eq=False)
class Worker:
    identity: bytes  # ROUTER identity of its DEALER connection
    worker_id: str
    host: str
    device: str
    models: tuple[str, ...]
    max_batch: int
    capacity: int
    version: str
    model_info: dict[str, Any]
    expires_at: float  # time.monotonic(); pushed forward by every message from the worker
    state: WorkerState = WorkerState.READY
    running: set[str] = field(default_factory=set)
    jobs_done: int = 0
    last_dispatch: float = 0.0

    @property
    def free(self) -> int:
        if self.state is not WorkerState.READY:
            return 0
        return max(0, self.capacity - len(self.running))

    def describe(self) -> dict[str, Any]:
        """The worker as STATUS_REPLY shows it."""
        return {
            "worker_id": self.worker_id, "host": self.host, "device": self.device,
            "models": list(self.models), "state": self.state.value,
            "running": sorted(self.running), "jobs_done": self.jobs_done,
            "max_batch": self.max_batch, "capacity": self.capacity, "version": self.version,
            "model_info": self.model_info,
        }


class WorkerRegistry:
    """Owns worker records; only the broker thread touches it."""

    def __init__(self, *, liveness: float) -> None:
        self.liveness = liveness  # seconds of silence after which a worker is dead
        self._workers: dict[bytes, Worker] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self):
        return iter(list(self._workers.values()))

    def get(self, identity: bytes) -> Worker | None:
        return self._workers.get(identity)

    def register(self, identity: bytes, ready: Message, now: float) -> Worker:
        worker = Worker(
            identity=identity,
            worker_id=ready["worker_id"],
            host=ready["host"],
            device=ready["device"],
            models=tuple(ready["models"]),
            max_batch=ready.get("max_batch", 1),
            capacity=ready.get("capacity", 1),
            version=ready.get("version", ""),
            model_info=ready.get("model_info") or {},
            expires_at=now + self.liveness,
        )
        self._workers[identity] = worker
        return worker

    def touch(self, identity: bytes, now: float) -> Worker | None:
        worker = self._workers.get(identity)
        if worker is not None:
            worker.expires_at = now + self.liveness
        return worker

    def remove(self, identity: bytes) -> Worker | None:
        return self._workers.pop(identity, None)

    def expired(self, now: float) -> list[Worker]:
        return [w for w in self._workers.values() if w.expires_at <= now]

    def serves(self, model: str) -> bool:
        return any(model in w.models and w.state is WorkerState.READY
                   for w in self._workers.values())

    def with_free_capacity(self, model: str) -> list[Worker]:
        """Workers that can take a job of ``model`` now, the least loaded and longest idle first."""
        free = [w for w in self._workers.values() if model in w.models and w.free > 0]
        free.sort(key=lambda w: (len(w.running), w.last_dispatch))
        return free
