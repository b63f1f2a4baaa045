"""What a worker measures of itself for its heartbeats: speed, batches, work done, device.

The device thread only records: a clock read and a few assignments per step and per batch,
nothing that waits on the device or on a driver. The link's I/O thread takes a ``snapshot``
for each heartbeat, and device memory and utilisation are read then, on that thread. What
cannot be measured here is left out (None), never made up: memory on CUDA devices only,
utilisation only where NVML (the ``nvidia-ml-py`` package) answers.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from broker.protocol import WorkerStats

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds over which images per second is measured
MAX_BATCHES = 10_000  # batches kept for the window: a bound, whatever their pace

T = TypeVar("T")


@dataclass(frozen=True)
class _Batch:
    finished_at: float
    images: int


class StatsRecorder:
    """The worker's own counts and timings; the worker owns it.

    ``batch_started``, ``step`` and ``batch_finished`` run on the device thread, and the
    running batch's timings are that thread's alone. What a snapshot reads (finished batches,
    totals) is shared with the I/O thread, under the lock.
    """

    def __init__(self, device: str, *, clock: Callable[[], float] = time.monotonic,
                 probe: DeviceProbe | None = None) -> None:
        self._clock = clock
        self._probe = probe if probe is not None else DeviceProbe(device)
        self._since: float | None = None  # the first batch's start: loading is not idle time
        # The running batch: the device thread's alone.
        self._started: float | None = None
        self._first_step: float | None = None
        self._last_step: float | None = None
        self._steps_seen = 0
        # Finished work, read by snapshot() on the I/O thread.
        self._lock = threading.Lock()
        self._recent: deque[_Batch] = deque(maxlen=MAX_BATCHES)
        self._jobs_done = 0
        self._images_done = 0
        self._step_seconds: float | None = None
        self._batch_size: int | None = None
        self._step_megapixels: float | None = None
        self._snapshot_failed = False

    # ---------------------------------------------------------------- the device thread

    def batch_started(self) -> None:
        self._started = self._clock()
        if self._since is None:
            with self._lock:
                self._since = self._started
        self._first_step = self._last_step = None
        self._steps_seen = 0

    def step(self) -> None:
        """A denoising step ended (the pipeline's step callback)."""
        now = self._clock()
        if self._first_step is None:
            self._first_step = now
        self._last_step = now
        self._steps_seen += 1

    def batch_finished(self, *, jobs: int, images: int, steps: int,
                       megapixels: float | None = None) -> None:
        """A batch's images are made (encoding follows elsewhere): count it. ``megapixels``:
        all its images' pixels, what each of its steps drew (in millions)."""
        now = self._clock()
        step_seconds = self._measured_step(now, steps)
        with self._lock:
            self._recent.append(_Batch(now, images))
            self._jobs_done += jobs
            self._images_done += images
            self._batch_size = jobs
            if step_seconds is not None:
                # Time and size together: the broker's work ahead is in megapixel-steps.
                self._step_seconds, self._step_megapixels = step_seconds, megapixels
        self._started = None

    def _measured_step(self, now: float, steps: int) -> float | None:
        """Seconds per step of the batch that just ended.

        Between the first and the last step callback when there were two or more: the time
        before the first step (text encoding) and after the last (decoding) is not a step's.
        With one, from the batch's start to it; with none, the whole batch over its steps.
        """
        started, first, last = self._started, self._first_step, self._last_step
        if first is not None and last is not None and self._steps_seen >= 2:
            return (last - first) / (self._steps_seen - 1)
        if started is None:
            return None
        if last is not None:
            return max(0.0, last - started)
        return max(0.0, now - started) / steps if steps >= 1 else None

    # ---------------------------------------------------------------- the I/O thread

    def snapshot(self) -> WorkerStats | None:
        """The stats for a heartbeat; None (and logged once) if taking them failed."""
        try:
            return self._snapshot()
        except Exception:  # a heartbeat without stats beats a dead I/O thread
            if not self._snapshot_failed:
                self._snapshot_failed = True
                log.exception("worker stats failed; heartbeats go without them")
            return None

    def _snapshot(self) -> WorkerStats:
        now = self._clock()
        with self._lock:
            while self._recent and self._recent[0].finished_at <= now - WINDOW:
                self._recent.popleft()
            images = sum(batch.images for batch in self._recent)
            jobs_done, images_done = self._jobs_done, self._images_done
            step_seconds, batch_size = self._step_seconds, self._batch_size
            step_megapixels = self._step_megapixels
            since = self._since
        # Over the window, or since the worker's first batch began when that is shorter
        # (loading and warm-up are not time it could have worked); 0 before its first.
        window = 0.0 if since is None else min(WINDOW, now - since)
        used, total = self._probe.memory()
        return WorkerStats(
            jobs_done=jobs_done, images_done=images_done, step_seconds=step_seconds,
            images_per_second=images / window if window > 0 else 0.0,
            batch_size=batch_size, step_megapixels=step_megapixels,
            memory_used_bytes=used, memory_total_bytes=total,
            utilization=self._probe.utilization())


class DeviceProbe:
    """Memory and utilisation of the CUDA device a worker runs on; None on other devices.

    Only the I/O thread reads it (``StatsRecorder.snapshot``). A reading that fails once is
    left out from then on (logged once): a driver that fails will fail again, and each try
    may be slow.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.split(":", 1)[0] == "cuda"
        self._broken: set[str] = set()
        if self.cuda and importlib.util.find_spec("pynvml") is None:
            self._broken.add("utilization")  # no NVML bindings: nothing to ask
        self._total: int | None = None

    def memory(self) -> tuple[int | None, int | None]:
        """(bytes this process's PyTorch allocator holds, the device's bytes), or Nones."""
        if not self.cuda:
            return None, None
        return (self._read("memory", self._used), self._read("memory", self._total_memory))

    def utilization(self) -> float | None:
        """The share of the last sample period (1/6 s to 1 s) a kernel ran, 0..1 (NVML)."""
        if not self.cuda:
            return None
        percent = self._read("utilization", self._nvml_percent)
        return None if percent is None else min(1.0, max(0.0, percent / 100))

    def _read(self, what: str, reading: Callable[[], T]) -> T | None:
        if what in self._broken:
            return None
        try:
            return reading()
        except Exception as exc:
            self._broken.add(what)
            log.warning("cannot read device %s of %s (%s: %s); left out of the worker stats",
                        what, self.device, type(exc).__name__, exc)
            return None

    # torch is imported here only: a CPU worker's stats never load CUDA.
    def _used(self) -> int:
        import torch

        # Allocator bookkeeping, no driver call: safe on this thread while the device works.
        return int(torch.cuda.memory_reserved(self.device))

    def _total_memory(self) -> int:
        if self._total is None:
            import torch

            self._total = int(torch.cuda.get_device_properties(self.device).total_memory)
        return self._total

    def _nvml_percent(self) -> float:
        import torch

        # Through torch: it maps the device to NVML's numbering (CUDA_VISIBLE_DEVICES).
        return float(torch.cuda.utilization(self.device))
