"""One model's queued jobs, served by priority class, and fairly between identities within one.

**Classes.** Every job has a priority class (``JobSpec.priority``, one of
``protocol.PRIORITIES``, highest first: ``interactive``, then ``batch``), its identity's class
as the keys file names it. A job of a higher class is dispatched before any job of a lower one,
with one exception so that nothing starves: a lower class with jobs queued gets a guaranteed
minimum share. A class passed over for ``LOWER_CLASS_EVERY - 1`` jobs in a row while it had jobs
queued is *due*, and the next pick is its (the highest due class first). So under a flood of
interactive jobs, batch jobs still get one dispatch in every ``LOWER_CLASS_EVERY``, and when
no interactive job is queued they get every one. The rule counts jobs, not work: it is a
guarantee of progress, not a split of GPU time (weights within a class do that), and counting
is what makes it exact and easy to predict. It counts every job dispatched, batch mates
included, so with batches the due class's turn comes at the first batch after nine jobs of
other classes. A class's count restarts when one of its jobs is dispatched or it has none
queued: waiting with nothing queued earns no turn.

**Identities, within a class.** Each identity (``JobSpec.tenant``: an API key's name, else
the request's ``user``, else one anonymous identity) has its own FIFO per class. Across
identities a class is served by start-time fair queueing (SFQ, Goyal et al. 1996), the
weighted scheme behind Linux's CFS:

- every identity has a *pass*: the virtual time at which its next job starts;
- the next job is the head of the identity with the lowest pass (ties: the older job);
- serving a job advances its identity's pass by the job's cost over its weight, where the cost
  is the job's denoising work (``JobSpec.work``, megapixel-steps): shares are of GPU time, so
  four large images cost four times one small one;
- an identity that had nothing queued starts at the virtual time now (the pass of the last job
  served) or at its own pass if that is later: idleness earns no credit to spend later as a
  burst, and one whose every job was dispatched at once still pays for them. Such idle
  debtors are remembered until the virtual time reaches them, at most ``IDLE_REMEMBERED``
  per class (past it, those that owe least are let off first), so identities that each send
  one job cannot grow the broker's memory for ever;
- the virtual time and every pass are moved back together past ``REBASE_AT``, so that a
  small job's charge still moves a pass however long the broker has run.

So with equal weights a user with 30 queued jobs and a user with 1 alternate, and weights 3:1
give a 3:1 split of the work served. SFQ rather than deficit round robin because DRR needs a
quantum at least one job's cost to stay O(1) per pick, and job costs here span orders of
magnitude (64x64 in 1 step to 4K in 50); SFQ is exact for any cost and weight, and O(log n) in
identities per pick with a heap of identities keyed by pass. Each class has its own virtual
time and its own flows, so a job's class is its own: an identity whose key changed class has
jobs in two lines, each served in its own class. The classes being a fixed few, a pick costs
O(log identities) still.

**Identities at their running limit.** ``blocked(tenant)`` (the broker's quotas) says an
identity already runs as many jobs as it may: ``first()`` and batch-mate selection pass over
its jobs, which stay queued where they are, and it is not charged for them. Its pass stays
where it was meanwhile, so when a job of its ends its next one is first in its class: an
identity held back by its limit runs at its limit. Passing over blocked identities costs a
pick O(blocked identities), not O(their jobs). Queue positions (``ordered()``) ignore
``blocked``: they are a forecast, and the limit is the identity's own to wait for.

Batch mates (queued jobs with the head's batch key) may come from any class and identity; each
is charged to its own identity in its own class as if it had been served alone, so riding along
is not free. Finding them scans the queue in fair order until the batch is full: O(queue) at
worst when few jobs match, as the FIFO's scan was before. A job handed back or requeued goes
to the head of its identity's FIFO in its class and the charge it paid (``Job.charged``) is
refunded, once, so it is next for its identity and its identity is where it stood before the
job was taken; a job this queue never dispatched (claimed by a worker after a restart) paid
nothing here and gets nothing back.

Entries go stale lazily (a job cancelled, expired, claimed or taken as a batch mate from the
middle of a FIFO stays where it is until it reaches the head): removal is O(1). Each entry
remembers which enqueueing of its job it stands for, so a job back in line never appears
twice. Heap entries go stale the same way; a key is re-checked when its entry reaches the top.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.protocol import PRIORITIES

if TYPE_CHECKING:
    from broker.jobs import Job


# A lower class's guaranteed minimum share: at least one job in every this many dispatched
# while it has jobs queued. 10 keeps a flood of interactive jobs at least 90% of the dispatches
# (an interactive job waits at most one batch job per nine ahead of it) and moves batch work on
# at a tenth of the cluster's pace however long the flood lasts.
LOWER_CLASS_EVERY = 10

# Idle identities that still owe (their pass ahead of the virtual time) remembered per class.
# Past this many, those that owe least are forgotten first: one that comes back starts at the
# virtual time, let off what it owed. Without a bound, callers that each send one job under a
# new ``user`` (or one identity that owes far ahead, holding up the rest) grow it for ever
# while the virtual time stands still.
IDLE_REMEMBERED = 1024

# Once a class's virtual time passes this, it and every pass are moved back by it. A float's
# precision falls as it grows: past some 1e10 the charge of a small job at a large weight no
# longer changes a pass at all, and that identity would be served ahead of its equals while
# it has jobs queued. Below 2**30 a pass is exact to some 1e-7 (a 64x64 step at weight 1000
# costs 4e-6), and moving back costs O(identities) once per 2**30 of virtual time.
REBASE_AT = float(2**30)

_RANKS = {name: rank for rank, name in enumerate(PRIORITIES)}  # 0 = the highest class

# (pass, seq of its head job, entry number): the key an identity is ordered by, and the entry
# number that makes the tuple unique and tells a current heap entry from a stale one.
_Key = tuple[float, int, int]



def rank_of(job: Job) -> int:
    """The job's class as an index into PRIORITIES (0 = highest); the protocol checks it."""
    return _RANKS.get(job.spec.priority, 0)


