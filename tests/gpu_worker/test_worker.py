"""The worker's job loop against a fake link and a fake pipeline: every job it receives gets
exactly one answer, and a cancelled one never runs to its end."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from broker import protocol
from broker.protocol import ErrorCode, JobSpec, Message, MsgType
from gpu_worker import worker as worker_module
from gpu_worker.pipeline import Interrupted, StepCallback
from gpu_worker.worker import Worker, WorkerConfig
from tests.broker.fakes import make_spec

WAIT = 10.0  # generous: a failure shows as a timeout, never as a flaky pass
ANSWERS = (MsgType.RESULT, MsgType.FAILED)


class FakeLink:
    """Records what the worker sends, decoded; the test plays the I/O thread itself."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.changed = threading.Condition()
        self.alive = True
        self.stopped_with_bye: bool | None = None

    def start(self) -> None:
        pass

    def send(self, frames: list[Any]) -> None:
        msg = protocol.decode(frames)  # what the broker would read, or a ProtocolError
        with self.changed:
            self.sent.append(msg)
            self.changed.notify_all()

    def stop(self, *, bye: bool = True) -> None:
        self.stopped_with_bye = bye
        self.alive = False

    def answers(self, job_id: str) -> list[Message]:
        with self.changed:
            return [m for m in self.sent if m.type in ANSWERS and m["job_id"] == job_id]

    def wait_answer(self, job_id: str) -> Message:
        """The job's answer, once it came."""
        with self.changed:
            assert self.changed.wait_for(lambda: self._answered(job_id), WAIT), self.sent
        return self.answers(job_id)[0]

    def _answered(self, job_id: str) -> bool:
        return any(m.type in ANSWERS and m["job_id"] == job_id for m in self.sent)


class FakeRunner:
    """A pipeline without a model: calls on_step `steps` times and returns blank images.

    With `hold`, each batch waits before every step until the test calls release(), so a test
    can act while a batch runs; `entered` says a batch is waiting there.
    """

    def __init__(self, steps: int = 3, *, hold: bool = False,
                 error: Exception | None = None) -> None:
        self.steps = steps
        self.hold = hold
        self.error = error
        self.batches: list[list[str]] = []  # the job ids of each call, in order
        self.interrupted_at: list[int] = []
        self.entered = threading.Event()
        self._go = threading.Event()

    def release(self) -> None:
        self.hold = False
        self._go.set()

    def prompt_error(self, job: JobSpec) -> str | None:
        return "weights run from 0 to 10" if "(x:99)" in job.prompt else None

    def generate_batch(self, jobs: list[JobSpec], on_step: StepCallback | None = None,
                       inputs: Any = None) -> list[list[Image.Image]]:
        self.batches.append([job.id for job in jobs])
        if self.error is not None:
            raise self.error
        for step in range(1, self.steps + 1):
            if self.hold:
                self.entered.set()
                assert self._go.wait(WAIT), "the test never released the batch"
            if on_step is not None and not on_step(step, self.steps, []):
                self.interrupted_at.append(step)
                raise Interrupted()
        return [[Image.new("RGB", (job.width, job.height)) for _ in job.seeds] for job in jobs]


class Running:
    """A Worker whose job loop runs on a thread, fed by the test as the link's thread would."""

    def __init__(self, runner: FakeRunner, max_batch: int = 2) -> None:
        self.link = FakeLink()
        self.runner = runner
        self.worker = Worker(WorkerConfig(worker_id="w", max_batch=max_batch, warm_up=False),
                             runner=runner)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="job-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(link=self.link)
        except BaseException as exc:  # the test's thread reports it
            self.error = exc

    def stop(self) -> None:
        self.runner.release()
        self.worker.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert self.error is None, self.error

    def sets(self) -> tuple[set[str], set[str]]:
        """The worker's own bookkeeping: held and cancelled ids."""
        with self.worker._lock:
            return set(self.worker._held), set(self.worker._cancelled)


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(runner: FakeRunner | None = None, **kwargs: Any) -> Running:
        started.append(Running(runner or FakeRunner(), **kwargs))
        return started[-1]

    yield start
    for each in started:
        if each.thread.is_alive():
            each.stop()


def assert_cancelled(msg: Message) -> None:
    assert msg.type is MsgType.FAILED, msg
    assert (msg["code"], msg["message"]) == (ErrorCode.CANCELLED, "cancelled")


# ------------------------------------------------------------------------------ answers


