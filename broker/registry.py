"""The broker's worker registry: who is connected, what they serve, whether they are alive."""

from __future__ import annotations

import copy
import enum
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker.protocol import JobSpec, LoraInfo, Message, WorkerStats

QUARANTINE_AFTER = 3  # consecutive failed jobs after which a worker gets no work for a while
QUARANTINE_FIRST = 5.0  # seconds of its first quarantine; each next one doubles
QUARANTINE_MAX = 300.0


class WorkerState(enum.StrEnum):
    READY = "ready"  # takes work up to its capacity
    QUARANTINED = "quarantined"  # failed every job lately: gets nothing new until its time is up


@dataclass(eq=False)
class WorkerRecord:
    """The broker's record of a registered worker (gpu_worker.worker.Worker is the process)."""

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
    session: str = ""  # random per worker process (READY); "" from workers that send none
    state: WorkerState = WorkerState.READY
    # Its side of the leases, written only by broker.leases.Leases: ids of the jobs it holds.
    running: set[str] = field(default_factory=set)
    jobs_done: int = 0
    last_dispatch: float = 0.0
    failures: int = 0  # failed jobs in a row; a good answer resets it
    quarantines: int = 0  # quarantines in a row; a good answer resets it
    quarantined_until: float = 0.0
    # Jobs the broker dropped (cancelled, expired, moved) that the worker has not said it
    # ended; their slots stay taken until it does. Job id -> when the broker asked it to stop.
    # Written only by Leases, like ``running``.
    ending: dict[str, float] = field(default_factory=dict)
    stats: WorkerStats | None = None  # what its last heartbeat measured; None: not sent
    # The LoRA adapters it can apply (READY, then every heartbeat): a job goes only to a
    # worker that has all of its own (``can_run``).
    loras: dict[str, LoraInfo] = field(default_factory=dict)

    def can_run(self, job: JobSpec) -> bool:
        """Whether it has every adapter ``job`` applies."""
        return all(name in self.loras for name, _ in job.loras)

    def has_loaded(self, job: JobSpec) -> bool:
        """Whether every adapter ``job`` applies is in its memory already."""
        return all(name in self.loras and self.loras[name].loaded for name, _ in job.loras)

    @property
    def free(self) -> int:
        if self.state is not WorkerState.READY:
            return 0
        return max(0, self.capacity - len(self.running))

    def describe(self, now: float, *, stats: bool = True) -> dict[str, Any]:
        """The worker as STATUS_REPLY shows it (``stats``: with its last stats)."""
        described = {
            "worker_id": self.worker_id, "host": self.host, "device": self.device,
            "models": list(self.models), "state": self.state.value,
            "running": sorted(self.running), "jobs_done": self.jobs_done,
            "max_batch": self.max_batch, "capacity": self.capacity, "version": self.version,
            "model_info": self.model_info, "consecutive_failures": self.failures,
        }
        if stats and self.stats is not None:
            described["stats"] = self.stats.to_wire()
        if self.loras:
            described["loras"] = {name: msgspec.to_builtins(info)
                                  for name, info in self.loras.items()}
        if self.state is WorkerState.QUARANTINED:
            described["quarantine_left_s"] = round(max(0.0, self.quarantined_until - now), 1)
        return described


# What a worker's record keeps when the worker registers again (its leases: Leases.keep/move).
_CARRIED_OVER = ("state", "jobs_done", "last_dispatch", "failures", "quarantines",
                 "quarantined_until", "stats", "loras")


