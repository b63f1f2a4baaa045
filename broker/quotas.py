"""Each identity's usage against its limits: jobs queued, jobs running, submissions a minute.

An identity (``JobSpec.tenant``: an API key's name) has limits when its jobs carry a
``Quota``; the frontend puts its keys file's limits on every job, so the latest job's limits
are the identity's. They count across all models, and here, in the broker, so that sending
to another frontend gets round none of them:

- ``max_queued``: a new job of an identity with that many jobs queued is refused;
- ``per_minute``: a token bucket of that many tokens, refilled at ``per_minute / 60`` a
  second; a new job takes one, and one with none left is refused until the next comes;
- ``max_running``: none of its queued jobs starts while it has that many on workers
  (``running_full``, which the fair queue asks); nothing is refused for it.

Only the broker thread calls this. Counts follow the job table, which calls ``recount`` at
every change of a job's state (queued, running, gone: broker/jobs.py makes them all), and a
job is counted in the state it was last seen in, so calling it twice, or for a job whose
state did not change, costs nothing and counts nothing twice. Identities with nothing
queued or running and a full bucket are forgotten, so memory follows the active ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from broker.jobs import Job, JobState
from broker.protocol import JobSpec, Quota


@dataclass(frozen=True)
class Refusal:
    """Why a new job is turned away: the limit it hit, a message naming it, and the seconds
    until a retry can succeed where known (None: the broker cannot tell)."""

    limit: str
    message: str
    retry_after: float | None = None


@dataclass(eq=False)
class _Usage:
    """One identity's jobs and tokens, against the limits its latest job carried."""

    limits: Quota | None
    tokens: float
    filled_at: float  # when ``tokens`` was last brought up to date
    queued: int = 0
    running: int = 0
    # The bucket's size: the latest per_minute any job carried. A job without one (from a
    # frontend whose keys file gives the key no rate) lifts the limit for itself, but the
    # bucket goes on refilling at the rate it had, so that the next job with the rate finds
    # what was left, not a full bucket bought by one job through another frontend.
    bucket: int | None = None

    @property
    def idle(self) -> bool:
        return not self.queued and not self.running

    def refill(self, now: float) -> None:
        bucket = self.bucket
        if bucket is None:
            return
        rate = bucket / 60.0
        # A clock that went back (a test's) must not take tokens away.
        self.tokens = min(float(bucket), self.tokens + max(0.0, now - self.filled_at) * rate)
        self.filled_at = now

    @property
    def capacity(self) -> int | None:
        """The rate in force: the latest job's per_minute."""
        return None if self.limits is None else self.limits.per_minute

    def bucket_full(self, now: float) -> bool:
        self.refill(now)
        return self.bucket is None or self.tokens >= self.bucket



