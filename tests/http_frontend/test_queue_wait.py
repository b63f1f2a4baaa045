"""The estimated wait of a queued job, from the workers' own stats: in the jobs API's job
description and its ``queued`` events, null until a worker has measured itself."""

from __future__ import annotations

import math
import time
from typing import Any

import falcon.testing
import pytest

from broker.protocol import Message, MsgType
from http_frontend.app import FrontendConfig, create_app
from http_frontend.broker_client import ClusterStatus
from http_frontend.queue_wait import estimate_wait
from http_frontend.service import ImageService, ServiceConfig
from tests.http_frontend.test_app import worker
from tests.http_frontend.test_jobs_api import HangingBroker, events


def measured(worker_id: str, *, step_seconds: Any = 0.5, batch_size: Any = 1,
             max_batch: int = 4, state: str = "ready", model: str = "tiny") -> dict[str, Any]:
    entry = worker(worker_id, model, state=state) | {"max_batch": max_batch}
    entry["stats"] = {"jobs_done": 3, "images_done": 3, "step_seconds": step_seconds,
                      "batch_size": batch_size}
    return entry


def status(*workers: dict[str, Any]) -> ClusterStatus:
    return ClusterStatus(list(workers), {}, time.monotonic())


# ------------------------------------------------------------------ the estimate

@pytest.mark.parametrize("position, expected", [(0, 2.0), (1, 4.0), (4, 10.0)])
def test_one_worker_starts_a_job_every_steps_times_step_seconds(position: int,
                                                                expected: float) -> None:
    # 4 steps of 0.5 s: the running job ends within 2 s, then each job ahead takes 2 s.
    assert estimate_wait(status(measured("w1")), "tiny", position, 4) == expected


def test_two_workers_drain_the_line_twice_as_fast() -> None:
    both = status(measured("w1"), measured("w2"))
    assert estimate_wait(both, "tiny", 0, 4) == 2.0  # both run one now: either frees first
    assert estimate_wait(both, "tiny", 4, 4) == 6.0


def test_a_batching_worker_takes_several_jobs_at_once() -> None:
    batching = status(measured("w1", step_seconds=1.0, batch_size=4, max_batch=4))
    assert estimate_wait(batching, "tiny", 0, 4) == 4.0  # the running batch
    assert estimate_wait(batching, "tiny", 4, 4) == 8.0  # one batch of four ahead


def test_more_steps_wait_longer() -> None:
    assert estimate_wait(status(measured("w1")), "tiny", 0, 30) == 15.0


@pytest.mark.parametrize("entry", [
    worker("w1", "tiny"),  # no stats yet
    measured("w1", step_seconds=None),
    measured("w1", step_seconds=0),
    measured("w1", step_seconds=-1.0),
    measured("w1", step_seconds=math.inf),
    measured("w1", step_seconds=math.nan),
    measured("w1", step_seconds=1e308),  # finite, but the wait is not: never Infinity
    measured("w1", step_seconds=1e6),  # a wait of weeks says nothing
    measured("w1", step_seconds="fast"),
    measured("w1", step_seconds=True),
    measured("w1", state="quarantined"),
    measured("w1", model="sdxl"),
])
def test_unknown_without_a_ready_worker_that_measured_itself(entry: dict[str, Any]) -> None:
    assert estimate_wait(status(entry), "tiny", 0, 4) is None


def test_unknown_without_a_position_steps_or_cluster() -> None:
    ready = status(measured("w1"))
    assert estimate_wait(None, "tiny", 0, 4) is None
    assert estimate_wait(ready, "tiny", None, 4) is None
    assert estimate_wait(ready, "tiny", 0, None) is None
    assert estimate_wait(ready, "tiny", -1, 4) is None


def test_odd_batch_sizes_count_as_one() -> None:
    for batch_size in (None, 0, -2, "4", True, 2.5):
        entry = measured("w1", batch_size=batch_size)
        assert estimate_wait(status(entry), "tiny", 0, 4) == 2.0


def test_workers_without_stats_are_left_out_of_the_rate() -> None:
    mixed = status(measured("w1"), worker("w2", "tiny"))
    assert estimate_wait(mixed, "tiny", 1, 4) == 4.0


# ------------------------------------------------------------------ the jobs API

@pytest.fixture
def hanging() -> HangingBroker:
    broker = HangingBroker()  # every job it takes hears position 2
    broker.workers = [measured("w1")]
    return broker


@pytest.fixture
def client(hanging: HangingBroker) -> falcon.testing.TestClient:
    service = ImageService(hanging, ServiceConfig(default_timeout=30.0, max_waiting=4,
                                                  max_streams=2))
    return falcon.testing.TestClient(create_app(FrontendConfig(), hanging, service=service))


def submit(client: falcon.testing.TestClient, **fields: Any) -> dict[str, Any]:
    result = client.simulate_post("/v1/jobs", json={"prompt": "a fox", "size": "64x64",
                                                    "steps": 4, **fields})
    assert result.status_code == 202, result.text
    job: dict[str, Any] = result.json
    return job


def test_a_queued_job_says_its_position_and_estimated_wait(client, hanging) -> None:
    job = submit(client)
    assert (job["status"], job["position"], job["eta_seconds"]) == ("queued", 2, 6.0)
    described = client.simulate_get(f"/v1/jobs/{job['id']}").json
    assert (described["position"], described["eta_seconds"]) == (2, 6.0)
    keys = list(described)
    assert keys.index("eta_seconds") == keys.index("position") + 1


def test_the_queued_event_carries_the_estimated_wait(client, hanging) -> None:
    job = submit(client)
    pending = hanging.pending[job["id"]]
    pending.update(Message(MsgType.ACCEPTED, {"job_id": job["id"], "position": 0}))
    hanging.fail(job["id"], "worker_error")
    queued = [data for name, data in events(client, job["id"]) if name == "queued"]
    assert queued == [{"id": job["id"], "position": 2, "eta_seconds": 6.0},
                      {"id": job["id"], "position": 0, "eta_seconds": 2.0}]


def test_the_wait_is_null_before_any_worker_measured_itself(client, hanging) -> None:
    hanging.workers = [worker("w1", "tiny")]
    job = submit(client)
    assert job["eta_seconds"] is None
    hanging.fail(job["id"], "worker_error")
    queued = [data for name, data in events(client, job["id"]) if name == "queued"]
    assert queued == [{"id": job["id"], "position": 2, "eta_seconds": None}]


def test_a_running_job_has_no_wait(client, hanging) -> None:
    job = submit(client)
    hanging.pending[job["id"]].update(Message(MsgType.PROGRESS, {
        "job_id": job["id"], "step": 1, "steps": 4}))
    described = client.simulate_get(f"/v1/jobs/{job['id']}").json
    assert (described["status"], described["eta_seconds"]) == ("running", None)
