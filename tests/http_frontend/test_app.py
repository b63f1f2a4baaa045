"""The Falcon app end to end in-process: TestClient, the real service, a fake broker client."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any

import falcon.testing
import pytest
from PIL import Image

from broker import protocol
from broker.protocol import ErrorCode, ImageInfo, JobSpec, Message, MsgType
from gpu_worker import models
from http_frontend import service as service_module
from http_frontend.app import FrontendConfig, create_app
from http_frontend.broker_client import ClusterStatus
from http_frontend.pending import PendingJob
from http_frontend.service import ServiceConfig
from tests.openapi_spec import validate

GENERATIONS = "/v1/images/generations"
MAX_BODY = 4096
RETRY_AFTER = 7
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def worker(worker_id: str, *models: str, state: str = "ready") -> dict[str, Any]:
    return {"worker_id": worker_id, "host": "gpu-host", "device": "cpu", "state": state,
            "models": list(models), "max_batch": 4, "running": []}


class FakeBroker:
    """The BrokerClient interface the service uses, answering like a broker and its workers.

    Jobs for a model a ready worker serves get a RESULT with real images of the job's size,
    one per seed; other jobs get FAILED no_worker. ``fail_with`` forces a failure code,
    ``raise_on_submit`` an exception, ``silent`` no answer at all.
    """

    def __init__(self, workers: list[dict[str, Any]] | None = None) -> None:
        self.workers = [worker("w1", "tiny")] if workers is None else workers
        self.queues: dict[str, int] = {}
        self.identities: list[protocol.IdentityLoad] = []
        self.reachable = True
        self.fail_with: ErrorCode | None = None
        self.raise_on_submit: BaseException | None = None
        self.silent = False
        self.submitted: list[JobSpec] = []
        self.cancelled: list[str] = []
        self.forgotten: list[str] = []

    @property
    def connected(self) -> bool:
        return self.reachable

    def status(self) -> ClusterStatus | None:
        if not self.reachable:
            return None
        return ClusterStatus(self.workers, self.queues, time.monotonic(),
                             identities=self.identities)

    owner = "frontend-under-test"

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: tuple[bytes, ...] = ()) -> PendingJob:
        # What the service built must survive the wire as it is.
        assert protocol.decode(protocol.submit(job, inputs=inputs))["job"] == job
        self.submitted.append(job)
        if self.raise_on_submit is not None:
            raise self.raise_on_submit
        if self.silent:
            return PendingJob(job.id)  # never answered
        pending = PendingJob(job.id)
        pending.update(Message(MsgType.ACCEPTED, {"job_id": job.id, "position": 0}))
        pending.update(self._answer(job))
        return pending

    def cancel(self, job_id: str, *, owner: str | None = None, forget: bool = True) -> None:
        self.cancelled.append(job_id)

    def forget(self, job_id: str) -> None:
        self.forgotten.append(job_id)

    def _answer(self, job: JobSpec) -> Message:
        served = any(w["state"] == "ready" and job.model in w["models"] for w in self.workers)
        code = self.fail_with
        if not self.reachable:
            code = ErrorCode.BROKER_UNAVAILABLE
        elif code is None and not served:
            code = ErrorCode.NO_WORKER
        if code is not None:
            return protocol.decode(protocol.failed(job.id, code, f"fake broker says {code.value}",
                                                   retryable=True))
        infos = [ImageInfo(seed=s, width=job.width, height=job.height, format=job.output_format)
                 for s in job.seeds]
        payloads = [encode_image(job.width, job.height, seed, job.output_format)
                    for seed in job.seeds]
        return protocol.decode(protocol.result(job.id, infos, payloads,
                                               timings={"total": 0.01}, worker_id="w1"))


def encode_image(width: int, height: int, seed: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (seed % 256, 40, 90)).save(out, _PIL_FORMATS[fmt])
    return out.getvalue()


# The broker and client fixtures are in conftest.py, shared by every HTTP test module.


def post(client, body: Any, **kwargs) -> falcon.testing.Result:
    """POST a generation and check the answer's shape against OpenAI's spec."""
    result = client.simulate_post(GENERATIONS, json=body, **kwargs)
    return checked(result)


def checked(result: falcon.testing.Result, schema: str = "ImagesResponse"):
    assert result.headers["content-type"].startswith("application/json")
    validate(result.json, schema if result.status_code < 400 else "ErrorResponse")
    return result


def error_of(result: falcon.testing.Result, status: int) -> dict[str, Any]:
    assert result.status_code == status, result.text
    checked(result)
    return result.json["error"]


def should_retry(result: falcon.testing.Result) -> str | None:
    return result.headers.get("x-should-retry")


def decode_images(result: falcon.testing.Result) -> list[Image.Image]:
    images = []
    for item in result.json["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"], validate=True)))
        image.load()
        images.append(image)
    return images


# ------------------------------------------------------------------------------ generation

def test_generation_returns_n_images_of_the_requested_size_with_consecutive_seeds(client, broker):
    result = post(client, {"prompt": "a red fox", "model": "tiny", "n": 3, "size": "64x32",
                           "seed": 1234})
    assert result.status_code == 200, result.text
    assert "x-should-retry" not in result.headers
    data = result.json
    assert [item["seed"] for item in data["data"]] == [1234, 1235, 1236]
    images = decode_images(result)
    assert [(im.format, im.size) for im in images] == [("PNG", (64, 32))] * 3
    assert data["output_format"] == "png"
    assert (data["model"], data["width"], data["height"]) == ("tiny", 64, 32)
    assert "size" not in data  # 64x32 is not one of the spec's response sizes
    assert abs(data["created"] - time.time()) < 60
    (job,) = broker.submitted
    assert (job.model, job.width, job.height, job.seeds) == ("tiny", 64, 32, (1234, 1235, 1236))
    assert job.prompt == "a red fox"


def test_without_a_seed_random_seeds_are_still_returned(client, broker):
    first = post(client, {"prompt": "a fox", "n": 2, "size": "16x16"})
    second = post(client, {"prompt": "a fox", "n": 2, "size": "16x16"})
    seeds = [[item["seed"] for item in r.json["data"]] for r in (first, second)]
    for got, job in zip(seeds, broker.submitted, strict=True):
        assert isinstance(got[0], int) and got[0] >= 0
        assert got == [got[0], got[0] + 1] == list(job.seeds)
    assert seeds[0] != seeds[1]


def test_model_defaults_fill_the_job(client, broker):
    result = post(client, {"prompt": "a fox"})  # no model: the one the workers serve
    assert result.status_code == 200
    assert [im.size for im in decode_images(result)] == [(256, 256)]
    (job,) = broker.submitted
    assert (job.model, job.steps, job.guidance, job.n) == ("tiny", 4, 5.0, 1)
    assert job.timeout == 30.0


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_other_output_formats(client, broker, fmt):
    result = post(client, {"prompt": "a fox", "size": "32x32", "output_format": fmt,
                           "output_compression": 80})
    assert result.status_code == 200
    assert result.json["output_format"] == fmt
    assert [im.format for im in decode_images(result)] == [_PIL_FORMATS[fmt]]
    assert broker.submitted[0].output_compression == 80


def test_a_model_outside_the_registry_uses_the_limits_its_worker_announced(client, broker):
    spec = models.generic("someone/my-model", default_size=(512, 384), size_multiple=64,
                          default_steps=12, max_steps=20, default_guidance=2.5)
    broker.workers = [{**worker("w1", spec.name), "model_info": {spec.name: spec.describe()}}]
    result = post(client, {"prompt": "a fox", "model": spec.name})
    assert result.status_code == 200
    assert [im.size for im in decode_images(result)] == [(512, 384)]
    (job,) = broker.submitted
    assert (job.model, job.steps, job.guidance) == (spec.name, 12, 2.5)
    error = error_of(post(client, {"prompt": "a fox", "model": spec.name, "size": "520x384"}),
                     400)
    assert error["param"] == "size"
    error = error_of(post(client, {"prompt": "a fox", "model": spec.name, "steps": 21}), 400)
    assert error["param"] == "steps"


def test_step_cache_false_goes_to_the_worker_on_the_job(client, broker):
    assert post(client, {"prompt": "a fox", "step_cache": False}).status_code == 200
    assert post(client, {"prompt": "a fox"}).status_code == 200
    assert [job.step_cache for job in broker.submitted] == [False, True]
    error = error_of(post(client, {"prompt": "a fox", "step_cache": "no"}), 400)
    assert error["param"] == "step_cache"


def test_spec_sizes_are_echoed_and_the_openai_sdk_fields_accepted(client, broker):
    broker.workers = [worker("w1", "sdxl")]
    result = post(client, {"prompt": "a fox", "model": "sdxl", "size": "1024x1024",
                           "quality": "high", "background": "opaque", "moderation": "low",
                           "style": "vivid", "user": "user-1", "response_format": "b64_json"})
    assert result.status_code == 200
    assert (result.json["size"], result.json["quality"], result.json["background"]) == \
        ("1024x1024", "high", "opaque")
    assert broker.submitted[0].user == "user-1"


def test_warnings_reach_the_client(client, broker):
    broker.workers = [worker("w1", "flux-schnell")]
    result = post(client, {"prompt": "a fox", "model": "flux-schnell", "size": "256x256",
                           "negative_prompt": "blurry"})
    assert result.status_code == 200
    assert len(result.json["warnings"]) == 1
    assert broker.submitted[0].negative_prompt is None


def test_a_charset_parameter_and_a_missing_content_type_are_accepted(client):
    body = json.dumps({"prompt": "a fox", "size": "16x16"})
    for headers in ({"Content-Type": "application/json; charset=utf-8"}, {}):
        result = client.simulate_post(GENERATIONS, body=body, headers=headers)
        assert checked(result).status_code == 200


# ------------------------------------------------------------------------------ job failures

INVALID, SERVER, RATE = "invalid_request_error", "server_error", "rate_limit_error"


@pytest.mark.parametrize(("code", "model", "status", "error_code", "kind", "retry_after"), [
    # no_worker is what the fake broker answers for a model no ready worker serves.
    (ErrorCode.NO_WORKER, "sdxl", 503, "no_worker", SERVER, True),
    (ErrorCode.NO_WORKER, "someone/unknown-model", 404, "model_not_found", INVALID, False),
    (ErrorCode.MODEL_NOT_FOUND, "tiny", 404, "model_not_found", INVALID, False),
    (ErrorCode.QUEUE_FULL, "tiny", 429, "queue_full", RATE, True),
    (ErrorCode.TIMEOUT, "tiny", 504, "timeout", SERVER, False),
    (ErrorCode.WORKER_ERROR, "tiny", 500, "worker_error", SERVER, False),
    (ErrorCode.WORKER_LOST, "tiny", 500, "worker_lost", SERVER, False),
    (ErrorCode.SHUTTING_DOWN, "tiny", 503, "shutting_down", SERVER, None),
    (ErrorCode.INVALID_REQUEST, "tiny", 400, "invalid_request", INVALID, False),
])
def test_job_failures_map_to_http(client, broker, code, model, status, error_code, kind,
                                  retry_after):
    broker.fail_with = None if code is ErrorCode.NO_WORKER else code
    result = post(client, {"prompt": "a fox", "model": model, "size": "512x512"})
    error = error_of(result, status)
    assert (error["code"], error["type"]) == (error_code, kind)
    assert error["message"]
    if error_code in ("no_worker", "model_not_found"):
        assert error["param"] == "model"
    if retry_after is True:
        assert result.headers["retry-after"] == str(RETRY_AFTER)
    elif retry_after is False:
        assert "retry-after" not in result.headers


def test_no_worker_for_a_registry_model_vs_an_unknown_model(client, broker):
    # Nothing serves sdxl, a model the registry knows: come back later.
    result = post(client, {"prompt": "a fox", "model": "sdxl"})
    assert error_of(result, 503)["code"] == "no_worker"
    assert result.headers["retry-after"] == str(RETRY_AFTER)
    assert should_retry(result) in (None, "true")
    # A name nobody knows: no point retrying.
    result = post(client, {"prompt": "a fox", "model": "nobody/knows-this"})
    assert error_of(result, 404)["code"] == "model_not_found"
    assert should_retry(result) == "false"


def test_broker_unavailable_is_a_retryable_503(client, broker):
    broker.reachable = False
    result = post(client, {"prompt": "a fox", "model": "tiny"})
    assert error_of(result, 503)["code"] == "broker_unavailable"
    assert result.headers["retry-after"] == str(RETRY_AFTER)
    assert should_retry(result) in (None, "true")


def test_a_broker_that_never_answers_is_a_504_and_the_job_is_cancelled(
        client, broker, monkeypatch):
    monkeypatch.setattr(service_module, "DEADLINE_SLACK", 0.0)
    broker.silent = True
    result = post(client, {"prompt": "a fox", "timeout": 0.3})
    assert error_of(result, 504)["code"] == "timeout"
    assert broker.cancelled == [broker.submitted[0].id]
    assert broker.submitted[0].timeout == 0.3


def test_a_broker_gone_past_the_deadline_is_a_retryable_503(client, broker, monkeypatch):
    monkeypatch.setattr(service_module, "DEADLINE_SLACK", 0.0)
    broker.silent = True
    original_submit = broker.submit

    def submit_then_vanish(job, **_):
        pending = original_submit(job)
        broker.reachable = False  # the broker dies while the job is in flight
        return pending

    broker.submit = submit_then_vanish
    result = post(client, {"prompt": "a fox", "timeout": 0.3})
    assert error_of(result, 503)["code"] == "broker_unavailable"
    assert should_retry(result) in (None, "true")


def test_a_client_that_hangs_up_cancels_its_job(client, broker):
    broker.silent = True
    result = client.simulate_post("/v1/images/generations", json={"prompt": "a fox"},
                                  extras={"waitress.client_disconnected": lambda: True})
    assert result.status_code == 499
    assert broker.cancelled == [broker.submitted[0].id]


@pytest.mark.parametrize(("body", "status"), [
    ({"prompt": "a fox", "n": 0}, 400),
    ({"prompt": "a fox", "model": "nobody/knows-this"}, 404),
])
def test_client_errors_say_do_not_retry(client, body, status):
    result = post(client, body)
    assert result.status_code == status
    assert should_retry(result) == "false"


@pytest.mark.parametrize("code", [ErrorCode.QUEUE_FULL, ErrorCode.NO_WORKER,
                                  ErrorCode.BROKER_UNAVAILABLE, ErrorCode.TIMEOUT])
def test_retryable_errors_do_not_say_do_not_retry(client, broker, code):
    broker.fail_with = code
    result = post(client, {"prompt": "a fox"})
    assert result.status_code in (429, 503, 504)
    assert should_retry(result) in (None, "true")


# ------------------------------------------------------------------------------ bad requests

@pytest.mark.parametrize(("body", "param"), [
    ({"n": 1}, "prompt"),
    ({"prompt": "a fox", "n": 11}, "n"),
    ({"prompt": "a fox", "size": "13x13"}, "size"),  # tiny: multiples of 8
    ({"prompt": "a fox", "steps": 51}, "steps"),  # tiny: at most 50
    ({"prompt": "a fox", "output_format": "gif"}, "output_format"),
    ({"prompt": "a fox", "response_format": "url"}, "response_format"),
])
def test_bad_fields_are_400s_naming_the_param(client, broker, body, param):
    result = post(client, body)
    error = error_of(result, 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert should_retry(result) == "false"
    assert broker.submitted == []


@pytest.mark.parametrize("raw", [
    b'{"prompt": "a fox",',
    b"",
    b"\xff\xfe{}",
    b'{"prompt": "caf\xe9"}',  # latin-1, not UTF-8
    b'["a fox"]',
    b'"a fox"',
    b"null",
    b'{"prompt": "a fox", "guidance": NaN}',
    b'{"prompt": "a fox", "timeout": Infinity}',
    b'{"prompt": "a fox", "n": ' + b"9" * 5000 + b"}",
    b"[" * 3000 + b"]" * 3000,
], ids=["truncated", "empty", "bom-garbage", "latin-1", "array", "string", "null", "nan",
        "infinity", "huge-number", "deep-nesting"])
def test_bodies_that_are_not_a_json_object_are_400s(client, broker, raw):
    config = FrontendConfig(max_body=1 << 16)
    app_client = falcon.testing.TestClient(create_app(config, broker))
    result = app_client.simulate_post(GENERATIONS, body=raw,
                                      headers={"Content-Type": "application/json"})
    error = error_of(result, 400)
    assert error["param"] is None
    assert error["code"] == "invalid_json"
    assert should_retry(result) == "false"
    assert broker.submitted == []


def test_a_body_over_max_body_with_content_length_is_a_413(client, broker):
    body = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    result = client.simulate_post(GENERATIONS, body=body,
                                  headers={"Content-Type": "application/json"})
    assert error_of(result, 413)["code"] == "request_too_large"
    assert should_retry(result) == "false"
    assert broker.submitted == []


def test_a_body_over_max_body_without_content_length_is_a_413(client, broker):
    # A chunked upload, de-chunked by the server: no Content-Length, input ends at EOF.
    body = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    result = client.simulate_post(GENERATIONS, body=body,
                                  headers={"Content-Type": "application/json"},
                                  extras={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    assert error_of(result, 413)["code"] == "request_too_large"
    assert should_retry(result) == "false"
    assert broker.submitted == []


def test_a_small_body_without_content_length_is_read(client, broker):
    body = json.dumps({"prompt": "a fox", "size": "16x16"}).encode()
    result = client.simulate_post(GENERATIONS, body=body,
                                  headers={"Content-Type": "application/json"},
                                  extras={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    assert checked(result).status_code == 200
    assert broker.submitted[0].prompt == "a fox"


def test_a_body_of_exactly_max_body_is_read(client, broker):
    body = json.dumps({"prompt": "a fox", "size": "16x16"}).encode()
    body += b" " * (MAX_BODY - len(body))
    result = client.simulate_post(GENERATIONS, body=body,
                                  headers={"Content-Type": "application/json"})
    assert checked(result).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_json_is_a_415(client, broker, content_type):
    result = client.simulate_post(GENERATIONS, body=b'{"prompt": "a fox"}',
                                  headers={"Content-Type": content_type})
    assert error_of(result, 415)["code"] == "unsupported_media_type"
    assert should_retry(result) == "false"


# ------------------------------------------------------------------------------ routing

def test_unknown_route_is_a_404_in_openai_shape(client):
    result = client.simulate_get("/v1/images/variations")
    error = error_of(result, 404)
    assert error["type"] == "invalid_request_error"
    assert "/v1/images/variations" in error["message"]
    assert should_retry(result) == "false"


def test_wrong_method_is_a_405_in_openai_shape(client):
    result = client.simulate_get(GENERATIONS)
    error = error_of(result, 405)
    assert error["code"] == "method_not_allowed"
    assert "POST" in result.headers["allow"]
    assert should_retry(result) == "false"
    error = error_of(client.simulate_delete("/v1/models"), 405)
    assert error["type"] == "invalid_request_error"


def test_an_unexpected_exception_is_a_500_that_tells_nothing(client, broker, caplog):
    broker.raise_on_submit = RuntimeError("secret /etc/passwd")
    with caplog.at_level(logging.ERROR):
        result = post(client, {"prompt": "a fox"})
    error = error_of(result, 500)
    assert error["type"] == "server_error"
    for leak in ("Traceback", "/etc/passwd", "RuntimeError", "secret", ".py"):
        assert leak not in result.text
    # It is in the log instead.
    assert "secret /etc/passwd" in caplog.text


# ------------------------------------------------------------------------------ health

def test_healthz(client, broker):
    broker.reachable = False
    result = client.simulate_get("/healthz")
    assert result.status_code == 200
    assert result.json == {"status": "ok"}


def test_readyz_with_a_ready_worker(client, broker):
    result = client.simulate_get("/readyz")
    assert result.status_code == 200
    assert result.json["ready"] is True
    assert result.json["workers"] == 1


@pytest.mark.parametrize("setup", ["unreachable", "no-workers", "only-draining-workers"])
def test_readyz_without_one_is_a_503(client, broker, setup):
    if setup == "unreachable":
        broker.reachable = False
    elif setup == "no-workers":
        broker.workers = []
    else:
        broker.workers = [worker("w1", "tiny", state="draining")]
    result = client.simulate_get("/readyz")
    assert result.status_code == 503
    assert result.json["ready"] is False
    assert result.json["reason"]


def test_models_lists_served_models_with_ready_worker_counts(client, broker):
    broker.workers = [worker("w1", "tiny"), worker("w2", "tiny", "sdxl"),
                      worker("w3", "sdxl-turbo", state="draining")]
    broker.queues = {"tiny": 3}
    result = checked(client.simulate_get("/v1/models"), "ListModelsResponse")
    assert result.status_code == 200
    models = {m["id"]: m for m in result.json["data"]}
    assert set(models) == {"tiny", "sdxl"}
    assert (models["tiny"]["ready_workers"], models["sdxl"]["ready_workers"]) == (2, 1)
    assert (models["tiny"]["queued"], models["sdxl"]["queued"]) == (3, 0)
    assert models["tiny"]["object"] == "model"
    assert models["tiny"]["limits"]["default_size"] == "256x256"


@pytest.mark.parametrize("name", ["someone/sdxl-finetune", "/srv/models/mine"])
def test_a_model_named_with_slashes_can_be_retrieved(client, broker, name):
    """Repo ids and directories are model names too: OpenAI's retrieve puts them in the path."""
    broker.workers = [worker("w1", name)]
    result = checked(client.simulate_get(f"/v1/models/{name}"), "Model")
    assert result.status_code == 200 and result.json["id"] == name
    assert error_of(client.simulate_get("/v1/models/someone/else"), 404)["param"] == "model"