class WorkerRegistry:
    """Owns worker records, their health and who gets work next; only the broker thread
    touches it. Their load (``running``) is the leases': broker/leases.py changes it, then
    calls ``offer``.

    Finding a worker for a model is O(log n): each model keeps a heap of the workers that
    had room, keyed by (jobs held, last dispatch). Entries go stale when a worker's load
    changes (each change pushes a fresh entry with a new stamp) and are skipped when popped.
    """

    def __init__(self, *, liveness: float) -> None:
        self.liveness = liveness  # seconds of silence after which a worker is dead
        self._workers: dict[bytes, WorkerRecord] = {}
        self._by_model: dict[str, set[bytes]] = {}  # READY workers serving each model
        self._free: dict[str, list[tuple[int, float, int, bytes]]] = {}
        self._stamps: dict[bytes, int] = {}  # identity -> stamp of its current heap entries
        self._next_stamp = itertools.count()

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._workers.values()))

    def get(self, identity: bytes) -> WorkerRecord | None:
        return self._workers.get(identity)

    def find(self, worker_id: str) -> WorkerRecord | None:
        """The registered worker that calls itself ``worker_id``, on any connection."""
        return next((w for w in self._workers.values() if w.worker_id == worker_id), None)

    def register(self, identity: bytes, ready: Message, now: float, *,
                 keep: WorkerRecord | None = None) -> WorkerRecord:
        """Record a READY; ``keep`` is the worker's earlier record, whose health carries over
        (registering again is idempotent). What it holds is the leases' (Leases.keep/move)."""
        self.remove(identity)
        worker = WorkerRecord(
            identity=identity,
            worker_id=ready["worker_id"],
            host=ready["host"],
            device=ready["device"],
            models=tuple(ready["models"]),
            max_batch=ready.get("max_batch", 1),
            # Room for one batch running and one waiting, at most: more would hoard jobs.
            capacity=min(ready.get("capacity", 1), 2 * ready.get("max_batch", 1)),
            session=ready.get("session") or "",
            version=ready.get("version", ""),
            model_info=ready.get("model_info") or {},
            expires_at=now + self.liveness,
        )
        if keep is not None:
            for name in _CARRIED_OVER:
                setattr(worker, name, copy.copy(getattr(keep, name)))
        self._workers[identity] = worker
        for model in worker.models:
            self._by_model.setdefault(model, set()).add(identity)
        self.offer(worker)
        return worker

    def touch(self, identity: bytes, now: float) -> WorkerRecord | None:
        worker = self._workers.get(identity)
        if worker is not None:
            worker.expires_at = now + self.liveness
        return worker

    def remove(self, identity: bytes) -> WorkerRecord | None:
        worker = self._workers.pop(identity, None)
        self._stamps.pop(identity, None)  # its heap entries are stale from now on
        if worker is not None:
            for model in worker.models:
                self._by_model.get(model, set()).discard(identity)
        return worker

    def expired(self, now: float) -> list[WorkerRecord]:
        return [w for w in self._workers.values() if w.expires_at <= now]

    def serves(self, model: str) -> bool:
        """Whether a registered worker serves ``model``, quarantined or not."""
        return bool(self._by_model.get(model))

    def can_run(self, job: JobSpec) -> bool:
        """Whether a registered worker of its model has every adapter ``job`` applies."""
        return any(self._workers[identity].can_run(job)
                   for identity in self._by_model.get(job.model, ()))

    # ---------------------------------------------------------------- health

    def succeeded(self, worker: WorkerRecord) -> None:
        worker.failures = worker.quarantines = 0

    def failed(self, worker: WorkerRecord, now: float, *, others_serve: bool) -> bool:
        """Count a failed job; quarantine the worker after too many. Whether it is now.

        Only while ``others_serve`` (another ready worker serves its models): quarantining
        the one worker that can run a model would only make its jobs wait.
        """
        worker.failures += 1
        if worker.state is WorkerState.QUARANTINED:
            return True
        # A worker on probation (quarantined before, nothing good since) goes back at once.
        if not others_serve or (worker.failures < QUARANTINE_AFTER and not worker.quarantines):
            return False
        seconds = min(QUARANTINE_MAX, QUARANTINE_FIRST * 2 ** worker.quarantines)
        worker.quarantines += 1
        worker.state = WorkerState.QUARANTINED
        worker.quarantined_until = now + seconds
        self.offer(worker)  # its heap entries go stale: no room while quarantined
        return True

    def absolve(self, worker: WorkerRecord) -> None:
        """Take back a failure counted against a worker: the job failed elsewhere too."""
        if worker.state is WorkerState.READY and worker.failures:
            worker.failures -= 1

    def others_serve(self, model: str, worker: WorkerRecord) -> bool:
        """Whether a ready worker other than ``worker`` serves ``model``."""
        return any(identity != worker.identity
                   and self._workers[identity].state is WorkerState.READY
                   for identity in self._by_model.get(model, ()))

    def end_quarantines(self, now: float) -> list[WorkerRecord]:
        """Put workers whose quarantine is over back to work (on probation); return them."""
        freed = [w for w in self._workers.values()
                 if w.state is WorkerState.QUARANTINED and w.quarantined_until <= now]
        for worker in freed:
            worker.state = WorkerState.READY
            self.offer(worker)
        return freed

    # ---------------------------------------------------------------- load

    def offer(self, worker: WorkerRecord, *, dispatched: float | None = None) -> None:
        """Record the worker's current load (and when it was last sent work); it is a
        candidate while it has room."""
        if dispatched is not None:
            worker.last_dispatch = dispatched
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

    def next_free(self, model: str) -> WorkerRecord | None:
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
