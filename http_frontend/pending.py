"""A submitted job as the frontend's request threads see it: its latest state and recent news.

The I/O thread records each message with ``update()``; any number of request threads wait for
the answer (``wait``) or follow along (``events_after``). What is kept is bounded whatever a
worker sends: the latest queue position, the latest step, the latest preview of each image,
the answer, and a short log of recent messages (``LOG_MESSAGES``, ``LOG_BYTES``) so a follower
that keeps up sees every message in order. A follower the log no longer reaches (it connected
late, or fell behind a flood) gets the latest state instead.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from broker.protocol import MAX_IMAGES, ErrorCode, JobSpec, Message, MsgType

LOG_MESSAGES = 64  # recent messages kept for followers
LOG_BYTES = 8 << 20  # payload bytes those may hold (previews); the newest is always kept


class PendingJob:
    """A submitted job: its latest state, a bounded log of recent messages, its answer."""

    def __init__(self, job_id: str, spec: JobSpec | None = None) -> None:
        self.job_id = job_id
        self.spec = spec
        self.submitted_at = time.monotonic()
        self.position: int | None = None
        self.step = 0
        self.steps = 0
        self.answer: Message | None = None  # the RESULT or FAILED, once it came
        self.cancelled_here = False  # the answer is this frontend's own cancel
        self._accepted: Message | None = None  # the latest ACCEPTED
        self._previews: dict[int, Message] = {}  # image index -> its latest preview
        self._log: collections.deque[tuple[int, Message, int]] = collections.deque()
        self._log_bytes = 0
        self._seq = 0  # messages recorded so far; a follower's cursor counts the same way
        self._changed = threading.Condition()

    @property
    def done(self) -> bool:
        return self.answer is not None

    def update(self, msg: Message) -> None:
        """Record one message for this job; the first RESULT or FAILED is its answer."""
        with self._changed:
            if self.answer is not None:
                return  # exactly one answer: anything after it is dropped
            if not self._keep_state(msg):
                return
            self._append(msg)

    def cancel(self, message: str = "the job was cancelled") -> bool:
        """Answer the job as cancelled by this frontend, unless an answer came first."""
        with self._changed:
            if self.answer is not None:
                return False
            self.cancelled_here = True
            self.answer = Message(MsgType.FAILED, {
                "job_id": self.job_id, "code": ErrorCode.CANCELLED.value, "message": message,
                "retryable": False})
            self._append(self.answer)
            return True

    def compact(self) -> None:
        """Keep only the answer of a finished job (the jobs API keeps those for minutes):
        the previews are of no use once the images are here."""
        with self._changed:
            if self.answer is None:
                return
            self._previews.clear()
            self._log = collections.deque(e for e in self._log if e[1] is self.answer)
            self._log_bytes = sum(size for _, _, size in self._log)

    def wait(self, timeout: float) -> Message | None:
        """The RESULT or FAILED for this job, or None when ``timeout`` passes first."""
        with self._changed:
            self._changed.wait_for(lambda: self.answer is not None, max(0.0, timeout))
            return self.answer

    def wait_taken(self, timeout: float) -> None:
        """Wait until the broker took the job (it has a position) or answered it."""
        with self._changed:
            self._changed.wait_for(lambda: self.position is not None or self.answer is not None,
                                   max(0.0, timeout))

    def events_after(self, cursor: int, timeout: float) -> tuple[list[Message], int]:
        """Messages recorded after ``cursor`` (0: from the start), waiting up to ``timeout``
        for one, and the cursor to pass next time.

        A cursor older than the log reaches gets the job's latest state instead: position,
        each image's latest preview, the latest step, and the answer once there is one.
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

    def _keep_state(self, msg: Message) -> bool:
        """Fold ``msg`` into the latest state; False for a message this job cannot have."""
        if msg.type is MsgType.ACCEPTED:
            self.position = msg["position"]
            self._accepted = msg
        elif msg.type is MsgType.PROGRESS:
            self.step, self.steps = msg["step"], msg["steps"]
            if msg.payloads:
                index = msg.get("image_index") or 0
                if not 0 <= index < self._images():
                    return False  # a preview for an image nobody asked for
                self._previews[index] = msg
        elif msg.type in (MsgType.RESULT, MsgType.FAILED):
            self.answer = msg
        else:
            return False
        return True

    def _images(self) -> int:
        return len(self.spec.seeds) if self.spec is not None else MAX_IMAGES

    def _append(self, msg: Message) -> None:
        self._seq += 1
        size = sum(_size(frame) for frame in msg.payloads)
        self._log.append((self._seq, msg, size))
        self._log_bytes += size
        while len(self._log) > LOG_MESSAGES or (self._log_bytes > LOG_BYTES
                                                and len(self._log) > 1):
            _, _, dropped = self._log.popleft()
            self._log_bytes -= dropped
        self._changed.notify_all()

    def _state(self) -> list[Message]:
        state = [self._accepted] if self._accepted is not None else []
        state += [self._previews[i] for i in sorted(self._previews)]
        if self.steps:  # the latest step, after the previews that may be older
            state.append(Message(MsgType.PROGRESS, {"job_id": self.job_id, "step": self.step,
                                                    "steps": self.steps}))
        if self.answer is not None:
            state.append(self.answer)
        return state


def _size(frame: Any) -> int:
    return len(frame)  # bytes, memoryview or zmq.Frame: none is copied
