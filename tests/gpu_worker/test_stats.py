"""gpu_worker.stats: what a worker measures of itself, from fake timings; what it leaves out
on a CPU; and that the worker's heartbeats carry it."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest

from broker import protocol
from broker.protocol import MsgType, WorkerStats
from gpu_worker.link import BrokerLink
from gpu_worker.stats import WINDOW, DeviceProbe, StatsRecorder
from gpu_worker.worker import Worker, WorkerConfig
from tests.broker.fakes import FakeClock, make_spec
from tests.gpu_worker.test_worker import FakeLink, FakeRunner


class FakeProbe(DeviceProbe):
    """A CUDA device that answers what the test says, or raises it."""

    def __init__(self, *, used: Any = 3 << 30, total: Any = 80 << 30,
                 percent: Any = 45.0) -> None:
        super().__init__("cuda:0")
        self._broken.clear()  # whatever this host has installed, NVML "answers" here
        self.readings = {"used": used, "total": total, "percent": percent}
        self.calls = 0

    def _reading(self, name: str) -> Any:
        self.calls += 1
        value = self.readings[name]
        if isinstance(value, Exception):
            raise value
        return value

    def _used(self) -> int:
        return int(self._reading("used"))

    def _total_memory(self) -> int:
        return int(self._reading("total"))

    def _nvml_percent(self) -> float:
        return float(self._reading("percent"))


def run_batch(stats: StatsRecorder, clock: FakeClock, *, jobs: int = 1, images: int = 1,
              steps: int = 4, prelude: float = 0.5, step: float = 0.25,
              decode: float = 0.5) -> None:
    """A batch on the fake clock: text encoding, ``steps`` steps, then decoding."""
    stats.batch_started()
    clock.advance(prelude)
    for _ in range(steps):
        clock.advance(step)
        stats.step()
    clock.advance(decode)
    stats.batch_finished(jobs=jobs, images=images, steps=steps)


# ------------------------------------------------------------------------------ timings


def test_nothing_measured_before_the_first_batch() -> None:
    stats = StatsRecorder("cpu", clock=FakeClock())
    assert stats.snapshot() == WorkerStats(jobs_done=0, images_done=0, images_per_second=0.0)


def test_step_time_is_between_step_callbacks_not_the_whole_batch() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    clock.advance(10.0)
    run_batch(stats, clock, steps=4, prelude=2.0, step=0.25, decode=3.0)
    snapshot = stats.snapshot()
    assert snapshot is not None
    assert snapshot.step_seconds == pytest.approx(0.25)


def test_without_step_callbacks_the_batch_time_is_split_over_its_steps() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    stats.batch_started()
    clock.advance(2.0)
    stats.batch_finished(jobs=1, images=1, steps=8)
    snapshot = stats.snapshot()
    assert snapshot is not None and snapshot.step_seconds == pytest.approx(0.25)


def test_one_step_is_timed_from_the_batch_start() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    run_batch(stats, clock, steps=1, prelude=0.5, step=0.25, decode=1.0)
    snapshot = stats.snapshot()
    assert snapshot is not None and snapshot.step_seconds == pytest.approx(0.75)


def test_images_per_second_counts_the_last_minute_only() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    run_batch(stats, clock, jobs=1, images=0, steps=1, prelude=0, step=0.5, decode=0)
    clock.advance(300.0)  # working long enough for a whole window
    run_batch(stats, clock, jobs=2, images=6, steps=2, prelude=0, step=0.5, decode=0)
    clock.advance(WINDOW - 10)
    run_batch(stats, clock, jobs=1, images=3, steps=2, prelude=0, step=0.5, decode=0)
    first = stats.snapshot()
    assert first is not None
    assert first.images_per_second == pytest.approx(9 / WINDOW)
    assert (first.jobs_done, first.images_done, first.batch_size) == (4, 9, 1)
    clock.advance(30.0)  # the first batch left the window; the totals stay
    later = stats.snapshot()
    assert later is not None
    assert later.images_per_second == pytest.approx(3 / WINDOW)
    assert (later.jobs_done, later.images_done) == (4, 9)


def test_a_young_worker_divides_by_its_working_time_not_the_whole_window() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    clock.advance(100.0)  # loading and warming up: not time it could have generated in
    run_batch(stats, clock, images=4, steps=4, prelude=0.5, step=0.5, decode=1.5)  # 4 s
    snapshot = stats.snapshot()
    assert snapshot is not None and snapshot.images_per_second == pytest.approx(1.0)


def test_what_a_step_drew_is_kept_with_its_time() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    stats.batch_started()
    clock.advance(1.0)
    stats.batch_finished(jobs=2, images=4, steps=4, megapixels=1.5)
    snapshot = stats.snapshot()
    assert snapshot is not None
    assert (snapshot.step_seconds, snapshot.step_megapixels) == (0.25, 1.5)


def test_a_batch_that_never_finished_counts_nothing() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cpu", clock=clock)
    stats.batch_started()
    stats.step()  # then the pipeline raised: batch_finished is never called
    run_batch(stats, clock, jobs=2, images=2, steps=2, prelude=0, step=0.5, decode=0)
    snapshot = stats.snapshot()
    assert snapshot is not None
    assert (snapshot.jobs_done, snapshot.batch_size) == (2, 2)
    assert snapshot.step_seconds == pytest.approx(0.5)


def test_every_snapshot_is_a_valid_heartbeat() -> None:
    clock = FakeClock()
    stats = StatsRecorder("cuda:0", clock=clock, probe=FakeProbe())
    run_batch(stats, clock)
    frames = protocol.encode(MsgType.HEARTBEAT, {"running": [], "stats": stats.snapshot()})
    assert WorkerStats.from_wire(protocol.decode(frames)["stats"]) == stats.snapshot()


# ------------------------------------------------------------------------------ the device


def test_a_cpu_worker_reports_no_memory_and_no_utilization_and_loads_no_cuda() -> None:
    probe = DeviceProbe("cpu")
    assert probe.memory() == (None, None)
    assert probe.utilization() is None
    snapshot = StatsRecorder("cpu", probe=probe).snapshot()
    assert snapshot is not None
    wire = snapshot.to_wire()
    assert not {"memory_used_bytes", "memory_total_bytes", "utilization"} & set(wire)


def test_a_cuda_worker_reports_memory_and_utilization() -> None:
    stats = StatsRecorder("cuda:0", clock=FakeClock(), probe=FakeProbe(percent=45.0))
    snapshot = stats.snapshot()
    assert snapshot is not None
    assert (snapshot.memory_used_bytes, snapshot.memory_total_bytes) == (3 << 30, 80 << 30)
    assert snapshot.utilization == pytest.approx(0.45)


def test_a_failing_reading_is_left_out_logged_once_and_not_tried_again(
        caplog: pytest.LogCaptureFixture) -> None:
    probe = FakeProbe(percent=RuntimeError("NVML: driver not loaded"))
    stats = StatsRecorder("cuda:0", clock=FakeClock(), probe=probe)
    with caplog.at_level(logging.WARNING, logger="gpu_worker.stats"):
        first, second = stats.snapshot(), stats.snapshot()
    assert first is not None and second is not None
    assert first.utilization is None and second.utilization is None
    assert first.memory_used_bytes == 3 << 30  # the other readings go on
    assert len([r for r in caplog.records if "utilization" in r.getMessage()]) == 1
    calls = probe.calls
    stats.snapshot()
    assert probe.calls == calls + 2  # used and total memory; NVML is not asked again


def test_without_nvml_bindings_utilization_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    probe = DeviceProbe("cuda:0")
    assert probe.utilization() is None


def test_a_snapshot_that_fails_sends_the_heartbeat_without_stats(
        caplog: pytest.LogCaptureFixture) -> None:
    probe = FakeProbe()
    probe.memory = lambda: 1 / 0  # type: ignore[method-assign,assignment,return-value]
    stats = StatsRecorder("cuda:0", clock=FakeClock(), probe=probe)
    with caplog.at_level(logging.ERROR, logger="gpu_worker.stats"):
        assert stats.snapshot() is None
        assert stats.snapshot() is None
    assert len(caplog.records) == 1


# ------------------------------------------------------------------------------ the worker


class Holding:
    """A link handler that holds nothing."""

    def on_jobs(self, batch: list[protocol.JobSpec], inputs: Any = ()) -> None: ...

    def on_cancel(self, job_id: str) -> None: ...

    def held(self) -> list[str]:
        return []


def test_heartbeats_carry_the_stats_when_given_and_none_without() -> None:
    stats = WorkerStats(jobs_done=2, images_done=5, step_seconds=0.1)
    with_stats = BrokerLink("tcp://127.0.0.1:1", {}, handler=Holding(), stats=lambda: stats)
    without = BrokerLink("tcp://127.0.0.1:1", {}, handler=Holding())
    failing = BrokerLink("tcp://127.0.0.1:1", {}, handler=Holding(), stats=lambda: None)
    try:
        assert protocol.decode(with_stats.on_beat()).fields == {"running": [],
                                                                "stats": stats.to_wire()}
        assert protocol.decode(without.on_beat()).fields == {"running": []}
        assert protocol.decode(failing.on_beat()).fields == {"running": []}
    finally:
        for link in (with_stats, without, failing):
            link.stop(bye=False)


def test_the_worker_counts_the_batches_it_runs() -> None:
    link = FakeLink()
    worker = Worker(WorkerConfig(worker_id="w", max_batch=2, warm_up=False),
                    runner=FakeRunner(steps=3))
    worker.link = link
    worker.on_jobs([make_spec("a", seeds=(1, 2)), make_spec("b", seeds=(3,))])
    batch = worker._next_batch(timeout=0)
    assert batch is not None
    worker._run_batch(batch)  # the job loop's one step, on this thread
    worker._encoder.shutdown(wait=True)
    snapshot = worker.stats.snapshot()
    assert snapshot is not None
    assert (snapshot.jobs_done, snapshot.images_done, snapshot.batch_size) == (2, 3, 2)
    # Each step drew the batch's three 64x64 images: what the broker's work ahead counts.
    assert snapshot.step_megapixels == pytest.approx(3 * 64 * 64 / 1e6)
    assert snapshot.step_seconds is not None and snapshot.images_per_second is not None
    assert snapshot.memory_used_bytes is None and snapshot.utilization is None  # a CPU
    assert [m.type for m in link.sent].count(MsgType.RESULT) == 2
