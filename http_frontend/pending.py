"""A submitted job as the frontend's request threads see it: its latest state and recent news.

The I/O thread records each message from the broker with ``update()``; a job that fails here
(cancelled, expired, refused before it was sent) is ended with ``fail()``. Either way a job ends
once, with its ``result`` (the RESULT message) or its ``error`` (a ``JobError``; a FAILED
message becomes one as it arrives). Any number of request threads follow along
(``events_after``). What is kept is bounded whatever a worker sends: the latest queue position,
the latest step, the latest preview of each image, the outcome, and a short log of recent
events (``LOG_MESSAGES``, ``LOG_BYTES``) so a follower that keeps up sees every event in order.
A follower the log no longer reaches (it connected late, or fell behind a flood) gets the
latest state instead.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from broker.protocol import MAX_IMAGES, ErrorCode, JobSpec, Message, MsgType
from http_frontend.errors import JobError

LOG_MESSAGES = 64  # recent events kept for followers
LOG_BYTES = 8 << 20  # payload bytes those may hold (previews); the newest is always kept

Event = Message | JobError  # what followers see: the broker's messages, and how the job failed


class PendingJob:
    """A submitted job: its latest state, a bounded log of recent events, its outcome."""

    def __init__(self, job_id: str, spec: JobSpec | None = None, *, owner: str = "",
                 inputs: tuple[bytes, ...] = ()) -> None:
        self.job_id = job_id
        self.spec = spec
        self.owner = owner  # the broker owner it was submitted under
        self.inputs = inputs  # an edit's frames, sent again with the job after a reconnect
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when its first step came (time.monotonic)
        self.position: int | None = None
        self.work_ahead: float | None = None  # megapixel-steps before it starts (ACCEPTED)
        self.step = 0
        self.steps = 0
        self.result: Message | None = None  # the RESULT, once it came
        self.error: JobError | None = None  # why the job failed, once it did
        self.cancelled_here = False  # the error is this frontend's own cancel
        self._accepted: Message | None = None  # the latest ACCEPTED
        self._previews: dict[int, Message] = {}  # image index -> its latest preview
        self._log: collections.deque[tuple[int, Event, int]] = collections.deque()
        self._log_bytes = 0
        self._seq = 0  # events recorded so far; a follower's cursor counts the same way
        self._changed = threading.Condition()
        self._when_done: list[Callable[[PendingJob], None]] = []

    @property
    def outcome(self) -> Event | None:
        """How the job ended: its RESULT or its error; None while it runs."""
        return self.result if self.result is not None else self.error

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def when_done(self, callback: Callable[[PendingJob], None]) -> None:
        """Call ``callback(self)`` once the job ends (at once if it has): on the thread that
        ends it, often the broker client's I/O thread, so it must not block."""
        with self._changed:
            if not self.done:
                self._when_done.append(callback)
                return
        callback(self)

    def update(self, msg: Message) -> None:
        """Record one message from the broker; the first RESULT or FAILED ends the job."""
        with self._changed:
            if self.done:
                return  # exactly one outcome: anything after it is dropped
            event = self._keep_state(msg)
            if event is not None:
                self._append(event)
        self._call_when_done()

    def fail(self, error: JobError) -> bool:
        """End the job with ``error``, unless it already ended; whether it did."""
        with self._changed:
            if self.done:
                return False
            self.error = error
            self._append(error)
        self._call_when_done()
        return True

    def cancel(self, message: str = "the job was cancelled") -> bool:
        """End the job as cancelled by this frontend, unless it already ended."""
        with self._changed:
            if self.done:
                return False
            self.cancelled_here = True
            self.error = JobError(ErrorCode.CANCELLED, message)
            self._append(self.error)
        self._call_when_done()
        return True

    def _call_when_done(self) -> None:
        with self._changed:
            if not self.done:
                return
            self.inputs = ()  # an ended job is never sent again: its edit frames can go
            callbacks, self._when_done = self._when_done, []
        for callback in callbacks:
            callback(self)

    def compact(self) -> None:
        """Keep only the outcome of a finished job (the jobs API keeps those for minutes):
        the previews are of no use once the images are here."""
        with self._changed:
            outcome = self.outcome
            if outcome is None:
                return
            self._previews.clear()
            self._log = collections.deque(e for e in self._log if e[1] is outcome)
            self._log_bytes = sum(size for _, _, size in self._log)

    def wait_taken(self, timeout: float) -> None:
        """Wait until the broker took the job (it has a position) or the job ended."""
        with self._changed:
            self._changed.wait_for(lambda: self.position is not None or self.done,
                                   max(0.0, timeout))

    def events_after(self, cursor: int, timeout: float) -> tuple[list[Event], int]:
        """Events recorded after ``cursor`` (0: from the start), waiting up to ``timeout``
        for one, and the cursor to pass next time.

        A cursor older than the log reaches gets the job's latest state instead: position,
        each image's latest preview, the latest step, and the outcome once there is one.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._seq > cursor, max(0.0, timeout))
            if cursor >= self._seq:
                return [], cursor
            oldest = self._log[0][0] if self._log else self._seq + 1
            if cursor + 1 >= oldest:
                return [m for seq, m, _ in self._log if seq > cursor], self._seq
            return self._state(), self._seq

    # ---------------------------------------------------------------- under the lock

    def _keep_state(self, msg: Message) -> Event | None:
        """Fold ``msg`` into the latest state; the event followers see, or None for a message
        this job cannot have."""
        if msg.type is MsgType.ACCEPTED:
            self.position = msg["position"]
            self.work_ahead = msg.get("work_ahead")
            self._accepted = msg
            self.step = 0  # waiting again (its worker was lost): not running any more
        elif msg.type is MsgType.PROGRESS:
            if self.started_at is None:
                self.started_at = time.monotonic()
            # A preview is encoded apart and may come after later steps: never back.
            step = max(self.step, msg["step"]) if msg.payloads else msg["step"]
            self.step, self.steps = step, msg["steps"]
            if msg.payloads:
                index = msg.get("image_index") or 0
                if not 0 <= index < self._images():
                    return None  # a preview for an image nobody asked for
                self._previews[index] = msg
        elif msg.type is MsgType.RESULT:
            self.result = msg
        elif msg.type is MsgType.FAILED:
            self.error = JobError.from_failed(msg)
            return self.error
        else:
            return None
        return msg

    def _images(self) -> int:
        return len(self.spec.seeds) if self.spec is not None else MAX_IMAGES

    def _append(self, event: Event) -> None:
        self._seq += 1
        size = sum(_size(frame) for frame in event.payloads) if isinstance(event, Message) else 0
        self._log.append((self._seq, event, size))
        self._log_bytes += size
        while len(self._log) > LOG_MESSAGES or (self._log_bytes > LOG_BYTES
                                                and len(self._log) > 1):
            _, _, dropped = self._log.popleft()
            self._log_bytes -= dropped
        self._changed.notify_all()

    def _state(self) -> list[Event]:
        state: list[Event] = [self._accepted] if self._accepted is not None else []
        state += [self._previews[i] for i in sorted(self._previews)]
        if self.steps:  # the latest step, after the previews that may be older
            state.append(Message(MsgType.PROGRESS, {"job_id": self.job_id, "step": self.step,
                                                    "steps": self.steps}))
        if self.outcome is not None:
            state.append(self.outcome)
        return state


def _size(frame: Any) -> int:
    return len(frame)  # bytes, memoryview or zmq.Frame: none is copied