def test_models_without_a_broker_is_a_503(client, broker):
    # An empty list would read as "no models"; the truth is "cannot tell right now".
    broker.reachable = False
    error = error_of(client.simulate_get("/v1/models"), 503)
    assert error["code"] == "broker_unavailable"
    result = client.simulate_get("/v1/models")
    assert int(result.headers["retry-after"]) > 0


def test_cluster_shows_workers_and_503s_without_a_broker(client, broker):
    result = client.simulate_get("/v1/cluster")
    assert result.status_code == 200
    assert result.json["workers"][0]["worker_id"] == "w1"
    broker.reachable = False
    result = client.simulate_get("/v1/cluster")
    assert error_of(result, 503)["code"] == "broker_unavailable"
    assert result.headers["retry-after"] == str(RETRY_AFTER)


def test_a_draining_workers_repo_model_is_503_not_404(client, broker):
    # The model exists (a worker announced it) but no worker can take it right now.
    broker.workers = [worker("w1", "acme/custom-model", state="draining")]
    error = error_of(post(client, {"prompt": "x", "model": "acme/custom-model",
                                   "size": "64x64"}), 503)
    assert error["code"] == "no_worker"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head(client, path):
    assert client.simulate_head(path).status_code == 200


@pytest.fixture
def service_and_client(broker: FakeBroker):
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0, retry_after=RETRY_AFTER),
                            max_body=MAX_BODY)
    service = service_module.ImageService(broker, config.service)
    return service, falcon.testing.TestClient(create_app(config, broker, service=service))


def test_draining_refuses_new_work_and_is_not_ready(service_and_client, broker):
    service, client = service_and_client
    assert client.simulate_get("/readyz").status_code == 200
    service.begin_drain(5.0)
    error = error_of(post(client, {"prompt": "a fox"}), 503)
    assert error["code"] == "shutting_down"
    assert broker.submitted == []
    assert client.simulate_get("/readyz").status_code == 503


def test_a_request_still_waiting_when_the_drain_ends_gets_a_503(service_and_client, broker):
    service, client = service_and_client
    broker.silent = True
    original_submit = broker.submit

    def submit_then_drain(job, **_):
        pending = original_submit(job)
        service.begin_drain(0.0)  # SIGTERM arrives while the job waits
        return pending

    broker.submit = submit_then_drain
    error = error_of(post(client, {"prompt": "a fox"}), 503)
    assert error["code"] == "shutting_down"
    assert broker.cancelled == [broker.submitted[0].id]
    assert service.in_flight == 0