def test_ready_names_the_heartbeat_interval_the_link_uses() -> None:
    worker = Worker(WorkerConfig(worker_id="w", heartbeat=0.5, warm_up=False),
                    runner=FakeRunner())
    frames = protocol.encode(MsgType.READY, worker.ready_fields())
    assert protocol.decode(frames)["heartbeat"] == 0.5


def test_a_job_gets_one_result_and_is_forgotten(running: Callable[..., Running]) -> None:
    run = running()
    run.worker.on_jobs([make_spec("a", seeds=(1, 2))])
    answer = run.link.wait_answer("a")
    assert answer.type is MsgType.RESULT and len(answer.payloads) == 2
    assert answer["worker_id"] == "w"
    run.stop()
    assert len(run.link.answers("a")) == 1
    assert run.sets() == (set(), set())
    assert run.link.stopped_with_bye is True


def test_a_worker_error_answers_without_traceback_or_path(
        running: Callable[..., Running]) -> None:
    error = RuntimeError("CUDA out of memory loading /home/alice/models/flux/unet.bin\n"
                         "Traceback (most recent call last): ...")
    run = running(FakeRunner(error=error))
    run.worker.on_jobs([make_spec("a"), make_spec("b")])
    for job_id in ("a", "b"):
        answer = run.link.wait_answer(job_id)
        assert answer.type is MsgType.FAILED and answer["code"] == ErrorCode.WORKER_ERROR
        message = answer["message"]
        assert message.startswith("generation failed: RuntimeError: CUDA out of memory")
        assert "/home" not in message and "alice" not in message
        assert "Traceback" not in message and "\n" not in message
    run.stop()
    assert [len(run.link.answers(j)) for j in ("a", "b")] == [1, 1]
    assert run.sets() == (set(), set())


# ------------------------------------------------------------------------------ cancelling


def test_a_prefetched_job_cancelled_while_another_batch_runs_never_starts(
        running: Callable[..., Running]) -> None:
    # Issue item 4: the broker leases two batches (capacity 2 x max_batch); the second waits
    # while the first runs, and is cancelled there. The old loop cleared the cancel mark and
    # then filtered on it, so the job ran to its end and sent a RESULT nobody wanted.
    runner = FakeRunner(hold=True)
    run = running(runner)
    run.worker.on_jobs([make_spec("running")])
    assert runner.entered.wait(WAIT)
    run.worker.on_jobs([make_spec("waiting")])
    assert run.worker.held() == ["running", "waiting"]
    run.worker.on_cancel("waiting")
    # Answered at once, not when the batch before it ends: the broker frees the slot on it.
    assert_cancelled(run.link.wait_answer("waiting"))
    assert runner.batches == [["running"]]
    assert run.worker.held() == ["running"]
    runner.release()
    assert run.link.wait_answer("running").type is MsgType.RESULT
    run.stop()
    assert runner.batches == [["running"]]  # "waiting" never reached the pipeline
    assert len(run.link.answers("waiting")) == 1
    assert run.sets() == (set(), set())


def test_a_job_cancelled_between_taking_and_starting_its_batch_never_runs() -> None:
    # The narrow window: the job loop took the batch off the queue, then the CANCEL came. It is
    # filtered out when the batch starts (driven by hand here, to hit the window every time).
    runner = FakeRunner()
    worker = Worker(WorkerConfig(worker_id="w", max_batch=2, warm_up=False), runner=runner)
    link = worker.link = FakeLink()
    worker.on_jobs([make_spec("kept"), make_spec("gone")])
    batch = worker._next_batch(timeout=0)
    assert batch is not None and [job.id for job in batch] == ["kept", "gone"]
    worker.on_cancel("gone")
    assert link.answers("gone") == []  # not waiting any more: marked, answered at the start
    worker._run_batch(batch)
    assert runner.batches == [["kept"]]
    assert_cancelled(link.wait_answer("gone"))
    assert link.wait_answer("kept").type is MsgType.RESULT
    worker._encoder.shutdown(wait=True)
    assert worker.held() == [] and worker._cancelled == set()


def test_a_job_cancelled_during_a_step_is_interrupted_and_answered(
        running: Callable[..., Running]) -> None:
    runner = FakeRunner(steps=5, hold=True)
    run = running(runner)
    run.worker.on_jobs([make_spec("a")])
    assert runner.entered.wait(WAIT)  # inside the pipeline, before step 1 ends
    run.worker.on_cancel("a")
    runner.release()
    assert_cancelled(run.link.wait_answer("a"))
    assert runner.interrupted_at == [1]  # stopped at its next step, not after all 5
    run.stop()
    assert len(run.link.answers("a")) == 1
    assert run.sets() == (set(), set())


