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
             max_batch: int = 4, state: str = "ready", model: str = "tiny",
             step_megapixels: Any = None) -> dict[str, Any]:
    entry = worker(worker_id, model, state=state) | {"max_batch": max_batch}
    entry["stats"] = {"jobs_done": 3, "images_done": 3, "step_seconds": step_seconds,
                      "batch_size": batch_size}
    if step_megapixels is not None:
        entry["stats"]["step_megapixels"] = step_megapixels
    return entry


MP = 0.004096  # one 64x64 image: the fallback's estimates do not depend on it


def status(*workers: dict[str, Any]) -> ClusterStatus:
    return ClusterStatus(list(workers), {}, time.monotonic())


# ------------------------------------------------------------------ the estimate

@pytest.mark.parametrize("position, expected", [(0, 2.0), (1, 4.0), (4, 10.0)])
def test_one_worker_starts_a_job_every_steps_times_step_seconds(position: int,
                                                                expected: float) -> None:
    # 4 steps of 0.5 s: the running job ends within 2 s, then each job ahead takes 2 s.
    assert estimate_wait(status(measured("w1")), "tiny", position, steps=4,
                         megapixels=MP) == expected


def test_two_workers_drain_the_line_twice_as_fast() -> None:
    both = status(measured("w1"), measured("w2"))
    # Both run one now: either frees first.
    assert estimate_wait(both, "tiny", 0, steps=4, megapixels=MP) == 2.0
    assert estimate_wait(both, "tiny", 4, steps=4, megapixels=MP) == 6.0


def test_a_batching_worker_takes_several_jobs_at_once() -> None:
    batching = status(measured("w1", step_seconds=1.0, batch_size=4, max_batch=4))
    # The running batch, then one batch of four ahead.
    assert estimate_wait(batching, "tiny", 0, steps=4, megapixels=MP) == 4.0
    assert estimate_wait(batching, "tiny", 4, steps=4, megapixels=MP) == 8.0


def test_more_steps_wait_longer() -> None:
    assert estimate_wait(status(measured("w1")), "tiny", 0, steps=30, megapixels=MP) == 15.0


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
    assert estimate_wait(status(entry), "tiny", 0, steps=4, megapixels=MP) is None


def test_unknown_without_a_position_steps_or_cluster() -> None:
    ready = status(measured("w1"))
    assert estimate_wait(None, "tiny", 0, steps=4, megapixels=MP) is None
    assert estimate_wait(ready, "tiny", None, steps=4, megapixels=MP) is None
    assert estimate_wait(ready, "tiny", 0, steps=None, megapixels=MP) is None
    assert estimate_wait(ready, "tiny", -1, steps=4, megapixels=MP) is None


def test_odd_batch_sizes_count_as_one() -> None:
    for batch_size in (None, 0, -2, "4", True, 2.5):
        entry = measured("w1", batch_size=batch_size)
        assert estimate_wait(status(entry), "tiny", 0, steps=4, megapixels=MP) == 2.0


def test_workers_without_stats_are_left_out_of_the_rate() -> None:
    mixed = status(measured("w1"), worker("w2", "tiny"))
    assert estimate_wait(mixed, "tiny", 1, steps=4, megapixels=MP) == 4.0


# ------------------------------------------------------------------ weighed by work

def test_the_brokers_work_ahead_over_the_workers_megapixel_steps_per_second() -> None:
    # 2 megapixels a step, a step in 0.5 s: 4 megapixel-steps a second.
    one = status(measured("w1", step_megapixels=2.0))
    assert estimate_wait(one, "tiny", 3, steps=4, megapixels=1.0, work_ahead=40.0) == 10.0
    two = status(measured("w1", step_megapixels=2.0), measured("w2", step_megapixels=2.0))
    assert estimate_wait(two, "tiny", 3, steps=4, megapixels=1.0, work_ahead=40.0) == 5.0


def test_one_heavy_job_ahead_waits_longer_than_several_light_ones() -> None:
    """What the count of jobs alone got wrong: behind a 1024x1024 job of 50 steps a
    512x512 job of 4 steps waits far longer than behind three more like itself."""
    cluster = status(measured("w1", step_seconds=0.25, step_megapixels=1.048576))
    light = 4 * 512 * 512 / 1e6
    heavy = 50 * 1024 * 1024 / 1e6
    behind_heavy = estimate_wait(cluster, "tiny", 1, steps=4, megapixels=0.262144,
                                 work_ahead=heavy)
    behind_light = estimate_wait(cluster, "tiny", 3, steps=4, megapixels=0.262144,
                                 work_ahead=3 * light)
    assert (behind_heavy, behind_light) == (12.5, 0.8)


def test_zero_work_ahead_is_no_wait() -> None:
    cluster = status(measured("w1", step_megapixels=1.0))
    assert estimate_wait(cluster, "tiny", 0, steps=4, megapixels=1.0, work_ahead=0.0) == 0.0


def test_a_worker_that_does_not_say_what_it_drew_batches_jobs_like_this_one() -> None:
    # An older worker: 2 jobs of 1 megapixel a step, each step 0.5 s: 4 megapixel-steps/s.
    older = status(measured("w1", batch_size=2))
    assert estimate_wait(older, "tiny", 3, steps=4, megapixels=1.0, work_ahead=40.0) == 10.0


@pytest.mark.parametrize("drawn", [0, -1.0, math.inf, math.nan, "big", True])
def test_an_odd_step_megapixels_is_not_believed(drawn: Any) -> None:
    cluster = status(measured("w1", step_megapixels=drawn))
    assert estimate_wait(cluster, "tiny", 3, steps=4, megapixels=1.0, work_ahead=40.0) == 20.0


def test_unknown_for_a_job_without_pixels() -> None:
    cluster = status(measured("w1"))
    for megapixels in (None, 0.0, -1.0):
        assert estimate_wait(cluster, "tiny", 0, steps=4, megapixels=megapixels) is None


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


def test_the_brokers_work_ahead_weighs_the_estimate(client, hanging) -> None:
    hanging.workers = [measured("w1", step_megapixels=0.004096 * 2)]  # 2 images a step
    job = submit(client)
    pending = hanging.pending[job["id"]]
    # 25 steps of one 64x64 image ahead, at 2 x 64x64 per 0.5 s step: 6.25 s.
    pending.update(Message(MsgType.ACCEPTED, {"job_id": job["id"], "position": 1,
                                              "work_ahead": 25 * 0.004096}))
    described = client.simulate_get(f"/v1/jobs/{job['id']}").json
    assert (described["position"], described["eta_seconds"]) == (1, 6.2)
    hanging.fail(job["id"], "worker_error")
    queued = [data for name, data in events(client, job["id"]) if name == "queued"]
    assert queued[-1] == {"id": job["id"], "position": 1, "eta_seconds": 6.2}


def test_a_running_job_has_no_wait(client, hanging) -> None:
    job = submit(client)
    hanging.pending[job["id"]].update(Message(MsgType.PROGRESS, {
        "job_id": job["id"], "step": 1, "steps": 4}))
    described = client.simulate_get(f"/v1/jobs/{job['id']}").json
    assert (described["status"], described["eta_seconds"]) == ("running", None)
