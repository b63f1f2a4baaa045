"""Job failures are JobError values until errors.job_failure turns them into HTTP, once."""

from __future__ import annotations

import pytest

from broker import protocol
from broker.protocol import ErrorCode, MsgType
from http_frontend.errors import BROKER_UNREACHABLE, SHUTTING_DOWN, JobError, job_failure


def test_a_failed_message_becomes_a_job_error():
    failed = protocol.decode(protocol.failed("j1", ErrorCode.QUEUE_FULL, "full", retryable=True))
    assert JobError.from_failed(failed) == JobError("queue_full", "full", retryable=True)
    assert JobError.from_failed(failed) == JobError(ErrorCode.QUEUE_FULL, "full", True)


def test_only_a_failed_message_becomes_a_job_error():
    accepted = protocol.decode(protocol.encode(MsgType.ACCEPTED, {"job_id": "j1",
                                                                  "position": 0}))
    with pytest.raises(ValueError, match="accepted"):
        JobError.from_failed(accepted)


@pytest.mark.parametrize(("error", "status", "retry_after"), [
    (JobError(ErrorCode.QUEUE_FULL, "full", True), 429, "9"),
    (JobError(ErrorCode.NO_WORKER, "none", True), 503, "9"),
    (BROKER_UNREACHABLE, 503, "9"),
    (SHUTTING_DOWN, 503, "9"),
    (JobError(ErrorCode.TIMEOUT, "late"), 504, None),
    (JobError(ErrorCode.MODEL_NOT_FOUND, "no such model"), 404, None),
    (JobError(ErrorCode.WORKER_ERROR, "oom"), 500, None),
])
def test_retry_after_goes_only_with_codes_a_later_retry_can_help(error, status, retry_after):
    api_error = job_failure(error, retry_after=9)
    assert (api_error.status, api_error.headers.get("Retry-After")) == (status, retry_after)
    assert api_error.body()["error"]["code"] == error.code
    assert type(api_error.body()["error"]["code"]) is str


def test_a_cancel_is_the_clients_own_only_when_asked_for_here():
    cancelled = JobError(ErrorCode.CANCELLED, "the job was cancelled")
    assert job_failure(cancelled, cancelled_here=True).status == 499
    assert job_failure(cancelled).status == 500
