"""The jobs API in-process: cancels, who asked for them, late watchers, hostile ids."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import falcon.testing
import pytest

from broker import protocol
from broker.protocol import ErrorCode, JobSpec, Message, MsgType
from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import OPEN
from http_frontend.history import Caller
from http_frontend.jobs_api import JobsAPI
from http_frontend.pending import PendingJob
from http_frontend.service import ImageService, ServiceConfig
from tests.http_frontend.test_app import FakeBroker, checked, error_of

BASE = "http://falcon.test"
CALLER = Caller(None, BASE)


class HangingBroker(FakeBroker):
    """Takes every job (ACCEPTED) and answers only when a test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[str, PendingJob] = {}

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: tuple[bytes, ...] = ()) -> PendingJob:
        self.submitted.append(job)
        pending = PendingJob(job.id, job)
        pending.update(Message(MsgType.ACCEPTED, {"job_id": job.id, "position": 2}))
        self.pending[job.id] = pending
        return pending

    def fail(self, job_id: str, code: str) -> None:
        self.pending[job_id].update(protocol.decode(protocol.encode(MsgType.FAILED, {
            "job_id": job_id, "code": code, "message": f"the broker says {code}"})))


@pytest.fixture
def hanging() -> HangingBroker:
    return HangingBroker()


@pytest.fixture
def service(hanging: HangingBroker) -> ImageService:
    return ImageService(hanging, ServiceConfig(default_timeout=30.0, max_waiting=4,
                                               max_streams=2))


@pytest.fixture
def jobs_client(hanging: HangingBroker, service: ImageService) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(FrontendConfig(), hanging, service=service))


def submit(client: falcon.testing.TestClient, **fields: Any) -> str:
    result = client.simulate_post("/v1/jobs", json={"prompt": "a fox", "size": "64x64",
                                                    **fields})
    assert result.status_code == 202, result.text
    assert result.json["status"] == "queued" and result.json["position"] == 2
    return result.json["id"]


def events(client: falcon.testing.TestClient, job_id: str) -> list[tuple[str, dict]]:
    result = client.simulate_get(f"/v1/jobs/{job_id}/events")
    assert result.status_code == 200
    assert result.headers["content-type"] == "text/event-stream"
    found = []
    for block in result.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line
                     and not line.startswith(":"))
        if "event" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_a_cancel_asked_for_here_reads_cancelled_everywhere(jobs_client, hanging):
    job_id = submit(jobs_client)
    result = jobs_client.simulate_delete(f"/v1/jobs/{job_id}")
    assert result.status_code == 200
    assert result.json["status"] == "cancelled"
    assert hanging.cancelled == [job_id]
    assert jobs_client.simulate_get(f"/v1/jobs/{job_id}").json["status"] == "cancelled"
    assert events(jobs_client, job_id)[-1] == ("cancelled", {"id": job_id})


def test_a_cancel_from_another_frontend_reads_cancelled(jobs_client, hanging):
    # The broker says "cancelled" only when the job's owner asked: with shared job records,
    # that may be another frontend (DELETE there), which also ended the record.
    job_id = submit(jobs_client)
    hanging.fail(job_id, ErrorCode.CANCELLED.value)
    status = jobs_client.simulate_get(f"/v1/jobs/{job_id}").json
    assert status["status"] == "cancelled" and "error" not in status
    assert events(jobs_client, job_id)[-1] == ("cancelled", {"id": job_id})


def test_an_unknown_failure_code_is_a_server_error(jobs_client, hanging):
    job_id = submit(jobs_client)
    hanging.fail(job_id, "gremlins")
    error = jobs_client.simulate_get(f"/v1/jobs/{job_id}").json["error"]
    assert (error["code"], error["type"]) == ("unknown_error", "server_error")
    assert "gremlins" in error["message"]


def test_a_late_watcher_gets_the_latest_state_not_the_whole_history(jobs_client, hanging):
    job_id = submit(jobs_client, partial_images=2)
    pending = hanging.pending[job_id]
    for step in range(1, 1001):
        preview = (b"p" * 1000,) if step % 2 else ()
        pending.update(Message(MsgType.PROGRESS, {"job_id": job_id, "step": step, "steps": 1000,
                                                  "image_index": 0}, preview))
    hanging.fail(job_id, ErrorCode.WORKER_ERROR.value)
    names = [name for name, _ in events(jobs_client, job_id)]
    assert names == ["queued", "preview", "progress", "failed"]


def test_head_on_events_opens_no_stream(jobs_client, service, hanging):
    job_id = submit(jobs_client)
    for _ in range(5):  # more than max_streams
        result = jobs_client.simulate_head(f"/v1/jobs/{job_id}/events")
        assert result.status_code == 200
        assert result.headers["content-type"] == "text/event-stream"
        assert result.content == b""
    assert jobs_client.simulate_head("/v1/jobs/nope/events").status_code == 404


def test_a_full_house_of_waiting_requests_is_a_429(jobs_client, service):
    held = [service.take_waiting_slot() for _ in range(service.config.max_waiting)]
    try:
        for result in (jobs_client.simulate_post("/v1/jobs", json={"prompt": "a fox"}),
                       jobs_client.simulate_post("/v1/images/generations",
                                                 json={"prompt": "a fox"})):
            error = error_of(result, 429)
            assert (error["code"], error["type"]) == ("too_many_requests", "rate_limit_error")
            assert int(result.headers["retry-after"]) > 0
        assert jobs_client.simulate_get("/healthz").status_code == 200
        assert jobs_client.simulate_get("/readyz").status_code == 200
    finally:
        for release in held:
            release()
    submit(jobs_client)


@pytest.mark.parametrize("job_id", ["a" * 10_000, "%ED%A0%80", "%FF", "\x00",
                                    "../../etc/passwd", "\u00e9"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_hostile_ids_are_short_404s(jobs_client, job_id, method):
    result = jobs_client.simulate_request(method, f"/v1/jobs/{job_id}")
    error = error_of(result, 404)
    assert error["code"] in ("job_not_found", "not_found")
    assert len(error["message"]) < 300
    json.dumps(result.json).encode("utf-8")
    checked(result)


def test_a_stream_the_server_closes_before_reading_gives_its_slot_back(service, hanging):
    jobs = JobsAPI(service)
    job_id = jobs.submit({"prompt": "a fox", "size": "64x64"}, CALLER)[1]["id"]
    for _ in range(3 * service.config.max_streams):
        jobs.events(job_id, OPEN, None, BASE).close()  # never iterated
    stream = service.stream_openai(service.prepare({"prompt": "a fox", "size": "64x64",
                                                    "stream": True}), CALLER, None)
    stream.close()  # a stream slot was free, and closing it cancels its job
    assert hanging.cancelled == [hanging.submitted[-1].id]


def test_watchers_that_leave_never_cancel_a_job(service, hanging):
    # A jobs-API job outlives whoever watches it: its result waits in the records.
    jobs = JobsAPI(service)
    job_id = jobs.submit({"prompt": "a fox", "size": "64x64"}, CALLER)[1]["id"]
    before = threading.active_count()
    for _ in range(50):
        jobs.events(job_id, OPEN, None, BASE).close()
    gone = jobs.events(job_id, OPEN, lambda: True, BASE)  # a watcher that hung up
    assert b"queued" in next(gone)
    assert list(gone) == []  # it ends quietly
    gone.close()
    assert threading.active_count() <= before
    time.sleep(0.3)
    assert hanging.cancelled == []
    assert jobs.status(job_id, OPEN, BASE)["status"] == "queued"
