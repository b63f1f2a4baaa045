"""A pending job keeps what its watchers need, bounded whatever the workers send."""

from __future__ import annotations

import threading

import pytest

from broker import protocol
from broker.protocol import ErrorCode, ImageInfo, JobSpec, Message, MsgType
from http_frontend import pending as pending_module
from http_frontend.errors import JobError
from http_frontend.pending import PendingJob

PREVIEW = b"p" * 100_000


def spec(n: int = 2) -> JobSpec:
    return JobSpec(id="j1", model="tiny", prompt="a fox", width=64, height=64, steps=1000,
                   seeds=tuple(range(n)), timeout=60.0)


def accepted(position: int) -> Message:
    return Message(MsgType.ACCEPTED, {"job_id": "j1", "position": position})


def progress(step: int, preview: bytes | None = None, image: int = 0) -> Message:
    fields = {"job_id": "j1", "step": step, "steps": 1000}
    if preview is None:
        return Message(MsgType.PROGRESS, fields)
    return Message(MsgType.PROGRESS, {**fields, "image_index": image}, (preview,))


def result() -> Message:
    return Message(MsgType.RESULT, {"job_id": "j1", "images": [
        ImageInfo(seed=0, width=64, height=64, format="png")]}, (b"png",))


def failed(code: str = "worker_lost", retryable: bool = True) -> Message:
    """A FAILED as the broker client decodes it from the wire."""
    return protocol.decode(protocol.encode(MsgType.FAILED, {
        "job_id": "j1", "code": code, "message": "the worker died", "retryable": retryable}))


def held_bytes(job: PendingJob) -> int:
    """Payload bytes the job holds, in its log and its latest state."""
    kept = {id(m): m for _, m, _ in job._log}
    kept |= {id(m): m for m in job._state()}
    return sum(len(frame) for m in kept.values() if isinstance(m, Message)
               for frame in m.payloads)


def test_a_flood_of_previews_stays_bounded_in_count_and_bytes():
    job = PendingJob("j1", spec())
    job.update(accepted(3))
    for step in range(1, 2001):
        job.update(progress(step, PREVIEW, image=step % 2))
    assert len(job._log) <= pending_module.LOG_MESSAGES
    assert held_bytes(job) <= pending_module.LOG_BYTES + 2 * len(PREVIEW)
    assert (job.step, job.position) == (2000, 3)


