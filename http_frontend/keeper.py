"""The frontend's caretaker of job records: leases, recovery, retention.

Every ``interval`` seconds, on a thread of its own, it
- renews the lease on every unfinished job this frontend follows, so the others leave them;
- records again the end of any job whose end could not be recorded (the database was down);
- marks the jobs it follows that have begun denoising as running;
- once the broker answers: takes the unfinished jobs nobody renews (their frontend died or
  was killed; right after a start also its own, from before the restart), and follows each
  again — a ``/v1/jobs`` job is submitted again under its id while its deadline lasts; a plain
  generation's client was on the connection that died, so its record ends as failed;
- now and then removes finished records past ``--history-days``, with their images.

It never raises out of its loop: a database that is down is logged and tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from broker.protocol import ErrorCode
from http_frontend.errors import JobError
from http_frontend.jobs_api import JobsAPI
from http_frontend.records import Record, input_names

log = logging.getLogger(__name__)

RETENTION_EVERY = 600.0  # seconds between history retention passes


class Keeper:
    def __init__(self, jobs: JobsAPI, *, connected: Callable[[], bool],
                 history_days: float | None, interval: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.jobs = jobs
        self.history = jobs.history
        self.connected = connected
        self.history_days = history_days
        # Renew three times per lease, so one slow pass never lets a lease lapse.
        self.interval = interval if interval is not None else self.history.lease / 3
        self._clock = clock
        # Records of this frontend id created before this moment are its previous life's.
        self._started = clock()
        self._reclaimed_own = False
        self._next_retention = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-keeper", daemon=True)
        self._retaining = threading.Thread()  # the retention pass running, if one is

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.join_retention(5.0)

    def join_retention(self, timeout: float) -> None:
        """Wait for a retention pass that is running, if one is."""
        if self._retaining.is_alive():
            self._retaining.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self.tend()
            except Exception:  # the database may be down: log, and try again next time
                log.exception("could not tend the job records")
            if self._stop.wait(self.interval):
                return

    def tend(self) -> None:
        """One pass: renew, mark, take over, retain."""
        now = self._clock()
        self.history.records.renew(self.history.frontend, now + self.history.lease)
        self.history.settle_again()
        self._mark_running()
        if self.connected():
            own_before = None if self._reclaimed_own else self._started
            claimed = self.history.records.claim(self.history.frontend, now,
                                                 now + self.history.lease,
                                                 own_before=own_before)
            self._reclaimed_own = True
            for record in claimed:
                self._take_over(record, now)
        if self.history_days is not None and now >= self._next_retention \
                and not self._retaining.is_alive():
            # On a thread of its own: a long first pass, or a slow store, must never keep
            # this one from renewing the leases in time.
            self._next_retention = now + RETENTION_EVERY
            self._retaining = threading.Thread(
                target=self._retain, args=(now - self.history_days * 86400,),
                name="history-retention", daemon=True)
            self._retaining.start()

    def _mark_running(self) -> None:
        """Every job this frontend follows (plain generations too) that took a step."""
        for tracked in self.history.following():
            if not tracked.marked_running and tracked.pending.step:
                tracked.marked_running = True
                self.history.mark_running(tracked.job.id)

    def _take_over(self, record: Record, now: float) -> None:
        if record.kind != "job":
            self.history.fail(record.id, JobError(
                ErrorCode.WORKER_LOST, "the frontend serving this request stopped before the "
                "job ended; its client was on that connection"))
        elif record.deadline <= now:
            self.history.fail(record.id, JobError(
                ErrorCode.TIMEOUT, "the job's deadline passed while no frontend followed it"))
        else:
            try:
                self.jobs.adopt(record, now)
            except Exception as exc:  # a record this release cannot read: end it, loudly
                log.exception("job %s: cannot follow it again", record.id,
                              extra={"job_id": record.id, "model": record.model,
                                     "user": record.owner})
                self.history.fail(record.id, JobError(
                    ErrorCode.INVALID_REQUEST, f"the job could not be resumed: {exc}"))

    def _retain(self, cutoff: float) -> None:
        try:
            self._remove_before(cutoff)
        except Exception:  # logged; the next pass tries again
            log.exception("could not apply history retention")

    def _remove_before(self, cutoff: float) -> None:
        removed = self.history.records.remove_finished_before(cutoff)
        if removed:
            self.history.delete_images(
                [record.images for record in removed]
                + [[{"name": name} for name in input_names(record.request)]
                   for record in removed])
            log.info("history: removed %d job record(s) older than %g day(s)", len(removed),
                     self.history_days)