def charge(job: Job) -> float:
    """The virtual time a job costs its identity: its work over its weight."""
    return job.spec.work / job.spec.weight


def _never_blocked(tenant: str) -> bool:
    return False


@dataclass(eq=False)
class _Flow:
    """One identity's FIFO in one class of one model's queue."""

    tenant: str
    start: float  # the virtual time its next job starts at: its pass
    entries: deque[tuple[int, Job]] = field(default_factory=deque)  # (enqueueing, job)
    live: int = 0  # entries that stand for a queued job
    entry: int = -1  # the number of its current heap entry


class FairQueue:
    """Owns one model's queued jobs; only the broker thread touches it.

    ``is_gone(job)`` says whether the job table forgot the job or it is no longer queued;
    ``blocked(tenant)`` whether an identity may start no job now (its running limit).
    """

    def __init__(self, is_gone: Callable[[Job], bool],
                 blocked: Callable[[str], bool] | None = None) -> None:
        self._blocked = blocked or _never_blocked
        numbers = itertools.count()  # one count for every class: enqueueings stay unique
        self._classes = [_ClassQueue(is_gone, numbers) for _ in PRIORITIES]
        # Per class, the jobs dispatched in a row while it had jobs queued and none of them
        # was its (LOWER_CLASS_EVERY). The highest class is never due: it is served by default.
        self._passed = [0] * len(PRIORITIES)

    # ---------------------------------------------------------------- in and out

    def push(self, job: Job, *, at_head: bool = False) -> None:
        """Queue ``job`` at the tail of its identity's FIFO, or at its head (back in line)."""
        self._classes[rank_of(job)].push(job, at_head=at_head)

    def discard(self, job: Job) -> None:
        """Count out a queued job the table forgot or a worker claimed; its entry goes stale."""
        self._classes[rank_of(job)].discard(job)

    def take(self, batch: list[Job]) -> None:
        """Take ``batch`` (its head first) out of line and charge each job to its identity."""
        self._classes[rank_of(batch[0])].start(batch[0])
        for job in batch:
            queued = [line.live > 0 for line in self._classes]
            _count_pick(self._passed, queued, rank_of(job))
            self._classes[rank_of(job)].take(job)

    def drop(self) -> list[Job]:
        """Every queued job, oldest first; the queue is empty after."""
        jobs = sorted(self.ordered(), key=lambda job: job.seq)
        for line in self._classes:
            line.clear()
        self._passed = [0] * len(PRIORITIES)
        return jobs

    # ---------------------------------------------------------------- fair order

    def first(self, accepts: Callable[[Job], bool]) -> Job | None:
        """The first job in dispatch order (identities at their running limit passed over)
        that ``accepts``; O(log identities) when the next one does."""
        return next((job for job in self.dispatchable() if accepts(job)), None)

    def place(self, job: Job, limit: int) -> int | None:
        """``job``'s place in fair order (0 = next), if it is among the first ``limit``."""
        if self._classes[rank_of(job)].queued_for(job) > limit:
            return None  # its own identity's jobs alone put it past
        ahead = itertools.islice(self.ordered(), limit)
        return next((place for place, queued in enumerate(ahead) if queued is job), None)

    def ordered(self) -> Iterator[Job]:
        """The queued jobs in the order they will be served if no others come.

        Identities at their running limit are in it where their pass puts them: positions are
        a forecast, and whether a limit still holds when a job's turn comes is not known now.
        Nothing may change the queue while a caller iterates.
        """
        return self._merged(None)

    def dispatchable(self) -> Iterator[Job]:
        """The queued jobs that may start now, in the order they would: ``ordered()`` without
        the identities at their running limit."""
        return self._merged(self._blocked)

    def _merged(self, skip: Callable[[str], bool] | None) -> Iterator[Job]:
        """Simulate the picks across classes: each class's own fair order, merged by class
        with the minimum share counted as ``take`` counts it."""
        queued = [line for line in self._classes if line.live]
        if len(queued) <= 1:  # one class: its own order is the whole order
            return queued[0].ordered(skip) if queued else iter(())
        return self._interleaved(skip)

    def _interleaved(self, skip: Callable[[str], bool] | None) -> Iterator[Job]:
        # A class's next job is looked at only when its turn may have come, so a pick costs
        # what the one class it serves costs. ``left`` counts what each class has queued,
        # skipped identities' jobs included, as ``take`` counts it.
        lines = [line.ordered(skip) for line in self._classes]  # lazy: nothing runs yet
        left = [line.live for line in self._classes]
        nexts: list[Job | None] = [None] * len(lines)
        peeked = [False] * len(lines)
        passed = list(self._passed)

        def peek(rank: int) -> Job | None:
            if not peeked[rank]:
                nexts[rank], peeked[rank] = next(lines[rank], None), True
            return nexts[rank]

        while True:
            due = (rank for rank in range(1, len(lines))
                   if left[rank] and passed[rank] >= LOWER_CLASS_EVERY - 1)
            ranks = itertools.chain(due, (rank for rank in range(len(lines)) if left[rank]))
            rank = next((rank for rank in ranks if peek(rank) is not None), None)
            if rank is None or (job := nexts[rank]) is None:
                return
            yield job
            _count_pick(passed, [bool(count) for count in left], rank)
            left[rank] -= 1
            peeked[rank] = False


