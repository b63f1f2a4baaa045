"""Leases: which worker holds which job, with both sides kept in step.

A lease has two sides: the job's ``Job.worker`` and the holder's ``WorkerRecord.running``
(plus ``ending`` while a job the broker stopped still takes a slot). This module is the only
code that writes any of them; everything else reads them. It also keeps the claims of a
worker that registered again holding jobs no frontend has resubmitted yet (the broker
restarted), and it is where a worker leaves the registry together with its jobs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from broker import logs
from broker.counters import JobCounters
from broker.jobs import Job, JobState, JobTable
from broker.registry import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)


class Leases:
    """Owns the leases between a JobTable and a WorkerRegistry; only the broker thread calls it.

    It never sends anything: where a worker must be told to stop a job, the method returns
    that worker's identity and the broker sends the CANCEL.
    """

    def __init__(self, jobs: JobTable, workers: WorkerRegistry, *,
                 counters: JobCounters | None = None) -> None:
        self._jobs = jobs
        self._workers = workers
        # Requeues are counted where they happen; the broker passes the counters it reports.
        self._counters = counters or JobCounters(started=0.0)
        self._claims: dict[str, bytes] = {}  # job id -> worker holding it, not yet submitted
        self._leases = itertools.count(1)  # Job.lease stamps; 0: claimed, order unknown

    # ---------------------------------------------------------------- one job at a time

    def lease(self, worker: WorkerRecord, batch: list[Job], now: float) -> None:
        """Give ``worker`` a batch taken from its queue (``JobTable.take_batch``) and sent."""
        stamp = next(self._leases)
        for job in batch:
            job.worker = worker.identity
            job.lease = stamp
            # Leased again to a worker told to stop it before (it moved, then came back):
            # the slot is this lease's now, and a heartbeat not listing the stopped run must
            # not free it (settle), or the job would sit leased to no one until its deadline.
            worker.ending.pop(job.id, None)
        worker.running.update(job.id for job in batch)
        self._workers.offer(worker, dispatched=now)

    def waiting(self, model: str) -> list[Job]:
        """The jobs of ``model`` that workers hold but have not started, in the order they
        will start (oldest lease first).

        A worker runs the batches it holds one at a time, in the order they were leased
        (it holds up to two: one running, one waiting), so every batch but its oldest waits.
        Costs a look at each worker holding more than one batch's worth: called at most a
        few times a second per model, and once per submission.
        """
        waiting: list[Job] = []
        for worker in self._workers:
            if len(worker.running) < 2 or model not in worker.models:
                continue
            held = self._held(worker)
            if len(held) < 2:
                continue
            running = min(job.lease for job in held)
            # A job whose worker said it runs it has started, whatever the broker thought:
            # the batch before it may still be encoding, its answers on their way.
            waiting.extend(job for job in held if job.lease != running
                           and job.model == model and not job.started)
        return sorted(waiting, key=lambda job: (job.lease, job.seq))

    def running(self, model: str) -> list[Job]:
        """The jobs of the batches that the workers serving ``model`` run now, whatever
        their model: what those workers finish before they can start another of ``model``."""
        running: list[Job] = []
        for worker in self._workers:
            if not worker.running or model not in worker.models:
                continue
            held = self._held(worker)
            if held:
                oldest = min(job.lease for job in held)
                running.extend(job for job in held if job.lease == oldest or job.started)
        return running

    def _held(self, worker: WorkerRecord) -> list[Job]:
        return [job for job in map(self._jobs.get, worker.running)
                if job is not None and job.worker == worker.identity]

    def held(self, worker: WorkerRecord, job_id: str) -> Job | None:
        """The job ``job_id`` if ``worker`` holds its lease; None when it is not ours to answer
        (late: re-leased, cancelled, answered; or never leased)."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.worker == worker.identity else None

    def release(self, worker: WorkerRecord, job_id: str) -> None:
        """``worker`` no longer holds ``job_id`` (it answered): its slot is free.

        The job's side follows when the caller finishes the job or hands it back.
        """
        worker.ending.pop(job_id, None)
        if self._claims.get(job_id) == worker.identity:
            del self._claims[job_id]
        if job_id in worker.running:
            worker.running.discard(job_id)
            self._workers.offer(worker)

    def stop(self, job: Job, now: float) -> bytes | None:
        """The broker dropped a job (cancelled, expired, moved); the worker running it, to be
        sent a CANCEL, or None.

        That worker's slot stays taken (``ending``) until it says the job ended: freeing it
        now would lease another batch on top of one still on the device.
        """
        if job.state is not JobState.RUNNING or job.worker is None:
            return None
        worker = self._workers.get(job.worker)
        if worker is not None and job.id in worker.running:
            worker.ending[job.id] = now
        return job.worker

    def settle(self, worker: WorkerRecord, running: Iterable[str], now: float, *,
               after: float) -> None:
        """Free the slots of stopped jobs that ``worker`` no longer lists in ``running`` (its
        heartbeat) ``after`` seconds past the CANCEL: workers from before the cancel answer
        said nothing about a job they interrupted."""
        if not worker.ending:
            return
        still = set(running)
        for job_id, since in list(worker.ending.items()):
            if job_id not in still and now - since >= after:
                self.release(worker, job_id)

    def hand_back(self, job: Job) -> None:
        """Put a job back at the head of its queue, unstarted: no attempt is counted."""
        self._unlease(job)
        self._jobs.hand_back(job)

    def requeue(self, job: Job) -> bool:
        """Put a job whose worker was lost back at the head, counting an attempt; False, and
        the job is finished, when that was its last."""
        self._unlease(job)
        if self._jobs.requeue(job):
            return True
        self._jobs.finish(job.id)
        return False

    def _unlease(self, job: Job) -> None:
        holder = None if job.worker is None else self._workers.get(job.worker)
        if holder is not None and job.id in holder.running:
            holder.running.discard(job.id)
            self._workers.offer(holder)
        job.worker = None

    # ---------------------------------------------------------------- whole workers

    def drop_worker(self, worker: WorkerRecord, *, lost: bool) -> list[Job]:
        """Remove ``worker`` from the registry and put back the jobs it held.

        ``lost`` (it died, restarted or became unreachable): each job counts an attempt, and
        those that used up their attempts are finished and returned for the caller to fail.
        Otherwise it handed them back (BYE): no attempt, nothing fails.
        """
        self._workers.remove(worker.identity)
        failed: list[Job] = []
        for job in self._held_by(worker):
            if not lost:
                self.hand_back(job)
            elif self.requeue(job):
                self._counters.requeued(job.model)
                log.warning("job %s requeued after losing worker %s (attempt %d)",
                            job.id, worker.worker_id, job.attempt,
                            extra=logs.job_fields(job.spec, worker_id=worker.worker_id))
            else:
                failed.append(job)
        self._forget(worker)
        return failed

    def keep(self, old: WorkerRecord, new: WorkerRecord) -> None:
        """``new`` replaces ``old`` for the same connection (it sent READY again): it keeps
        its leases, its stopped jobs and its claims as they were."""
        new.running, new.ending = set(old.running), dict(old.ending)
        self._workers.offer(new)

    def move(self, old: WorkerRecord, new: WorkerRecord, held: set[str]) -> None:
        """The same worker process on a new connection: the leases it still ``held`` follow it,
        the others go back unstarted (no attempt), and ``old`` leaves the registry."""
        self._workers.remove(old.identity)
        for job in self._held_by(old):
            if job.id in held:
                job.worker = new.identity
                new.running.add(job.id)
            else:
                self.hand_back(job)
        self._forget(old)
        self._workers.offer(new)

    def claim(self, worker: WorkerRecord, job_id: str, now: float) -> bytes | None:
        """Make a job that ``worker`` says it holds (it registered again) its lease.

        An unknown job stays a claim until its frontend resubmits it (``take_claimed``). A job
        leased to another worker meanwhile (the broker restarted and leased it before this
        worker registered again) moves here: this one has had it longer. The other must stop
        it: its identity is returned, for a CANCEL.
        """
        if job_id in worker.running:
            return None
        job = self._jobs.get(job_id)
        stop = None
        if job is None:
            self._claims[job_id] = worker.identity
        else:
            if job.state is JobState.QUEUED:
                self._jobs.claim(job)
            else:
                stop = self.stop(job, now)
            job.worker = worker.identity
        worker.running.add(job_id)
        self._workers.offer(worker)
        return stop

    def take_claimed(self, job: Job) -> bool:
        """Take a new job that a registered worker claims: leased to it at once, never queued.
        Whether it was; either way the claim is spent."""
        identity = self._claims.pop(job.id, None)
        worker = None if identity is None else self._workers.get(identity)
        if worker is None or job.id not in worker.running or job.model not in worker.models:
            return False
        self._jobs.add_running(job)
        job.worker = worker.identity
        return True

    def _held_by(self, worker: WorkerRecord) -> list[Job]:
        """The jobs leased to ``worker``, newest first: putting each back at the head of its
        queue leaves them oldest first."""
        held = [job for job in map(self._jobs.get, worker.running)
                if job is not None and job.worker == worker.identity]
        return sorted(held, key=lambda job: job.seq, reverse=True)

    def _forget(self, worker: WorkerRecord) -> None:
        """Drop the claims of a record that is gone, and empty it."""
        for job_id in worker.running:
            if self._claims.get(job_id) == worker.identity:
                del self._claims[job_id]
        worker.running.clear()
        worker.ending.clear()