def test_a_late_watcher_gets_the_latest_state_in_order():
    job = PendingJob("j1", spec())
    for position in (5, 2, 0):
        job.update(accepted(position))
    for step in range(1, 500):
        job.update(progress(step, PREVIEW if step % 10 == 0 else None, image=(step // 10) % 2))
    job.update(progress(500))
    messages, cursor = job.events_after(0, 0.0)
    assert [m.type for m in messages] == [MsgType.ACCEPTED, MsgType.PROGRESS, MsgType.PROGRESS,
                                          MsgType.PROGRESS]
    assert messages[0]["position"] == 0
    previews = messages[1:3]
    assert [(m["image_index"], m["step"]) for m in previews] == [(0, 480), (1, 490)]
    assert messages[3]["step"] == 500 and not messages[3].payloads
    assert job.events_after(cursor, 0.0) == ([], cursor)
    job.update(result())
    messages, _ = job.events_after(cursor, 0.0)
    assert messages == [job.result]


def test_a_late_watcher_of_a_finished_job_ends_with_its_answer():
    job = PendingJob("j1", spec())
    for step in range(1, 200):
        job.update(progress(step))
    job.update(result())
    messages, _ = job.events_after(0, 0.0)
    assert messages[-1] is job.result is job.outcome
    assert messages[-2]["step"] == 199


def test_a_follower_that_keeps_up_sees_every_message_in_order():
    job = PendingJob("j1", spec())
    seen: list[Message] = []

    def follow() -> None:
        cursor = 0
        while True:
            messages, cursor = job.events_after(cursor, 5.0)
            seen.extend(messages)
            if job.done and seen and seen[-1] is job.outcome:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    sent = [accepted(0)] + [progress(s, PREVIEW if s % 3 == 0 else None)
                            for s in range(1, 300)] + [result()]
    for number, msg in enumerate(sent):
        job.update(msg)
        if number % (pending_module.LOG_MESSAGES // 2) == 0:
            # Keeping up: the follower is never a whole log behind.
            wait_for(lambda n=number: len(seen) > n)
    follower.join(10.0)
    assert seen == sent


def wait_for(predicate, timeout: float = 5.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("timed out")


def test_exactly_one_answer_and_nothing_after_it():
    job = PendingJob("j1", spec())
    job.update(result())
    job.update(progress(3))
    job.update(failed())
    assert job.fail(JobError(ErrorCode.TIMEOUT, "too late")) is False
    assert job.result is not None and job.error is None
    assert job.events_after(0, 0.0)[0] == [job.result]
    assert job.step == 0
    assert job.cancel() is False and job.cancelled_here is False


def test_a_preview_for_an_image_nobody_asked_for_is_dropped():
    job = PendingJob("j1", spec(n=2))
    job.update(progress(1, PREVIEW, image=7))
    job.update(progress(2, PREVIEW, image=1))
    messages, _ = job.events_after(0, 0.0)
    assert [m["image_index"] for m in messages] == [1]


def test_cancel_ends_the_job_as_cancelled_here():
    job = PendingJob("j1", spec())
    assert job.cancel() is True
    assert job.cancelled_here and job.done
    assert (job.error.code, job.error.retryable) == ("cancelled", False)
    job.update(result())  # too late
    assert job.result is None and job.error.code == "cancelled"


def test_a_failed_message_becomes_one_error_value_as_it_arrives():
    job = PendingJob("j1", spec())
    job.update(accepted(0))
    job.update(failed("queue_full", retryable=True))
    assert job.error == JobError("queue_full", "the worker died", retryable=True)
    assert job.done and job.result is None and not job.cancelled_here
    messages, _ = job.events_after(0, 0.0)
    assert messages[-1] is job.error is job.outcome  # followers see the value, not the message


def test_a_code_this_frontend_does_not_know_survives_into_the_error():
    job = PendingJob("j1", spec())
    job.update(failed("gremlins"))
    assert job.error is not None and job.error.code == "gremlins"


def test_fail_ends_the_job_once_with_the_error_given():
    job = PendingJob("j1", spec())
    job.update(progress(1, PREVIEW))
    error = JobError(ErrorCode.BROKER_UNAVAILABLE, "lost contact", retryable=True)
    assert job.fail(error) is True
    assert job.fail(JobError(ErrorCode.TIMEOUT, "later")) is False
    job.update(failed())
    job.update(result())
    assert job.error is error and job.result is None and not job.cancelled_here
    messages, _ = job.events_after(0, 0.0)
    assert [type(m) for m in messages] == [Message, JobError] and messages[-1] is error


def test_fail_wakes_a_follower():
    job = PendingJob("j1", spec())
    error = JobError(ErrorCode.TIMEOUT, "no answer")
    threading.Timer(0.05, job.fail, (error,)).start()
    messages, _ = job.events_after(0, 5.0)
    assert messages == [error]


@pytest.mark.parametrize("answered", [False, True])
def test_wait_taken_returns_once_accepted_or_answered(answered):
    job = PendingJob("j1", spec())
    threading.Timer(0.05, job.update, (result() if answered else accepted(0),)).start()
    job.wait_taken(5.0)
    assert job.done if answered else job.position == 0


def test_a_finished_job_compacted_keeps_only_its_answer() -> None:
    job = PendingJob("j1", spec())
    for step in range(1, 4):
        for image in range(2):
            job.update(progress(step, b"p" * 1000, image))
    job.update(result())
    job.compact()
    assert held_bytes(job) < 1000  # no preview kept
    late, _ = job.events_after(0, 0.0)
    assert late[-1] is job.result


def test_a_failed_job_compacted_keeps_only_its_error() -> None:
    job = PendingJob("j1", spec())
    job.update(progress(1, b"p" * 1000))
    job.cancel()
    job.compact()
    assert held_bytes(job) == 0
    assert job.events_after(0, 0.0)[0][-1] is job.error


def test_a_preview_arriving_after_later_steps_does_not_move_the_step_back():
    # Previews are encoded on their own thread: preview 1 may come after step 3's progress.
    job = PendingJob("j1", spec())
    job.update(accepted(0))
    for step in (1, 2, 3):
        job.update(progress(step))
    job.update(progress(1, PREVIEW))
    assert job.step == 3


def test_a_job_back_in_line_is_no_longer_running():
    job = PendingJob("j1", spec())
    job.update(accepted(0))
    job.update(progress(5))
    job.update(accepted(0))  # its worker was lost: queued again, at the head
    assert (job.step, job.position) == (0, 0)