def _count_pick(passed: list[int], queued: list[bool], served: int) -> None:
    """Count one job of class ``served`` dispatched: every other class that had jobs queued
    was passed over once more; the served class and the empty ones start again from 0."""
    for rank, waiting in enumerate(queued):
        passed[rank] = passed[rank] + 1 if waiting and rank != served else 0


class _ClassQueue:
    """One class's jobs: a FIFO per identity, served across identities by SFQ."""

    def __init__(self, is_gone: Callable[[Job], bool], numbers: Iterator[int]) -> None:
        self._is_gone = is_gone
        self._numbers = numbers
        self._flows: dict[str, _Flow] = {}
        self._heap: list[tuple[float, int, int, _Flow]] = []
        self._vtime = 0.0  # the pass the last job served started at
        # Identities with nothing queued whose pass is still ahead of the virtual time: they
        # owe for what they were served, so one that queues again starts at its pass, not
        # now. A heap of (its pass when it went idle, number, flow): forgotten once the
        # virtual time reaches them, or, past IDLE_REMEMBERED, those that owe least first.
        # An entry whose flow queued again or went idle again since is stale.
        self._idle: list[tuple[float, int, _Flow]] = []
        self.live = 0  # the jobs queued in this class

    def push(self, job: Job, *, at_head: bool) -> None:
        tenant = job.spec.identity
        flow = self._flows.get(tenant)
        if flow is None:
            flow = self._flows[tenant] = _Flow(tenant, self._vtime)
        elif not flow.live:  # idle time earns no credit; what it owes, it still owes
            flow.start = max(flow.start, self._vtime)
        job.enqueued = next(self._numbers)
        if at_head:
            flow.entries.appendleft((job.enqueued, job))
            # Its charge back, once: it is next, as it was. A job this queue never charged (a
            # worker claimed it after a restart) has nothing to give back.
            flow.start -= job.charged
            job.charged = 0.0
        else:
            flow.entries.append((job.enqueued, job))
        flow.live += 1
        self.live += 1
        if at_head or flow.entry < 0:  # its key changed, or it has none yet
            self._reindex(flow)

    def discard(self, job: Job) -> None:
        flow = self._flows.get(job.spec.identity)
        if flow is not None:
            job.enqueued = -1
            self._count_out(flow)

    def start(self, head: Job) -> None:
        """Advance the virtual time to the pass ``head``'s identity serves it at."""
        self._vtime = max(self._vtime, self._flows[head.spec.identity].start)
        self._forget_idle()
        if self._vtime >= REBASE_AT:
            self._rebase()

    def take(self, job: Job) -> None:
        """Take ``job`` out of line and charge it to its identity."""
        flow = self._flows[job.spec.identity]
        job.enqueued = -1
        job.charged = charge(job)
        flow.start += job.charged
        self._count_out(flow)
        if flow.live:
            self._reindex(flow)

    def queued_for(self, job: Job) -> int:
        """The jobs ``job``'s identity has queued in this class."""
        flow = self._flows.get(job.spec.identity)
        return flow.live if flow is not None else 0

    def clear(self) -> None:
        self._flows.clear()
        self._heap.clear()
        self._idle.clear()
        self.live = 0

    def ordered(self, skip: Callable[[str], bool] | None) -> Iterator[Job]:
        """This class's queued jobs in the order it will serve them, identities that ``skip``
        says to pass over left out.

        Simulates the picks without changing anything: identities come off the heap best
        first (a walk of the heap's array from its root), each one's jobs in FIFO order with
        its pass advancing as serving them would advance it. Getting the first k costs
        O(k log k) plus the stale entries and skipped identities passed, however many
        identities there are. Nothing may change the queue while a caller iterates.
        """
        self._settle_top()  # stale entries at the top would be walked past on every call
        frontier: list[tuple[_Key, int]] = [(self._heap[0][:3], 0)] if self._heap else []
        running: list[tuple[_Key, Job, Iterator[Job], _Flow]] = []
        while True:
            # A heap entry's key is a lower bound of its identity's true key: pull in every
            # identity that may come before the best one being simulated.
            while frontier and (not running or frontier[0][0] <= running[0][0]):
                _, index = heapq.heappop(frontier)
                self._spread(frontier, index)
                flow = self._heap[index][3]
                if self._heap[index][2] == flow.entry and self._flows.get(flow.tenant) is flow \
                        and (skip is None or not skip(flow.tenant)):
                    jobs = self._live_jobs(flow)
                    if (job := next(jobs, None)) is not None:
                        key = (flow.start, job.seq, next(self._numbers))
                        heapq.heappush(running, (key, job, jobs, flow))
            if not running:
                return
            (start, _, _), job, jobs, flow = heapq.heappop(running)
            yield job
            if (after := next(jobs, None)) is not None:
                key = (start + charge(job), after.seq, next(self._numbers))
                heapq.heappush(running, (key, after, jobs, flow))

    def _spread(self, frontier: list[tuple[_Key, int]], index: int) -> None:
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(self._heap):
                heapq.heappush(frontier, (self._heap[child][:3], child))

    def _live_jobs(self, flow: _Flow) -> Iterator[Job]:
        return (job for number, job in flow.entries if self._stands(number, job))

    # ---------------------------------------------------------------- upkeep

    def _stands(self, number: int, job: Job) -> bool:
        """Whether an entry still stands for its job: its latest enqueueing, still queued."""
        return job.enqueued == number and not self._is_gone(job)

    def _count_out(self, flow: _Flow) -> None:
        flow.live -= 1
        self.live -= 1
        if flow.live > 0:
            return
        flow.live = 0
        flow.entries.clear()  # all stale
        flow.entry = -1  # its heap entries too
        if flow.start <= self._vtime:
            del self._flows[flow.tenant]
            return
        heapq.heappush(self._idle, (flow.start, next(self._numbers), flow))
        if len(self._idle) > IDLE_REMEMBERED:
            self._forget_idle(keep=IDLE_REMEMBERED)

    def _forget_idle(self, *, keep: int | None = None) -> None:
        """Forget the idle identities the virtual time has caught up with (they owe nothing),
        and, down to ``keep`` entries, those that owe least."""
        while self._idle:
            start, _, flow = self._idle[0]
            current = (not flow.live and flow.start == start
                       and self._flows.get(flow.tenant) is flow)
            if current and start > self._vtime and (keep is None or len(self._idle) <= keep):
                return
            heapq.heappop(self._idle)
            if current:
                del self._flows[flow.tenant]

    def _rebase(self) -> None:
        """Move the virtual time back to 0 and every pass with it: the order stays."""
        base, self._vtime = self._vtime, 0.0
        for flow in self._flows.values():
            flow.start -= base
        # Stale entries too: they are told from current ones by number, and by their key
        # compared with their flow's, moved by the same subtraction.
        self._heap = [(start - base, seq, number, flow)
                      for start, seq, number, flow in self._heap]
        heapq.heapify(self._heap)  # rounding may tie keys that were apart: heapify again
        self._idle = [(start - base, number, flow) for start, number, flow in self._idle]
        heapq.heapify(self._idle)

    def _reindex(self, flow: _Flow) -> None:
        """Drop the stale entries at the head of ``flow`` and push its key as it is now.

        Its entry at the top of the heap (the identity just served) is replaced rather than
        left stale: stale entries with low keys are what every walk of the heap passes.
        """
        while flow.entries and not self._stands(*flow.entries[0]):
            flow.entries.popleft()
        if not flow.entries:
            return
        on_top = bool(self._heap) and self._heap[0][2] == flow.entry
        flow.entry = next(self._numbers)
        entry = (flow.start, flow.entries[0][1].seq, flow.entry, flow)
        if on_top:
            heapq.heapreplace(self._heap, entry)
            return
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._flows) + 1024:
            self._compact()

    def _settle_top(self) -> None:
        """Pop stale heap entries until the top is an identity's current, true key."""
        while self._heap:
            start, seq, number, flow = self._heap[0]
            if number != flow.entry or self._flows.get(flow.tenant) is not flow:
                heapq.heappop(self._heap)
                continue
            while flow.entries and not self._stands(*flow.entries[0]):
                flow.entries.popleft()
            if not flow.entries:  # a miscount: nothing of it is queued after all
                heapq.heappop(self._heap)
                del self._flows[flow.tenant]
                self.live -= flow.live
                flow.live = 0
                flow.entry = -1
                continue
            if (start, seq) == (flow.start, flow.entries[0][1].seq):
                return
            self._reindex(flow)  # replaces its entry on top

    def _compact(self) -> None:
        """Rebuild the heap from the identities' current keys (stale entries pile up when
        keys change faster than the top is reached)."""
        self._heap = []
        for flow in self._flows.values():
            while flow.entries and not self._stands(*flow.entries[0]):
                flow.entries.popleft()
            if flow.entries:
                flow.entry = next(self._numbers)
                self._heap.append((flow.start, flow.entries[0][1].seq, flow.entry, flow))
        heapq.heapify(self._heap)
