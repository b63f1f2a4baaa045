"""The broker's job table: every job it holds, one fair queue per model, attempts and deadlines.

How a model's queue is ordered by priority class and shared between the identities that
queued jobs, and how identities at their running limit wait: broker/fair_queue.py.

Which worker holds a running job is the lease's business: broker/leases.py.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.fair_queue import FairQueue
from broker.protocol import JobSpec

# Queued jobs looked at, in fair order, for a new job's place in line: as many as the broker
# announces positions to (broker.POSITION_UPDATES). A job further back is told the count of
# jobs queued before it, and its true place once it is among those the broker announces to.
POSITION_SCAN = 32


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"


@dataclass(eq=False)
class Job:
    spec: JobSpec
    client: bytes  # ROUTER identity of the connection its answers go to
    deadline: float  # time.monotonic() on the broker's clock
    owner: str = ""  # the submitting frontend's stable id: only it may re-attach or cancel
    state: JobState = JobState.QUEUED
    attempt: int = 0
    worker: bytes | None = None  # the lease's holder while RUNNING; only broker.leases sets it
    seq: int = 0  # submission order, set by JobTable.add; keeps FIFO when jobs come back
    failed_on: bytes | None = None  # the worker that failed it once: it runs elsewhere next
    # Which lease gave it to its worker (broker.leases sets it): a worker runs the batches
    # it holds one at a time, oldest lease first, so only its oldest is running.
    lease: int = 0
    told: int | None = None  # the position its client last heard (ACCEPTED)
    done_share: float = 0.0  # how far its worker got (last PROGRESS step / steps), 0..1
    started: bool = False  # its worker said it runs it (a PROGRESS): no place in line now
    inputs: tuple[Any, ...] = ()  # an edit's frames (JobSpec.frames), as the SUBMIT had them
    enqueued: int = -1  # which enqueueing its queue entry stands for (FairQueue sets it)
    # What its identity was charged when the fair queue last dispatched it, refunded once if
    # it comes back unfinished; 0 for a job never dispatched here (claimed after a restart).
    charged: float = 0.0
    # Other frontends' connections following it (WATCH): they get its PROGRESS and place in
    # line too, never its outcome, which its owner settles in the shared job records.
    watchers: list[bytes] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def input_bytes(self) -> int:
        return sum(len(frame) for frame in self.inputs)

    @property
    def model(self) -> str:
        return self.spec.model


class Usage(Protocol):
    """Each identity's jobs against its limits (broker/quotas.py): told of every job whose
    state changes here, and asked who may start no more."""

    def recount(self, job: Job, *, held: bool) -> None: ...

    def running_full(self, tenant: str, starting: int = 0) -> bool: ...


class JobTable:
    """Owns job state; only the broker thread touches it.

    Every change of a job's state happens here, and ``usage`` hears of each one: it counts
    each identity's queued and running jobs for its limits, and no path of the broker can
    change a job's state without it knowing.

    Queues hold Job objects and are cleaned lazily: a cancelled or expired job stays in its
    queue until it reaches the head, so removal is O(1) and dispatch skips stale entries. They
    hold objects, not ids, so a stale entry never stands for a later job that reuses its id.
    """

    def __init__(self, *, max_queue: int, max_attempts: int, usage: Usage | None = None,
                 blocked: Callable[[str], bool] | None = None) -> None:
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self._usage = usage
        # Called with a job's identity (``spec.identity``): True while it runs as many
        # jobs as its quota allows, so none of its queued jobs may start now. None: never;
        # by default, what ``usage`` says.
        self._blocked = blocked if blocked is not None or usage is None else usage.running_full
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, FairQueue] = {}
        self._queued: dict[str, int] = {}  # model -> number of QUEUED jobs
        self._queued_work: dict[str, float] = {}  # model -> their JobSpec.work, summed
        self.input_bytes = 0  # the edit frames every job held here carries, all together
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, job id)
        self._seq = itertools.count()

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def queue_depth(self, model: str) -> int:
        return self._queued.get(model, 0)

    def queued_work(self, model: str) -> float:
        """The megapixel-steps of ``model``'s queued jobs, all of them."""
        return self._queued_work.get(model, 0.0)

    def depths(self) -> dict[str, int]:
        return {model: n for model, n in self._queued.items() if n}

    def models_waiting(self) -> list[str]:
        return [model for model, n in self._queued.items() if n]

    def load_by_identity(self, limit: int) -> list[dict[str, Any]]:
        """Each identity's queued and running jobs per model, the busiest ``limit`` first
        (STATUS_REPLY, /v1/cluster, the metrics). O(jobs held): asked a few times a second."""
        load: dict[tuple[str, str], list[int]] = {}
        for job in self._jobs.values():
            counts = load.setdefault((job.model, job.spec.identity), [0, 0])
            counts[job.state is JobState.RUNNING] += 1
        busiest = sorted(load.items(), key=lambda item: (-sum(item[1]), item[0]))[:limit]
        return [{"model": model, "identity": identity, "queued": queued, "running": running}
                for (model, identity), (queued, running) in busiest]

    def is_full(self, model: str) -> bool:
        return self.queue_depth(model) >= self.max_queue

    def add(self, job: Job) -> int:
        """Queue a new job at the tail of its identity's line; return its position in fair
        order (0 = next)."""
        self._track(job)
        self._enqueue(job, at_head=False)
        place = self._queues[job.model].place(job, POSITION_SCAN)
        return place if place is not None else self.queue_depth(job.model) - 1

    def _track(self, job: Job) -> None:
        job.seq = next(self._seq)
        self._jobs[job.id] = job
        self.input_bytes += job.input_bytes
        heapq.heappush(self._deadlines, (job.deadline, job.id))
        if len(self._deadlines) > 2 * len(self._jobs) + 1024:
            # Answered jobs leave their entries behind until their deadline: drop them.
            self._deadlines = [(j.deadline, j.id) for j in self._jobs.values()]
            heapq.heapify(self._deadlines)

    def _enqueue(self, job: Job, *, at_head: bool) -> None:
        job.state = JobState.QUEUED
        job.told = None  # back in line (requeued, handed back): its client hears its place anew
        job.done_share = 0.0
        job.started = False
        queue = self._queues.get(job.model)
        if queue is None:
            queue = self._queues[job.model] = FairQueue(self._is_stale, self._blocked)
        queue.push(job, at_head=at_head)
        self._count(job, 1)
        self._moved(job)

    def _count(self, job: Job, sign: int) -> None:
        """Count ``job`` in (1) or out of (-1) its model's queued jobs and their work."""
        model = job.model
        self._queued[model] = self._queued.get(model, 0) + sign
        work = self._queued_work.get(model, 0.0) + sign * job.spec.work
        # A running sum of floats drifts: an empty queue holds no work, exactly.
        self._queued_work[model] = max(0.0, work) if self._queued[model] else 0.0

    def take_batch(self, model: str, worker: bytes, max_batch: int, *,
                   runnable: Callable[[JobSpec], bool] | None = None) -> list[Job]:
        """Take the next queued job of ``model`` in fair order that ``worker`` can run, plus
        queued jobs with its batch key, in fair order too.

        They are RUNNING from now on; ``Leases.lease`` gives them to ``worker`` once they are
        sent. Jobs that already failed on ``worker``, or that ``runnable`` says it cannot run
        (it lacks their LoRA adapters), are left for another worker; jobs of identities at
        their running limit (``blocked``) stay queued in their place for later.
        """
        queue = self._queues.get(model)
        if queue is None or not self.queue_depth(model):
            return []
        head = queue.first(lambda job: job.failed_on != worker
                           and (runnable is None or runnable(job.spec)))
        if head is None:
            return []
        batch = [head]
        if max_batch > 1:
            key = head.spec.batch_key()
            for job in queue.dispatchable():
                if len(batch) >= max_batch:
                    break
                if job is not head and job.failed_on != worker \
                        and job.spec.batch_key() == key and not self._full_with(job, batch):
                    batch.append(job)
        queue.take(batch)
        for job in batch:
            self._count(job, -1)
            job.state = JobState.RUNNING
            self._moved(job)
        return batch

    def drop_queue(self, model: str) -> list[Job]:
        """Forget every queued job of ``model``; return them, oldest first."""
        queue = self._queues.pop(model, None)
        dropped = queue.drop() if queue is not None else []
        for job in dropped:
            del self._jobs[job.id]
            self.input_bytes -= job.input_bytes
            self._moved(job)
        self._queued[model] = 0
        self._queued_work[model] = 0.0
        return dropped

    def head(self, model: str, limit: int) -> list[Job]:
        """The first ``limit`` queued jobs of ``model``, in the order they will be served
        (identities at their running limit included where their turn falls: a forecast)."""
        queue = self._queues.get(model)
        return list(itertools.islice(queue.ordered(), limit)) if queue is not None else []

    def _is_stale(self, job: Job) -> bool:
        return self._jobs.get(job.id) is not job or job.state is not JobState.QUEUED

    def claim(self, job: Job) -> None:
        """Take a queued job out of its queue: a worker already runs it (it re-registered)."""
        if job.state is JobState.QUEUED:
            self._dequeue(job)  # its queue entry is stale from now on
        job.state = JobState.RUNNING
        self._moved(job)

    def add_running(self, job: Job) -> None:
        """Take a new job that a worker already runs: RUNNING at once, never queued."""
        self._track(job)
        job.state = JobState.RUNNING
        self._moved(job)

    def finish(self, job_id: str) -> Job | None:
        """Forget a job (answered, cancelled or failed); return it if it was known."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self.input_bytes -= job.input_bytes
        if job is not None and job.state is JobState.QUEUED:
            self._dequeue(job)
        if job is not None:
            self._moved(job)
        return job

    def _full_with(self, job: Job, batch: list[Job]) -> bool:
        """Whether ``job``'s identity would pass its running limit if ``job`` started with
        ``batch``: a batch mate must not take it past, as its batch's head could not."""
        if self._usage is None:
            return False
        tenant = job.spec.identity
        starting = sum(1 for other in batch if other.spec.identity == tenant)
        return self._usage.running_full(tenant, starting)

    def _moved(self, job: Job) -> None:
        if self._usage is not None:
            self._usage.recount(job, held=self._jobs.get(job.id) is job)

    def _dequeue(self, job: Job) -> None:
        """Count a queued job out that leaves its queue other than by dispatch."""
        queue = self._queues.get(job.model)
        if queue is not None:
            queue.discard(job)
        self._count(job, -1)

    def requeue(self, job: Job) -> bool:
        """Put a lost job back at the head of its queue; False when it used up its attempts."""
        job.attempt += 1
        if job.attempt >= self.max_attempts:
            return False
        self._enqueue(job, at_head=True)
        return True

    def hand_back(self, job: Job) -> None:
        """Put a job a worker returned unstarted back at the head, without counting an attempt."""
        self._enqueue(job, at_head=True)

    def expired(self, now: float) -> list[Job]:
        """Pop every job whose deadline has passed, queued or running."""
        gone: list[Job] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            job = self._jobs.get(job_id)
            if job is not None and job.deadline <= now:
                self.finish(job_id)
                gone.append(job)
        return gone
