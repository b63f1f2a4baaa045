"""Requests that push at the edges: timeouts past the server's, no model on a mixed cluster,
failure codes nobody expects, every method on every route, a dead broker thread."""

from __future__ import annotations

import falcon.testing
import pytest

from broker import protocol
from broker.protocol import ErrorCode, JobSpec, Message, MsgType
from http_frontend.app import FrontendConfig, create_app
from http_frontend.service import ServiceConfig
from tests.http_frontend.test_app import (
    MAX_BODY,
    RETRY_AFTER,
    FakeBroker,
    checked,
    error_of,
    post,
    worker,
)


def app_client(broker: FakeBroker, **service: object) -> falcon.testing.TestClient:
    config = FrontendConfig(service=ServiceConfig(**{"default_timeout": 30.0,
                                                     "retry_after": RETRY_AFTER, **service}),
                            max_body=MAX_BODY)
    return falcon.testing.TestClient(create_app(config, broker))


# ------------------------------------------------------------------------------ timeout

@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/jobs"])
def test_a_timeout_past_the_servers_is_a_400_not_clamped(client, broker, route):
    result = client.simulate_post(route, json={"prompt": "a fox", "timeout": 30.5})
    error = error_of(result, 400)
    assert (error["param"], error["code"]) == ("timeout", "invalid_value")
    assert "30" in error["message"]
    assert broker.submitted == []


def test_a_timeout_up_to_the_servers_is_taken(client, broker):
    assert post(client, {"prompt": "a fox", "size": "16x16", "timeout": 30}).status_code == 200
    assert broker.submitted[0].timeout == 30.0


# ------------------------------------------------------------------------------ default model

def test_the_configured_default_model_wins_over_what_workers_serve(broker):
    broker.workers = [worker("w1", "aaa/first-alphabetically"), worker("w2", "sdxl-turbo")]
    result = post(app_client(broker, default_model="sdxl-turbo"), {"prompt": "a fox"})
    assert result.status_code == 200
    assert broker.submitted[0].model == "sdxl-turbo"


def test_without_a_default_the_only_model_served_is_used(broker):
    broker.workers = [worker("w1", "sdxl-turbo"), worker("w2", "sdxl-turbo")]
    assert post(app_client(broker), {"prompt": "a fox"}).status_code == 200
    assert broker.submitted[0].model == "sdxl-turbo"


def test_without_a_default_a_multi_model_cluster_needs_a_model(broker):
    # An extra worker must not quietly become the default by its name.
    broker.workers = [worker("w1", "tiny"), worker("w2", "aaa/extra", state="starting")]
    result = post(app_client(broker), {"prompt": "a fox"})
    error = error_of(result, 400)
    assert (error["param"], error["code"]) == ("model", "missing_required_parameter")
    assert "tiny" in error["message"] and "aaa/extra" in error["message"]
    assert broker.submitted == []


def test_without_a_default_and_no_worker_it_is_a_retryable_503(broker):
    broker.workers = []
    result = post(app_client(broker), {"prompt": "a fox"})
    error = error_of(result, 503)
    assert (error["param"], error["code"]) == ("model", "no_worker")
    assert result.headers["retry-after"] == str(RETRY_AFTER)


def test_without_a_default_and_no_broker_it_is_a_retryable_503(broker):
    broker.reachable = False
    result = post(app_client(broker), {"prompt": "a fox"})
    assert error_of(result, 503)["code"] == "broker_unavailable"
    assert result.headers["retry-after"] == str(RETRY_AFTER)


# ------------------------------------------------------------------------------ failure codes

class FailingBroker(FakeBroker):
    """Fails every job with ``code``, whatever it is."""

    def __init__(self, code: str) -> None:
        super().__init__()
        self.code = code

    def _answer(self, job: JobSpec) -> Message:
        return protocol.decode(protocol.encode(MsgType.FAILED, {
            "job_id": job.id, "code": self.code, "message": "something happened"}))


@pytest.mark.parametrize(("code", "error_code"), [
    ("gremlins", "unknown_error"),  # a code this frontend does not know
    ("", "unknown_error"),
    (ErrorCode.CANCELLED.value, "cancelled"),  # a cancel nobody here asked for
])
def test_failures_nobody_asked_for_are_500s(code, error_code):
    broker = FailingBroker(code)
    result = post(app_client(broker), {"prompt": "a fox", "size": "16x16"})
    error = error_of(result, 500)
    assert (error["code"], error["type"]) == (error_code, "server_error")


# ------------------------------------------------------------------------------ methods

GET_ROUTES = ["/", "/healthz", "/readyz", "/v1/models", "/v1/cluster", "/static/app.js",
              "/static/style.css"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_where_get_does(client, path):
    get, head = client.simulate_get(path), client.simulate_head(path)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.parametrize(("path", "allowed"), [
    *((p, {"GET", "HEAD", "OPTIONS"}) for p in GET_ROUTES),
    ("/v1/images/generations", {"POST", "OPTIONS"}),
    ("/v1/jobs", {"GET", "HEAD", "POST", "OPTIONS"}),
    ("/v1/jobs/abc", {"GET", "HEAD", "DELETE", "OPTIONS"}),
    ("/v1/jobs/abc/events", {"GET", "HEAD", "OPTIONS"}),
])
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "TRACE",
                                    "CONNECT", "PROPFIND", "FOO"])
@pytest.mark.filterwarnings("ignore::wsgiref.validate.WSGIWarning")  # methods it does not know
def test_other_methods_are_405s_with_allow(client, path, allowed, method):
    if method in allowed:
        return
    result = client.simulate_request(method, path)
    error = error_of(result, 405)
    assert error["code"] == "method_not_allowed"
    assert {m.strip() for m in result.headers["allow"].split(",")} == allowed


def test_static_files_stay_in_their_directory(client):
    for path in ("/static/../README.md", "/static/%2e%2e/README.md", "/static/", "/static"):
        assert error_of(client.simulate_get(path), 404)["code"] == "not_found"


# ------------------------------------------------------------------------------ readiness

def test_readyz_says_when_the_broker_thread_died(client, broker):
    assert client.simulate_get("/readyz").status_code == 200
    broker.alive = False
    result = client.simulate_get("/readyz")
    assert result.status_code == 503
    assert result.json == {"ready": False, "reason": "broker connection thread died"}


def test_every_answer_here_is_json_with_a_content_type(client):
    for result in (client.simulate_get("/nope"), client.simulate_put("/healthz"),
                   client.simulate_post("/v1/jobs", body=b"{", headers={
                       "Content-Type": "application/json"})):
        checked(result)
