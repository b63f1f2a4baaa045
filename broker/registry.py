"""The broker's worker registry: who is connected, what they serve, whether they are alive."""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Iterable, Iterator
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
    """Owns worker records and their load; only the broker thread touches it.

    Finding a worker for a model is O(log n): each model keeps a heap of the workers that
    had room, keyed by (jobs held, last dispatch). Entries go stale when a worker's load
    changes (each change pushes a fresh entry with a new stamp) and are skipped when popped.
    """

    def __init__(self, *, liveness: float) -> None:
        self.liveness = liveness  # seconds of silence after which a worker is dead
        self._workers: dict[bytes, Worker] = {}
        self._by_model: dict[str, set[bytes]] = {}  # READY workers serving each model
        self._free: dict[str, list[tuple[int, float, int, bytes]]] = {}
        self._stamps: dict[bytes, int] = {}  # identity -> stamp of its current heap entries
        self._next_stamp = itertools.count()

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def get(self, identity: bytes) -> Worker | None:
        return self._workers.get(identity)

    def register(self, identity: bytes, ready: Message, now: float) -> Worker:
        self.remove(identity)
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
        for model in worker.models:
            self._by_model.setdefault(model, set()).add(identity)
        self.offer(worker)
        return worker

    def touch(self, identity: bytes, now: float) -> Worker | None:
        worker = self._workers.get(identity)
        if worker is not None:
            worker.expires_at = now + self.liveness
        return worker

    def remove(self, identity: bytes) -> Worker | None:
        worker = self._workers.pop(identity, None)
        self._stamps.pop(identity, None)  # its heap entries are stale from now on
        if worker is not None:
            for model in worker.models:
                self._by_model.get(model, set()).discard(identity)
        return worker

    def expired(self, now: float) -> list[Worker]:
        return [w for w in self._workers.values() if w.expires_at <= now]

    def serves(self, model: str) -> bool:
        return any(self._workers[i].state is WorkerState.READY
                   for i in self._by_model.get(model, ()))

    # ---------------------------------------------------------------- load

    def lease(self, worker: Worker, job_ids: Iterable[str], now: float) -> None:
        worker.running.update(job_ids)
        worker.last_dispatch = now
        self.offer(worker)

    def release(self, worker: Worker, job_id: str) -> None:
        """The worker no longer holds ``job_id`` (answered, cancelled, expired, lost)."""
        if job_id in worker.running:
            worker.running.discard(job_id)
            self.offer(worker)

    def offer(self, worker: Worker) -> None:
        """Record the worker's current load; it is a candidate while it has room."""
        stamp = next(self._next_stamp)
        self._stamps[worker.identity] = stamp
        if worker.free > 0:
            for model in worker.models:
                heap = self._free.setdefault(model, [])
                heapq.heappush(heap, (len(worker.running), worker.last_dispatch, stamp,
                                      worker.identity))
                if len(heap) > 4 * len(self._by_model.get(model, ())) + 64:
                    self._compact(model)

    def _compact(self, model: str) -> None:
        """Drop stale entries of a heap that nothing popped for a while."""
        self._free[model] = [entry for entry in self._free[model]
                             if self._stamps.get(entry[3]) == entry[2]]
        heapq.heapify(self._free[model])

    def next_free(self, model: str) -> Worker | None:
        """The least loaded, longest idle worker of ``model`` with room for a whole batch.

        The worker leaves the candidates; leasing to it (or ``offer``) puts it back.
        """
        heap = self._free.get(model)
        while heap:
            _, _, stamp, identity = heapq.heappop(heap)
            if self._stamps.get(identity) != stamp:
                continue  # its load changed since, or it is gone
            worker = self._workers[identity]
            if worker.free >= min(worker.max_batch, worker.capacity):
                return worker
        return None
