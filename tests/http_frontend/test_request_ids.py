"""X-Request-ID: echoed when well formed, made otherwise, on every answer, logged with jobs."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import falcon.testing
import pytest

from broker.protocol import ErrorCode
from http_frontend import request_ids
from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import default_name
from http_frontend.service import ServiceConfig
from tests.http_frontend.test_app import GENERATIONS, MAX_BODY, FakeBroker

MADE = re.compile(r"^[0-9a-f]{32}$")
BODY = {"prompt": "a lighthouse", "model": "tiny", "size": "64x64", "user": "end-user-7"}
KEY = "sk-request-ids"


def returned(result: falcon.testing.Result) -> str:
    values = [v for k, v in result.headers.items() if k.lower() == "x-request-id"]
    assert len(values) == 1, result.headers
    return values[0]


@pytest.mark.parametrize("given", ["abc", "a" * 128, "req-1.2_3:4/5+6=7~!", "x"])
def test_a_well_formed_id_is_echoed(client, given: str) -> None:
    assert returned(client.simulate_get("/healthz", headers={"X-Request-ID": given})) == given


def test_an_id_is_made_when_there_is_none(client) -> None:
    first = returned(client.simulate_get("/healthz"))
    second = returned(client.simulate_get("/healthz"))
    assert MADE.match(first) and MADE.match(second) and first != second


@pytest.mark.parametrize("hostile", [
    "a" * 129, "", " ", "with space", "tab\tid", "new\nline", "bell\x07", "del\x7f",
    "caf\u00e9", "a,b",
])
def test_a_malformed_id_is_replaced_never_refused(client, hostile: str) -> None:
    result = client.simulate_get("/healthz", headers={"X-Request-ID": hostile})
    assert result.status_code == 200
    assert MADE.match(returned(result))


def test_several_headers_are_replaced(client) -> None:
    result = client.simulate_get("/healthz", headers=[("X-Request-ID", "one"),
                                                      ("X-Request-ID", "two")])
    assert MADE.match(returned(result))


def test_the_header_name_is_case_insensitive(client) -> None:
    assert returned(client.simulate_get("/healthz", headers={"x-request-id": "lower"})) == \
        "lower"


@pytest.fixture
def keyed() -> falcon.testing.TestClient:
    config = FrontendConfig(api_keys=(KEY,), max_body=MAX_BODY,
                            cors_origins=("https://studio.example",))
    return falcon.testing.TestClient(create_app(config, FakeBroker()))


def test_a_401_carries_the_id(keyed) -> None:
    result = keyed.simulate_get("/v1/models", headers={"X-Request-ID": "no-key"})
    assert result.status_code == 401 and returned(result) == "no-key"


def test_browsers_may_read_the_id(keyed) -> None:
    result = keyed.simulate_get("/healthz", headers={"Origin": "https://studio.example"})
    exposed = result.headers.get("access-control-expose-headers", "").lower()
    assert "x-request-id" in exposed


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("GET", "/nowhere", {}, 404),
    ("DELETE", "/v1/models", {}, 405),
    ("BREW", "/v1/models", {}, 405),
    ("POST", GENERATIONS, {"body": "x" * (MAX_BODY + 1),
                           "headers": {"Content-Type": "application/json"}}, 413),
    ("POST", GENERATIONS, {"body": "{not json"}, 400),
])
def test_errors_carry_the_id(client, method: str, path: str, kwargs: dict[str, Any],
                             status: int) -> None:
    headers = {**kwargs.pop("headers", {}), "X-Request-ID": f"err-{status}"}
    result = client.simulate_request(method, path, headers=headers, **kwargs)
    assert result.status_code == status
    assert returned(result) == f"err-{status}"


def test_an_unexpected_error_carries_the_id(broker) -> None:
    broker.raise_on_submit = RuntimeError("a bug")
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0), max_body=MAX_BODY)
    client = falcon.testing.TestClient(create_app(config, broker))
    result = client.simulate_post(GENERATIONS, json=BODY, headers={"X-Request-ID": "bug-1"})
    assert result.status_code == 500 and returned(result) == "bug-1"


def job_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "http_frontend.job_log"]


def test_a_job_is_logged_when_sent_and_when_done_with_its_request_id(client, caplog) -> None:
    with caplog.at_level(logging.INFO):
        result = client.simulate_post(GENERATIONS, json=BODY, headers={"X-Request-ID": "r-42"})
    assert result.status_code == 200, result.text
    job_id = result.json["job_id"]
    sent, ended = job_lines(caplog)
    for line in (sent, ended):
        assert (line.job_id, line.model, line.user, line.request_id) == (  # type: ignore
            job_id, "tiny", "end-user-7", "r-42")
        assert "a lighthouse" not in line.getMessage()  # prompts are never logged
    assert "sent to the broker" in sent.getMessage()
    assert re.search(r"succeeded: 1 image\(s\) in \d+\.\d\d s", ended.getMessage())


def test_a_failed_job_is_logged_with_its_code(client, broker, caplog) -> None:
    broker.fail_with = ErrorCode.QUEUE_FULL
    with caplog.at_level(logging.INFO):
        client.simulate_post(GENERATIONS, json=BODY)
    ended = job_lines(caplog)[-1]
    assert "failed" in ended.getMessage() and "queue_full" in ended.getMessage()
    assert MADE.match(ended.request_id)  # type: ignore[attr-defined]


def test_with_keys_the_user_is_the_keys_name(keyed, caplog) -> None:
    with caplog.at_level(logging.INFO):
        result = keyed.simulate_post(GENERATIONS, json=BODY,
                                     headers={"Authorization": f"Bearer {KEY}"})
    assert result.status_code == 200, result.text
    assert {r.user for r in job_lines(caplog)} == {default_name(KEY)}  # type: ignore


def test_jobs_api_submissions_are_logged_too(client, caplog) -> None:
    with caplog.at_level(logging.INFO):
        result = client.simulate_post("/v1/jobs", json=BODY, headers={"X-Request-ID": "j-1"})
    assert result.status_code in (200, 202), result.text
    lines = job_lines(caplog)
    assert lines and all(r.request_id == "j-1" for r in lines)  # type: ignore


def test_a_request_id_stays_current_while_the_answer_is_written_until_the_next_request(
        client) -> None:
    # A streamed answer is written by the thread after the app returned: its lines are the
    # request's. The thread's next request has its own id, never the one before.
    client.simulate_get("/healthz", headers={"X-Request-ID": "first"})
    assert request_ids.current() == "first"
    answer = client.simulate_get("/healthz")
    assert request_ids.current() == answer.headers["X-Request-ID"] != "first"


def test_lines_logged_during_a_request_carry_its_id(broker, caplog) -> None:
    caplog.handler.addFilter(request_ids.LogFilter())  # as the frontend's entry point does
    broker.raise_on_submit = RuntimeError("a bug")
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0), max_body=MAX_BODY)
    client = falcon.testing.TestClient(create_app(config, broker))
    client.simulate_post(GENERATIONS, json=BODY, headers={"X-Request-ID": "bug-2"})
    unhandled = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert unhandled and unhandled[0].request_id == "bug-2"  # type: ignore[attr-defined]
    outside = logging.makeLogRecord({"msg": "not in a request"})
    thread = threading.Thread(target=request_ids.LogFilter().filter, args=(outside,))
    thread.start()
    thread.join()
    assert not hasattr(outside, "request_id")  # a thread that served no request: none