def test_cancelling_part_of_a_batch_lets_the_rest_finish(
        running: Callable[..., Running]) -> None:
    runner = FakeRunner(steps=3, hold=True)
    run = running(runner)
    run.worker.on_jobs([make_spec("keep"), make_spec("drop")])
    assert runner.entered.wait(WAIT)
    run.worker.on_cancel("drop")
    runner.release()
    assert run.link.wait_answer("keep").type is MsgType.RESULT
    assert_cancelled(run.link.wait_answer("drop"))
    run.stop()
    assert runner.interrupted_at == []  # one job still wanted the batch
    assert [len(run.link.answers(j)) for j in ("keep", "drop")] == [1, 1]
    progress = [m["job_id"] for m in run.link.sent if m.type is MsgType.PROGRESS]
    assert progress.count("keep") == 3 and "drop" not in progress  # cancelled before step 1
    assert run.sets() == (set(), set())


def test_a_job_cancelled_while_its_images_are_encoded_gets_no_result(
        running: Callable[..., Running], monkeypatch: pytest.MonkeyPatch) -> None:
    encoding, finish = threading.Event(), threading.Event()
    real_encode = worker_module.encode_image

    def slow_encode(image: Image.Image, fmt: str, compression: int | None = None,
                    **options: Any) -> bytes:
        encoding.set()
        assert finish.wait(WAIT)
        return real_encode(image, fmt, compression, **options)

    monkeypatch.setattr(worker_module, "encode_image", slow_encode)
    run = running()
    run.worker.on_jobs([make_spec("a")])
    assert encoding.wait(WAIT)  # the device is done; the encoder thread has the images
    assert run.worker.held() == ["a"]  # held until answered, encoding included
    run.worker.on_cancel("a")
    finish.set()
    assert_cancelled(run.link.wait_answer("a"))
    run.stop()
    assert [m.type for m in run.link.answers("a")] == [MsgType.FAILED]
    assert run.sets() == (set(), set())


def test_late_or_unknown_cancels_leave_nothing_behind(running: Callable[..., Running]) -> None:
    run = running()
    run.worker.on_cancel("never-ours")
    run.worker.on_jobs([make_spec("a")])
    assert run.link.wait_answer("a").type is MsgType.RESULT
    run.worker.on_cancel("a")  # the CANCEL crossed the RESULT on the wire
    run.worker.on_cancel("a")
    assert run.sets() == (set(), set())
    run.stop()
    assert [m.type for m in run.link.answers("a")] == [MsgType.RESULT]
    assert run.link.answers("never-ours") == []


def test_held_lists_running_and_prefetched_jobs_until_answered(
        running: Callable[..., Running]) -> None:
    runner = FakeRunner(hold=True)
    run = running(runner, max_batch=2)
    assert run.worker.held() == []
    run.worker.on_jobs([make_spec("r1"), make_spec("r2")])
    assert runner.entered.wait(WAIT)
    run.worker.on_jobs([make_spec("w1"), make_spec("w2")])
    assert run.worker.held() == ["r1", "r2", "w1", "w2"]
    run.worker.on_jobs([make_spec("w1")])  # sent again while held: not run twice
    runner.release()
    for job_id in ("r1", "r2", "w1", "w2"):
        assert run.link.wait_answer(job_id).type is MsgType.RESULT
    assert run.worker.held() == []
    run.stop()
    assert runner.batches == [["r1", "r2"], ["w1", "w2"]]
    assert all(len(run.link.answers(j)) == 1 for j in ("r1", "r2", "w1", "w2"))


def test_stopping_finishes_the_running_batch_and_leaves_the_waiting_one_to_the_bye(
        running: Callable[..., Running]) -> None:
    runner = FakeRunner(hold=True)
    run = running(runner)
    run.worker.on_jobs([make_spec("running")])
    assert runner.entered.wait(WAIT)
    run.worker.on_jobs([make_spec("waiting")])
    run.worker.stop()  # SIGTERM
    runner.release()
    run.thread.join(WAIT)
    assert not run.thread.is_alive() and run.error is None
    assert run.link.wait_answer("running").type is MsgType.RESULT
    assert runner.batches == [["running"]]
    assert run.link.answers("waiting") == []  # the broker takes it back on the BYE
    assert run.link.stopped_with_bye is True