class Quotas:
    """Every limited identity's usage; ``admit`` a new job, ``recount`` a job that moved."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._counted: dict[Job, JobState] = {}  # job -> the state it is counted in
        self._idle: set[str] = set()  # identities with nothing counted: forgotten when full

    def __len__(self) -> int:
        """How many identities are remembered."""
        return len(self._usage)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(jobs queued, jobs running) of ``tenant``, as counted."""
        found = self._usage.get(tenant)
        return (0, 0) if found is None else (found.queued, found.running)

    # ---------------------------------------------------------------- submissions

    def admit(self, spec: JobSpec, now: float, *, enforce: bool = True) -> Refusal | None:
        """None, and a token taken, when a new job of ``spec``'s identity may be queued; else
        why not. Call it for new jobs only: a resubmission is the job already counted.
        Without ``enforce`` only the identity's limits are taken note of (its jobs count)."""
        usage = self._track_limits(spec, now)
        if usage is None or usage.limits is None or not enforce:
            return None
        refusal = self._over_queued(spec, usage) or self._over_rate(spec, usage, now)
        if refusal is None and usage.capacity is not None:
            usage.tokens -= 1.0  # the bucket is the rate in force: the latest job set both
        return refusal

    def _track_limits(self, spec: JobSpec, now: float) -> _Usage | None:
        """The usage record of ``spec``'s identity, under the limits ``spec`` carries (the
        latest job's limits win); None for an identity without limits and without one."""
        tenant = spec.identity
        usage = self._usage.get(tenant)
        if usage is None:
            if spec.quota is None:
                return None  # the usual case, and the cheapest: nothing to count
            capacity = spec.quota.per_minute
            usage = self._usage[tenant] = _Usage(spec.quota, float(capacity or 0), now,
                                                 bucket=capacity)
            self._idle.add(tenant)
            return usage
        usage.refill(now)
        had_bucket = usage.bucket is not None
        usage.limits = spec.quota
        capacity = usage.capacity
        if capacity is not None:
            # A first rate starts full, as for a new identity; a lowered one keeps no more.
            usage.tokens = min(usage.tokens, float(capacity)) if had_bucket else float(capacity)
            usage.filled_at = now
            usage.bucket = capacity
        return usage

    @staticmethod
    def _over_queued(spec: JobSpec, usage: _Usage) -> Refusal | None:
        limit = usage.limits.max_queued if usage.limits is not None else None
        if limit is None or usage.queued < limit:
            return None
        return Refusal("max_queued", f"{_name(spec)} has {usage.queued} jobs queued, its "
                                     f"limit (max_queued={limit}); try again when one has "
                                     f"started or ended")

    @staticmethod
    def _over_rate(spec: JobSpec, usage: _Usage, now: float) -> Refusal | None:
        capacity = usage.capacity
        if capacity is None or usage.tokens >= 1.0:
            return None
        wait = (1.0 - usage.tokens) * 60.0 / capacity
        return Refusal("per_minute", f"{_name(spec)} sent the {capacity} jobs a minute its "
                                     f"limit allows (per_minute={capacity}); the next may come "
                                     f"in {math.ceil(wait)} s", retry_after=wait)

    # ---------------------------------------------------------------- counting

    def recount(self, job: Job, *, held: bool) -> None:
        """Count ``job`` in the state it is in now: QUEUED or RUNNING while the job table
        ``held`` it, nowhere once it is gone (answered, failed, cancelled, expired, dropped)."""
        was = self._counted.get(job)
        state = job.state if held else None
        if was is state:
            return
        tenant = job.spec.identity
        usage = self._usage.get(tenant)
        if was is None and usage is None:
            return  # an identity without limits: never counted
        if was is not None:
            self._count(tenant, was, -1)
            del self._counted[job]
        if state is not None:
            self._count(tenant, state, 1)
            self._counted[job] = state

    def _count(self, tenant: str, state: JobState, sign: int) -> None:
        usage = self._usage[tenant]  # kept while it has jobs counted (forget_idle)
        if state is JobState.QUEUED:
            usage.queued += sign
        else:
            usage.running += sign
        if usage.idle:
            self._idle.add(tenant)
        else:
            self._idle.discard(tenant)

    def count_claimed(self, job: Job, now: float) -> None:
        """Count a new job a worker already runs (it registered again after a broker
        restart): never refused, but it takes its identity's room like any other."""
        self._track_limits(job.spec, now)
        self.recount(job, held=True)

    def running_full(self, tenant: str, starting: int = 0) -> bool:
        """Whether ``tenant`` runs as many jobs as it may, counting ``starting`` more about to
        start with it (a batch being made): then none of its queued jobs starts."""
        usage = self._usage.get(tenant)
        if usage is None or usage.limits is None or usage.limits.max_running is None:
            return False
        return usage.running + starting >= usage.limits.max_running

    def forget_idle(self, now: float) -> None:
        """Forget the identities with nothing queued or running and a full bucket."""
        for tenant in [t for t in self._idle if self._usage[t].bucket_full(now)]:
            del self._usage[tenant]
            self._idle.discard(tenant)


def _name(spec: JobSpec) -> str:
    return spec.tenant or "the anonymous identity"
