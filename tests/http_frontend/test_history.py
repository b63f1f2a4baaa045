"""History and the service on a real SQLite file and a real image directory, in-process.

Also the shared helpers of test_keeper.py and test_storage_routes.py: a broker that records
the owner of each submit and cancel, and an app wired to a real ``History``.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from broker import protocol
from broker.protocol import ErrorCode, ImageInfo, JobSpec, Message, MsgType
from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import ApiKey
from http_frontend.database import DatabaseError, open_database
from http_frontend.errors import JobError
from http_frontend.history import SETTLE_THREADS, Caller, History
from http_frontend.image_store import DirectoryStore, StoreError
from http_frontend.jobs_api import JobsAPI
from http_frontend.pending import PendingJob
from http_frontend.records import JobRecords
from http_frontend.service import ImageService, ServiceConfig
from tests.cluster import wait_until
from tests.http_frontend.test_app import FakeBroker, checked, encode_image, error_of
from tests.http_frontend.test_jobs_api import HangingBroker

BASE = "http://falconframework.org"  # falcon.testing's default host
GENERATIONS = "/v1/images/generations"
FOX = {"prompt": "a fox", "size": "64x64"}


# ------------------------------------------------------------------------------ helpers

class OwnedBroker(HangingBroker):
    """HangingBroker that remembers the broker owner of every submit and cancel."""

    def __init__(self, owner: str = "frontend-under-test") -> None:
        super().__init__()
        self.owner = owner
        self.submit_owners: list[str | None] = []
        self.cancels: list[tuple[str, str | None]] = []

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: tuple[bytes, ...] = ()) -> PendingJob:
        self.submit_owners.append(owner)
        return super().submit(job, owner=owner)

    def cancel(self, job_id: str, *, owner: str | None = None, forget: bool = True) -> None:
        self.cancels.append((job_id, owner))
        super().cancel(job_id, owner=owner, forget=forget)

    def answer(self, job_id: str) -> None:
        """Answer the job with real images, one per seed."""
        job = next(j for j in reversed(self.submitted) if j.id == job_id)
        self.pending[job_id].update(result_of(job))

    def progress(self, job_id: str, step: int = 1) -> None:
        self.pending[job_id].update(Message(MsgType.PROGRESS, {
            "job_id": job_id, "step": step, "steps": 4}))


def result_of(job: JobSpec) -> Message:
    infos = [ImageInfo(seed=s, width=job.width, height=job.height, format=job.output_format)
             for s in job.seeds]
    payloads = [encode_image(job.width, job.height, s, job.output_format) for s in job.seeds]
    return protocol.decode(protocol.result(job.id, infos, payloads, timings={"total": 0.01},
                                           worker_id="w1"))


class RefusingStore(DirectoryStore):
    """A directory store that refuses the writes whose index is in ``refuse`` (0-based)."""

    def __init__(self, root: Path, refuse: set[int]) -> None:
        super().__init__(root)
        self.refuse = refuse
        self.puts = 0

    def put(self, name: str, data: bytes) -> None:
        index, self.puts = self.puts, self.puts + 1
        if index in self.refuse:
            raise StoreError(f"{self.root}: no space left on device")
        super().put(name, data)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_history(tmp_path: Path, *, frontend: str = "f1", store: bool = True,
                 keep_prompts: bool = True, clock: Callable[[], float] | None = None,
                 image_store: DirectoryStore | None = None) -> History:
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    records = JobRecords(open_database(str(tmp_path / "jobs.db")), keep_prompts=keep_prompts,
                         **kwargs)
    if image_store is None and store:
        image_store = DirectoryStore(tmp_path / "images")
    return History(records, image_store, frontend=frontend, **kwargs)


@dataclass
class Frontend:
    client: falcon.testing.TestClient
    service: ImageService
    jobs: JobsAPI
    history: History
    broker: Any


def make_frontend(broker: Any, history: History, *, api_keys: tuple[ApiKey, ...] = (),
                  image_ttl: float | None = None, **service: Any) -> Frontend:
    config = ServiceConfig(**{"default_timeout": 30.0, **service})
    image_service = ImageService(broker, config, history=history)
    jobs = JobsAPI(image_service)
    app = create_app(FrontendConfig(service=config, api_keys=api_keys, image_ttl=image_ttl),
                     broker, service=image_service, jobs=jobs)
    return Frontend(falcon.testing.TestClient(app), image_service, jobs, history, broker)


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def path_of(url: str) -> str:
    assert url.startswith(BASE + "/v1/images/files/"), url
    return url[len(BASE):]


def settle_all(history: History) -> None:
    """Wait for every settle queued so far: once all the pool's threads meet at a barrier,
    each task queued before it has run (the queue is first in, first out)."""
    barrier = threading.Barrier(SETTLE_THREADS + 1)
    for _ in range(SETTLE_THREADS):
        history._settlers.submit(barrier.wait, 10)
    barrier.wait(10)


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    found = make_history(tmp_path)
    yield found
    found.close()


@pytest.fixture
def fake() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def front(fake: FakeBroker, history: History) -> Frontend:
    return make_frontend(fake, history)


@pytest.fixture
def owned() -> OwnedBroker:
    return OwnedBroker()


@pytest.fixture
def hung(owned: OwnedBroker, history: History) -> Frontend:
    return make_frontend(owned, history)


def submit_job(front: Frontend, body: dict[str, Any] | None = None, **kwargs: Any) -> str:
    result = front.client.simulate_post("/v1/jobs", json=body or FOX, **kwargs)
    assert result.status_code == 202, result.text
    return str(result.json["id"])


# ------------------------------------------------------------------------------ urls

def test_url_answers_store_each_image_once_and_serve_the_b64_bytes(front, tmp_path):
    body = {**FOX, "n": 2, "seed": 41}
    by_url = checked(front.client.simulate_post(GENERATIONS, json={
        **body, "response_format": "url"}))
    assert by_url.status_code == 200
    assert all(set(item) >= {"url"} and "b64_json" not in item for item in by_url.json["data"])
    assert len(stored_files(tmp_path / "images")) == 2
    by_b64 = checked(front.client.simulate_post(GENERATIONS, json=body))
    for url_item, b64_item in zip(by_url.json["data"], by_b64.json["data"], strict=True):
        served = front.client.simulate_get(path_of(url_item["url"]))
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        assert served.content == base64.b64decode(b64_item["b64_json"])
        assert served.content == encode_image(64, 64, url_item["seed"], "png")
    assert [i["seed"] for i in by_url.json["data"]] == [41, 42]


def test_public_url_starts_the_image_urls(fake, tmp_path):
    history = make_history(tmp_path)
    history.public_url = "https://images.example.com"
    front = make_frontend(fake, history)
    result = front.client.simulate_post(GENERATIONS, json={**FOX, "response_format": "url"})
    url = result.json["data"][0]["url"]
    assert url.startswith("https://images.example.com/v1/images/files/")
    assert front.client.simulate_get(url[len("https://images.example.com"):]).status_code == 200


def test_a_failed_generation_ends_its_record_failed_with_the_error(front, fake):
    fake.fail_with = ErrorCode.WORKER_ERROR
    error = error_of(front.client.simulate_post(GENERATIONS, json=FOX), 500)
    assert error["code"] == "worker_error"
    settle_all(front.history)
    listed = front.client.simulate_get("/v1/jobs").json["data"]
    assert [job["status"] for job in listed] == ["failed"]
    assert listed[0]["error"]["code"] == "worker_error"
    record = front.history.records.get(listed[0]["id"])
    assert record is not None and record.finished is not None
    assert record.error == {"code": "worker_error", "message": "fake broker says worker_error",
                            "retryable": True}


def test_a_job_cancelled_here_ends_cancelled(hung, owned):
    job_id = submit_job(hung)
    result = hung.client.simulate_delete(f"/v1/jobs/{job_id}")
    assert result.status_code == 200 and result.json["status"] == "cancelled"
    record = hung.history.records.get(job_id)
    assert record is not None and record.status == "cancelled"
    assert record.error is not None and record.error["code"] == "cancelled"


def test_a_job_the_broker_cancels_ends_cancelled_and_a_failed_one_failed(hung, owned):
    cancelled, failed = submit_job(hung), submit_job(hung)
    owned.fail(cancelled, ErrorCode.CANCELLED.value)
    owned.fail(failed, ErrorCode.TIMEOUT.value)
    settle_all(hung.history)
    first, second = (hung.history.records.get(i) for i in (cancelled, failed))
    assert first is not None and second is not None
    assert (first.status, first.error and first.error["code"]) == ("cancelled", "cancelled")
    assert (second.status, second.error and second.error["code"]) == ("failed", "timeout")
    shown = hung.client.simulate_get(f"/v1/jobs/{failed}").json
    assert shown["error"]["code"] == "timeout" and shown["status"] == "failed"


def test_a_job_settles_once_however_often_it_is_ended(history, monkeypatch):
    finishes: list[str] = []
    real_finish = history.records.finish

    def counting(job_id: str, status: str, **kwargs: Any) -> bool:
        finishes.append(status)
        return bool(real_finish(job_id, status, **kwargs))

    monkeypatch.setattr(history.records, "finish", counting)
    job = JobSpec(id="a" * 32, model="tiny", prompt="a fox", width=64, height=64, steps=2,
                  seeds=(1,), timeout=30.0)
    history.open(job, {"prompt": "a fox"}, kind="job", caller=Caller(None, BASE),
                 submitter="s")
    pending = PendingJob(job.id, job)
    tracked = history.track(job, pending)
    pending.update(result_of(job))
    pending.fail(JobError(ErrorCode.CANCELLED, "too late"))
    pending.cancel()
    pending.update(result_of(job))
    assert tracked.settled.wait(10)
    settle_all(history)
    assert finishes == ["succeeded"]
    assert tracked.record is not None and tracked.record.status == "succeeded"
    assert len(tracked.image_names) == 1 and tracked.image_names[0]


def test_a_result_for_an_already_ended_record_leaves_no_image_files(history, tmp_path):
    job = JobSpec(id="b" * 32, model="tiny", prompt="a fox", width=64, height=64, steps=2,
                  seeds=(1, 2), timeout=30.0)
    history.open(job, {"prompt": "a fox"}, kind="job", caller=Caller(None, BASE),
                 submitter="s")
    history.fail(job.id, JobError(ErrorCode.CANCELLED, "cancelled on another frontend"))
    pending = PendingJob(job.id, job)
    tracked = history.track(job, pending)
    pending.update(result_of(job))
    assert tracked.settled.wait(10)
    ended = history.records.get(job.id)
    assert ended is not None and ended.status == "cancelled"
    assert stored_files(tmp_path / "images") == []


# ------------------------------------------------------------------------------ store refusals

def test_a_refused_image_is_answered_as_b64_and_the_others_as_urls(fake, tmp_path):
    store = RefusingStore(tmp_path / "images", refuse={0})
    front = make_frontend(fake, make_history(tmp_path, image_store=store))
    result = checked(front.client.simulate_post(GENERATIONS, json={
        **FOX, "n": 2, "seed": 5, "response_format": "url"}))
    assert result.status_code == 200
    first, second = result.json["data"]
    assert "url" not in first and base64.b64decode(first["b64_json"]) == encode_image(
        64, 64, 5, "png")
    assert "b64_json" not in second
    assert front.client.simulate_get(path_of(second["url"])).content == encode_image(
        64, 64, 6, "png")
    record = front.history.records.get(result.json["job_id"])
    assert record is not None and record.status == "succeeded"
    assert record.images[0]["name"] is None and record.images[1]["name"]


def test_a_refused_image_still_answers_b64_requests(fake, tmp_path):
    store = RefusingStore(tmp_path / "images", refuse={0, 1, 2})
    front = make_frontend(fake, make_history(tmp_path, image_store=store))
    result = checked(front.client.simulate_post(GENERATIONS, json={**FOX, "seed": 9}))
    assert result.status_code == 200
    assert base64.b64decode(result.json["data"][0]["b64_json"]) == encode_image(64, 64, 9, "png")


def test_the_job_of_a_refused_image_still_shows_its_result_where_it_runs(owned, tmp_path):
    store = RefusingStore(tmp_path / "images", refuse={0})
    front = make_frontend(owned, make_history(tmp_path, image_store=store))
    job_id = submit_job(front, {**FOX, "seed": 3})
    owned.answer(job_id)
    shown = front.client.simulate_get(f"/v1/jobs/{job_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json["images"][0]["url"] is None
    data = shown.json["result"]["data"][0]
    assert base64.b64decode(data["b64_json"]) == encode_image(64, 64, 3, "png")


def test_the_job_of_a_refused_image_stays_readable_from_another_frontend(owned, tmp_path):
    store = RefusingStore(tmp_path / "images", refuse={0})
    front = make_frontend(owned, make_history(tmp_path, image_store=store))
    job_id = submit_job(front)
    owned.answer(job_id)
    assert front.client.simulate_get(f"/v1/jobs/{job_id}").status_code == 200
    other = make_frontend(OwnedBroker("other"), make_history(tmp_path, frontend="f2"))
    shown = other.client.simulate_get(f"/v1/jobs/{job_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json["status"] == "succeeded"


def test_the_events_of_an_unstored_job_end_with_an_event(owned, tmp_path):
    from tests.http_frontend.test_jobs_api import events

    front = make_frontend(owned, make_history(tmp_path, store=False))
    job_id = submit_job(front)
    owned.answer(job_id)
    settle_all(front.history)
    other = make_frontend(OwnedBroker("other"), make_history(tmp_path, frontend="f2",
                                                             store=False))
    names = [name for name, _ in events(other.client, job_id)]
    assert names[-1] in ("completed", "failed")


# ------------------------------------------------------------------------------ no image store

def test_without_an_image_store_url_requests_are_a_400_naming_response_format(fake, tmp_path):
    front = make_frontend(fake, make_history(tmp_path, store=False))
    for path in (GENERATIONS, "/v1/jobs"):
        error = error_of(front.client.simulate_post(path, json={
            **FOX, "response_format": "url"}), 400)
        assert error["param"] == "response_format"
    assert fake.submitted == []
    ok = checked(front.client.simulate_post(GENERATIONS, json=FOX))
    assert ok.status_code == 200 and "b64_json" in ok.json["data"][0]
    assert not (tmp_path / "images").exists()


def test_default_response_format_url_applies_only_when_the_field_is_absent(fake, tmp_path):
    front = make_frontend(fake, make_history(tmp_path), default_response_format="url")
    absent = checked(front.client.simulate_post(GENERATIONS, json=FOX))
    assert set(absent.json["data"][0]) >= {"url"} and "b64_json" not in absent.json["data"][0]
    given = checked(front.client.simulate_post(GENERATIONS, json={
        **FOX, "response_format": "b64_json"}))
    assert "b64_json" in given.json["data"][0] and "url" not in given.json["data"][0]
    null = front.client.simulate_post(GENERATIONS, json={**FOX, "response_format": None})
    assert null.status_code in (200, 400)  # either way, never a 500
    if null.status_code == 400:
        assert null.json["error"]["param"] == "response_format"


# ------------------------------------------------------------------------------ jobs API shape

def test_a_finished_job_shows_image_urls_and_its_result_only_by_id(hung, owned):
    job_id = submit_job(hung, {**FOX, "n": 2, "seed": 11, "response_format": "url"})
    queued = hung.client.simulate_get(f"/v1/jobs/{job_id}").json
    assert queued["images"] == [] and "result" not in queued and queued["status"] == "queued"
    owned.answer(job_id)
    shown = hung.client.simulate_get(f"/v1/jobs/{job_id}").json
    assert shown["status"] == "succeeded" and shown["finished"] is not None
    assert [image["seed"] for image in shown["images"]] == [11, 12]
    for image, data in zip(shown["images"], shown["result"]["data"], strict=True):
        assert data["url"] == image["url"]
        assert hung.client.simulate_get(path_of(image["url"])).content == encode_image(
            64, 64, image["seed"], "png")
    assert shown["result"]["job_id"] == job_id
    listed = hung.client.simulate_get("/v1/jobs").json
    assert listed["data"][0]["id"] == job_id and "result" not in listed["data"][0]
    assert listed["data"][0]["images"] == shown["images"]


def test_the_result_read_back_from_another_frontend_matches(hung, owned, tmp_path):
    job_id = submit_job(hung, {**FOX, "seed": 4})
    owned.answer(job_id)
    here = hung.client.simulate_get(f"/v1/jobs/{job_id}").json
    other = make_frontend(OwnedBroker("other"), make_history(tmp_path, frontend="f2"))
    there = other.client.simulate_get(f"/v1/jobs/{job_id}").json
    assert there["images"] == here["images"]
    assert there["result"]["data"] == here["result"]["data"]


# ------------------------------------------------------------------------------ Idempotency-Key

def test_a_repeated_key_returns_the_same_job(hung, owned):
    headers = {"Idempotency-Key": "order-1"}
    first = hung.client.simulate_post("/v1/jobs", json=FOX, headers=headers)
    again = hung.client.simulate_post("/v1/jobs", json=FOX, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json["id"] == again.json["id"]
    assert len(owned.submitted) == 1


def test_a_key_reused_with_another_body_is_a_409_naming_it(hung, owned):
    headers = {"Idempotency-Key": "order-2"}
    submit_job(hung, headers=headers)
    for path in ("/v1/jobs", GENERATIONS):
        error = error_of(hung.client.simulate_post(path, json={**FOX, "prompt": "a cat"},
                                                   headers=headers), 409)
        assert error["param"] == "Idempotency-Key"
        assert error["code"] == "idempotency_key_reused"
    assert len(owned.submitted) == 1


def test_two_identities_use_the_same_key_independently(owned, history):
    keys = (ApiKey("sk-alice", "alice"), ApiKey("sk-bob", "bob"))
    front = make_frontend(owned, history, api_keys=keys)
    ids = []
    for secret in ("sk-alice", "sk-bob"):
        result = front.client.simulate_post("/v1/jobs", json=FOX, headers={
            "Idempotency-Key": "same", "Authorization": f"Bearer {secret}"})
        assert result.status_code == 202, result.text
        ids.append(result.json["id"])
    assert ids[0] != ids[1] and len(owned.submitted) == 2
    again = front.client.simulate_post("/v1/jobs", json=FOX, headers={
        "Idempotency-Key": "same", "Authorization": "Bearer sk-bob"})
    assert (again.status_code, again.json["id"]) == (200, ids[1])


def test_a_repeated_generation_answers_the_first_jobs_images(front, fake):
    headers = {"Idempotency-Key": "gen-1"}
    body = {**FOX, "seed": 21}
    first = checked(front.client.simulate_post(GENERATIONS, json=body, headers=headers))
    settle_all(front.history)
    again = checked(front.client.simulate_post(GENERATIONS, json=body, headers=headers))
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json["job_id"] == first.json["job_id"]
    assert again.json["data"][0]["b64_json"] == first.json["data"][0]["b64_json"]
    assert len(fake.submitted) == 1


def test_a_retry_after_a_retryable_refusal_with_the_same_key_runs(front, fake):
    headers = {"Idempotency-Key": "retry-me"}
    fake.fail_with = ErrorCode.QUEUE_FULL
    refused = front.client.simulate_post(GENERATIONS, json=FOX, headers=headers)
    assert error_of(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"]
    settle_all(front.history)
    fake.fail_with = None
    retried = front.client.simulate_post(GENERATIONS, json=FOX, headers=headers)
    assert retried.status_code == 200, retried.text


# ------------------------------------------------------------------------------ --no-history

def test_without_history_an_ended_job_keeps_no_prompt(owned, tmp_path):
    front = make_frontend(owned, make_history(tmp_path, keep_prompts=False))
    body = {**FOX, "prompt": "my secret prompt", "negative_prompt": "secret too"}
    running, ended = submit_job(front, body), submit_job(front, body)
    owned.answer(ended)
    settle_all(front.history)
    live = front.client.simulate_get(f"/v1/jobs/{running}").json
    assert live["prompt"] == "my secret prompt" and live["request"]["prompt"] == live["prompt"]
    shown = front.client.simulate_get(f"/v1/jobs/{ended}")
    assert shown.json["prompt"] is None and shown.json["request"] is None
    assert shown.json["negative_prompt"] is None
    assert "secret" not in shown.text
    listed = {job["id"]: job for job in front.client.simulate_get("/v1/jobs").json["data"]}
    assert listed[ended]["prompt"] is None and listed[ended]["request"] is None
    assert listed[running]["prompt"] == "my secret prompt"
    owned.fail(running, ErrorCode.WORKER_ERROR.value)
    settle_all(front.history)
    assert "secret" not in front.client.simulate_get("/v1/jobs").text


def test_without_history_a_repeated_key_after_the_end_still_finds_its_job(fake, tmp_path):
    # The scrub takes the request's digest too: nothing to compare, so no false 409.
    front = make_frontend(fake, make_history(tmp_path, keep_prompts=False))
    headers = {"Idempotency-Key": "private-1"}
    first = checked(front.client.simulate_post(GENERATIONS, json=FOX, headers=headers))
    settle_all(front.history)
    record = front.history.records.get(first.json["job_id"])
    assert record is not None and record.request_hash is None
    again = checked(front.client.simulate_post(GENERATIONS, json=FOX, headers=headers))
    assert again.json["job_id"] == first.json["job_id"] and len(fake.submitted) == 1


def test_a_settle_that_meets_a_database_error_is_retried(hung, owned, monkeypatch):
    from http_frontend.keeper import Keeper

    job_id = submit_job(hung)
    real_finish = hung.history.records.finish
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> bool:
        calls.append(args)
        if len(calls) == 1:
            raise DatabaseError("SQLite database jobs.db: disk I/O error")
        return bool(real_finish(*args, **kwargs))

    monkeypatch.setattr(hung.history.records, "finish", flaky)
    owned.answer(job_id)
    settle_all(hung.history)
    keeper = Keeper(hung.jobs, connected=lambda: True, history_days=None)
    keeper.tend()
    settle_all(hung.history)
    record = hung.history.records.get(job_id)
    assert record is not None and record.status == "succeeded"


# ------------------------------------------------------------------------------ review fixes

def test_a_job_answered_202_keeps_its_record_whatever_it_ends_with(hung, owned):
    # A retryable "no worker" after the 202 (a broker restart, say) is the job's failure,
    # not a refusal the client saw: the record stays, failed.
    job_id = submit_job(hung)
    owned.pending[job_id].update(protocol.decode(protocol.encode(MsgType.FAILED, {
        "job_id": job_id, "code": "no_worker", "message": "gone", "retryable": True})))
    settle_all(hung.history)
    shown = hung.client.simulate_get(f"/v1/jobs/{job_id}")
    assert shown.status_code == 200 and shown.json["status"] == "failed"


def test_settling_again_keeps_the_images_of_a_record_that_did_end(hung, owned, tmp_path,
                                                                  monkeypatch):
    # finish() committed, then reading the record back failed: the retry finds the record
    # ended, and must not take the images it names.
    job_id = submit_job(hung)
    real_get = hung.history.records.get
    calls = {"n": 0}

    def get_failing_once(record_id: str):
        calls["n"] += 1
        if calls["n"] == 1:
            raise DatabaseError("connection lost after the commit")
        return real_get(record_id)
    monkeypatch.setattr(hung.history.records, "get", get_failing_once)
    owned.answer(job_id)
    settle_all(hung.history)
    hung.history.settle_again()
    [image] = real_get(job_id).images
    assert image["name"] and any(p.name == image["name"] for p in stored_files(tmp_path))


def test_a_generation_shows_running_once_it_took_a_step(hung, owned, tmp_path):
    from http_frontend.keeper import Keeper
    keeper = Keeper(hung.jobs, connected=lambda: True, history_days=None)
    thread = threading.Thread(target=hung.client.simulate_post, args=(GENERATIONS,),
                              kwargs={"json": FOX}, daemon=True)
    thread.start()
    job_id = wait_until(lambda: owned.submitted and owned.submitted[-1].id, 10,
                        "the generation to be submitted")
    owned.progress(job_id)
    keeper.tend()
    assert hung.history.records.get(job_id).status == "running"
    owned.answer(job_id)
    thread.join(10)


def test_a_keyed_generation_stopped_by_a_drain_frees_its_key(hung, owned):
    headers = {"Idempotency-Key": "drained-1"}
    original = owned.submit

    def submit_then_drain(job, *, owner=None, inputs=()):
        pending = original(job, owner=owner)
        hung.service.begin_drain(0.0)
        return pending
    owned.submit = submit_then_drain  # type: ignore[method-assign]
    error = error_of(hung.client.simulate_post(GENERATIONS, json=FOX, headers=headers), 503)
    assert error["code"] == "shutting_down"
    job_id = owned.submitted[-1].id
    assert any(cancelled == job_id for cancelled, _ in owned.cancels)
    settle_all(hung.history)
    assert hung.history.records.get(job_id) is None  # a retry elsewhere runs it


def test_cancel_never_deletes_a_finished_job(hung, owned):
    job_id = submit_job(hung)
    owned.answer(job_id)
    settle_all(hung.history)
    cancelled = checked(hung.client.simulate_post(f"/v1/jobs/{job_id}/cancel"))
    assert cancelled.json["status"] == "succeeded"
    assert hung.client.simulate_get(f"/v1/jobs/{job_id}").status_code == 200
    running = submit_job(hung)
    assert checked(hung.client.simulate_post(f"/v1/jobs/{running}/cancel")
                   ).json["status"] == "cancelled"

