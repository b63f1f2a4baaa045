"""The HTTP surface of storage, attacked in-process: image files, job listings, keys, owners."""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from http_frontend.auth import ApiKey
from http_frontend.database import DatabaseError
from http_frontend.image_store import StoreError
from tests.http_frontend.test_app import FakeBroker, error_of
from tests.http_frontend.test_history import (
    FOX,
    GENERATIONS,
    Frontend,
    OwnedBroker,
    make_frontend,
    make_history,
    path_of,
    settle_all,
    stored_files,
    submit_job,
)
from tests.http_frontend.test_keeper import open_elsewhere

KEYS = (ApiKey("sk-alice", "alice"), ApiKey("sk-bob", "bob"),
        ApiKey("sk-root", "root", admin=True))
SECRET_PATH = "/srv/secret-data/jobs.db"


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def fake() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def front(fake: FakeBroker, tmp_path: Path) -> Frontend:
    return make_frontend(fake, make_history(tmp_path), image_ttl=3600.0)


@pytest.fixture
def hung(tmp_path: Path) -> Frontend:
    return make_frontend(OwnedBroker(), make_history(tmp_path))


@pytest.fixture
def keyed(tmp_path: Path) -> Frontend:
    return make_frontend(OwnedBroker(), make_history(tmp_path), api_keys=KEYS)


def image_path(front: Frontend) -> str:
    """Generate one image by URL; the path to GET it."""
    result = front.client.simulate_post(GENERATIONS, json={**FOX, "response_format": "url"})
    assert result.status_code == 200, result.text
    return path_of(result.json["data"][0]["url"])


def not_found(result: falcon.testing.Result) -> None:
    """A 404 in OpenAI's shape that tells nothing about the server."""
    error = error_of(result, 404)
    assert error["code"] in ("image_not_found", "not_found")
    assert len(error["message"]) < 400
    assert "Traceback" not in result.text and "/tmp" not in result.text


# ------------------------------------------------------------------------------ image files

HOSTILE_NAMES = [
    "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fjobs.db", "..", ".",
    "%00", "a%00.png", "A" * 32 + ".png%00.txt", "x" * 10_000 + ".png", "é" * 32 + ".png",
    "%ED%A0%80" * 11 + ".png", "%FF" * 32 + ".png", "A" * 31 + ".png", "A" * 33 + ".png",
    "A" * 32 + ".PNG", "A" * 32 + ".png.png", "A" * 32 + ".gif", "A" * 32, ".check-abc",
    "A" * 32 + ".png/../../x", "A" * 32 + "%2Epng", "A" * 32 + ".png;.js",
    "A" * 32 + ".png%0A", "%0A" + "A" * 32 + ".png", "A" * 32 + ".png%20",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_hostile_image_names_are_404s(front, name, method):
    image_path(front)  # the store holds an image
    result = front.client.simulate_request(method, f"/v1/images/files/{name}")
    if method == "GET":
        not_found(result)
    else:
        assert result.status_code == 404 and result.content == b""


def test_a_stored_names_variants_are_404s(front):
    path = image_path(front)
    name = path.rsplit("/", 1)[1]
    stem = name.split(".")[0]
    for variant in (stem + ".PNG", stem + ".jpeg", stem + ".png.png", stem,
                    stem.swapcase() + ".png", name[:2], f"{name[:2]}/{name}",
                    urllib.parse.quote(f"{name[:2]}/{name}", safe="")):
        not_found(front.client.simulate_get(f"/v1/images/files/{variant}"))
    assert front.client.simulate_get(path).status_code == 200


def test_an_image_answers_get_and_head_with_cache_headers(front):
    path = image_path(front)
    got = front.client.simulate_get(path)
    head = front.client.simulate_head(path)
    assert got.status_code == head.status_code == 200
    assert got.content.startswith(b"\x89PNG") and head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert got.headers["etag"] == head.headers["etag"]
    # Cacheable for what is left of its hour, never longer.
    control = got.headers["cache-control"]
    assert control.startswith("public, max-age=") and control.endswith(", immutable")
    assert 3500 < int(control.split("max-age=")[1].split(",")[0]) <= 3600


def raw_request(front: Frontend, method: str, path: str,
                headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Call the app without falcon.testing's WSGI validator, which refuses a 304 carrying
    Content-Type before the test can look at it."""
    env = falcon.testing.create_environ(path=path, method=method, headers=headers)
    answer: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], object]:
        answer["status"] = int(status.split()[0])
        answer["headers"] = {name.lower(): value for name, value in response_headers}
        return lambda data: None

    body = b"".join(front.client.app(env, start_response))
    return answer["status"], answer["headers"], body


def test_an_etag_comes_back_as_a_304(front):
    path = image_path(front)
    etag = front.client.simulate_get(path).headers["etag"]
    for method in ("GET", "HEAD"):
        for header in (etag, f'"nope", {etag}', f'"nope",{etag}'):
            status, headers, body = raw_request(front, method, path, {"If-None-Match": header})
            assert (status, body) == (304, b"")
            assert headers["etag"] == etag and "immutable" in headers["cache-control"]
    changed = front.client.simulate_get(path, headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200 and changed.content


def test_a_304_carries_no_content_type(front):
    path = image_path(front)
    etag = front.client.simulate_get(path).headers["etag"]
    status, headers, _ = raw_request(front, "GET", path, {"If-None-Match": etag})
    assert status == 304 and "content-type" not in headers


@pytest.mark.parametrize("header", ["W/{etag}", "*"])
def test_weak_etags_and_star_come_back_as_304(front, header):
    path = image_path(front)
    etag = front.client.simulate_get(path).headers["etag"]
    status, _, _ = raw_request(front, "GET", path, {"If-None-Match": header.format(etag=etag)})
    assert status == 304


def test_an_expired_image_is_a_404(front, tmp_path):
    path = image_path(front)
    assert front.client.simulate_get(path).status_code == 200
    (file,) = stored_files(tmp_path / "images")
    past = time.time() - 3601
    os.utime(file, (past, past))
    not_found(front.client.simulate_get(path))
    assert front.client.simulate_head(path).status_code == 404


def test_an_unreadable_store_is_a_503_without_its_path(front, monkeypatch):
    path = image_path(front)

    def broken(name: str) -> None:
        raise StoreError(f"cannot read {SECRET_PATH}/{name}: Input/output error")

    monkeypatch.setattr(front.history.store, "get", broken)
    storage_unavailable(front.client.simulate_get(path))


def test_image_urls_need_no_key_and_jobs_do(keyed):
    job_id = submit_job(keyed, {**FOX, "response_format": "url"}, headers=auth("sk-alice"))
    keyed.broker.answer(job_id)
    settle_all(keyed.history)
    url = keyed.client.simulate_get(f"/v1/jobs/{job_id}", headers=auth("sk-alice")).json[
        "images"][0]["url"]
    assert keyed.client.simulate_get(path_of(url)).status_code == 200
    assert keyed.client.simulate_head(path_of(url)).status_code == 200
    for path in ("/v1/jobs", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
        error = error_of(keyed.client.simulate_get(path), 401)
        assert error["code"] == "invalid_api_key"
    # The open prefix opens nothing else.
    for path in ("/v1/images/files/../../jobs", "/v1/images/files/x/../../../jobs",
                 "/v1/images/files/%2e%2e/%2e%2e/jobs", f"/v1/images/files/../../jobs/{job_id}"):
        result = keyed.client.simulate_get(path)
        assert result.status_code in (401, 404), path
        assert '"status"' not in result.text and '"owner"' not in result.text
    assert keyed.client.simulate_post(path_of(url)).status_code == 405


# ------------------------------------------------------------------------------ GET /v1/jobs

@pytest.fixture
def listed(hung: Frontend) -> Frontend:
    for prompt in ("100% fox", "a_b fox", "back\\slash fox", "plain fox", "Une ÉCOLE"):
        submit_job(hung, {**FOX, "prompt": prompt})
    return hung


def listing(front: Frontend, query: str, **kwargs: Any) -> falcon.testing.Result:
    return front.client.simulate_get("/v1/jobs", query_string=query, **kwargs)


def prompts(result: falcon.testing.Result) -> list[str]:
    assert result.status_code == 200, result.text
    return [job["prompt"] for job in result.json["data"]]


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-1", "limit=101", "limit=abc", "limit=1e3", "limit=1.5", "limit=+5",
    "limit=%EF%BC%95", "limit=%C2%B2", "limit=1&limit=2", "limit=%00", "limit=0x10",
    "limit=" + "1" * 300])
def test_bad_limits_are_400s_naming_limit(listed, query):
    assert error_of(listing(listed, query), 400)["param"] == "limit"


def test_a_limit_of_thousands_of_digits_is_a_400(listed):
    assert error_of(listing(listed, "limit=" + "1" * 5000), 400)["param"] == "limit"


def test_good_limits_page_the_jobs(listed):
    blank = listing(listed, "limit=")  # blank: the default, or a 400 naming it
    assert blank.status_code == 200 or error_of(blank, 400)["param"] == "limit"
    first = listing(listed, "limit=2").json
    assert len(first["data"]) == 2 and first["has_more"] is True
    rest = listing(listed, f"limit=100&before={first['last_id']}").json
    assert len(rest["data"]) == 3 and rest["has_more"] is False
    assert len(prompts(listing(listed, "limit=0100"))) == 5


@pytest.mark.parametrize("query,param", [
    ("status=bogus", "status"), ("status=QUEUED", "status"), ("status=queued&status=failed",
                                                             "status"),
    ("q=" + "x" * 300, "q"), ("before=" + "a" * 300, "before"), ("model=" + "m" * 257, "model"),
    ("q=a&q=b", "q"), ("before=a&before=b", "before")])
def test_bad_filters_are_400s_naming_them(listed, query, param):
    assert error_of(listing(listed, query), 400)["param"] == param


@pytest.mark.parametrize("before", ["0" * 32, "nope", "' OR 1=1 --", "\") OR (1=1",
                                    "x'; DROP TABLE jobs; --", "é", "%00"])
def test_an_unknown_before_is_an_empty_page(listed, before):
    result = listing(listed, "before=" + urllib.parse.quote(before))
    assert result.status_code == 200
    assert result.json["data"] == [] and result.json["has_more"] is False
    assert result.json["first_id"] is None
    assert len(prompts(listing(listed, ""))) == 5  # still there


@pytest.mark.parametrize("q,found", [
    ("%", ["100% fox"]), ("_", ["a_b fox"]), ("\\", ["back\\slash fox"]), ("FOX", None),
    ("' OR '1'='1", []), ("%%", []), ("x" * 256, []), ("ÉCOLE", ["Une ÉCOLE"]),
    ("\U0001f98a", [])])
def test_the_query_matches_literally(listed, q, found):
    result = listing(listed, "q=" + urllib.parse.quote(q))
    expected = found if found is not None else [
        "plain fox", "back\\slash fox", "a_b fox", "100% fox"]
    assert prompts(result) == expected


def test_the_query_ignores_case_beyond_ascii(listed):
    assert prompts(listing(listed, "q=" + urllib.parse.quote("école"))) == ["Une ÉCOLE"]


def test_status_and_model_filter(listed):
    job_id = listed.client.simulate_get("/v1/jobs").json["data"][0]["id"]
    listed.broker.fail(job_id, "worker_error")
    settle_all(listed.history)
    assert prompts(listing(listed, "status=failed")) == ["Une ÉCOLE"]
    assert len(prompts(listing(listed, "status=queued"))) == 4
    assert len(prompts(listing(listed, "model=tiny"))) == 5
    assert prompts(listing(listed, "model=other")) == []


# ------------------------------------------------------------------------------ Idempotency-Key

@pytest.mark.parametrize("key", ["", "k" * 256, "k" * 5000, "\xc3\xa9t\xc3\xa9", "caf\xe9",
                                 "a\x01b", "a\x7fb", "a\tb", "\x00"])
@pytest.mark.parametrize("path", ["/v1/jobs", GENERATIONS])
def test_bad_idempotency_keys_are_400s_naming_the_header(hung, key, path):
    result = hung.client.simulate_post(path, json=FOX, headers={"Idempotency-Key": key})
    assert error_of(result, 400)["param"] == "Idempotency-Key"
    assert hung.broker.submitted == []
    assert hung.client.simulate_get("/v1/jobs").json["data"] == []


def test_the_longest_and_oddest_good_keys_work(hung):
    for key in ("k" * 255, "a b", "~!@#$%^&*()\"'", "x"):
        first = hung.client.simulate_post("/v1/jobs", json=FOX, headers={"Idempotency-Key": key})
        again = hung.client.simulate_post("/v1/jobs", json=FOX, headers={"Idempotency-Key": key})
        assert (first.status_code, again.status_code) == (202, 200), key
        assert first.json["id"] == again.json["id"]


# ------------------------------------------------------------------------------ owners

def test_a_key_holder_cannot_reach_another_keys_job(keyed):
    job_id = submit_job(keyed, headers=auth("sk-alice"))
    missing = "0" * 32
    for method, suffix in (("GET", ""), ("HEAD", ""), ("DELETE", ""), ("GET", "/events"),
                           ("HEAD", "/events")):
        theirs = keyed.client.simulate_request(method, f"/v1/jobs/{job_id}{suffix}",
                                               headers=auth("sk-bob"))
        nothing = keyed.client.simulate_request(method, f"/v1/jobs/{missing}{suffix}",
                                                headers=auth("sk-bob"))
        assert theirs.status_code == nothing.status_code == 404, (method, suffix)
        if method != "HEAD":
            assert theirs.json == {"error": {**nothing.json["error"], "message": nothing.json[
                "error"]["message"].replace(missing, job_id)}}
    assert keyed.broker.cancels == []
    assert listing(keyed, "", headers=auth("sk-bob")).json["data"] == []
    mine = keyed.client.simulate_get(f"/v1/jobs/{job_id}", headers=auth("sk-alice"))
    assert mine.status_code == 200 and mine.json["status"] == "queued"
    assert mine.json["owner"] == "alice"


def test_an_admin_key_sees_and_cancels_every_job(keyed):
    job_id = submit_job(keyed, headers=auth("sk-alice"))
    submit_job(keyed, headers=auth("sk-bob"))
    assert len(listing(keyed, "", headers=auth("sk-root")).json["data"]) == 2
    seen = keyed.client.simulate_get(f"/v1/jobs/{job_id}", headers=auth("sk-root"))
    assert seen.status_code == 200 and seen.json["owner"] == "alice"
    cancelled = keyed.client.simulate_delete(f"/v1/jobs/{job_id}", headers=auth("sk-root"))
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert [job for job, _ in keyed.broker.cancels] == [job_id]


def test_a_user_field_cannot_claim_another_keys_jobs(keyed):
    job_id = submit_job(keyed, headers=auth("sk-alice"))
    submit_job(keyed, {**FOX, "user": "alice"}, headers=auth("sk-bob"))
    assert keyed.client.simulate_get(f"/v1/jobs/{job_id}",
                                     headers=auth("sk-bob")).status_code == 404
    owners = {job["owner"] for job in listing(keyed, "", headers=auth("sk-root")).json["data"]}
    assert owners == {"alice", "bob"}


# ------------------------------------------------------------------------------ DELETE

def test_deleting_a_finished_job_removes_its_image_files(hung, tmp_path):
    job_id = submit_job(hung, {**FOX, "n": 2, "response_format": "url"})
    hung.broker.answer(job_id)
    shown = hung.client.simulate_get(f"/v1/jobs/{job_id}").json
    urls = [image["url"] for image in shown["images"]]
    assert len(stored_files(tmp_path / "images")) == 2
    deleted = hung.client.simulate_delete(f"/v1/jobs/{job_id}")
    assert deleted.status_code == 200
    assert deleted.json == {"id": job_id, "object": "image.job.deleted", "deleted": True}
    assert stored_files(tmp_path / "images") == []
    for url in urls:
        not_found(hung.client.simulate_get(path_of(url)))
    assert hung.client.simulate_get(f"/v1/jobs/{job_id}").status_code == 404
    assert hung.client.simulate_delete(f"/v1/jobs/{job_id}").status_code == 404


def test_deleting_a_job_another_frontend_follows_cancels_it_under_its_submitter(hung,
                                                                               tmp_path):
    other = make_history(tmp_path, frontend="other")
    job_id = open_elsewhere(other, submitter="owner-other")
    result = hung.client.simulate_delete(f"/v1/jobs/{job_id}")
    assert result.status_code == 200, result.text
    assert result.json["status"] == "cancelled"
    assert hung.broker.cancels == [(job_id, "owner-other")]
    record = hung.history.records.get(job_id)
    assert record is not None and record.status == "cancelled"
    assert hung.client.simulate_get(f"/v1/jobs/{job_id}").json["status"] == "cancelled"
    assert hung.broker.submitted == []


# ------------------------------------------------------------------------------ database down

def storage_unavailable(result: falcon.testing.Result) -> None:
    error = error_of(result, 503)
    assert (error["code"], error["type"]) == ("storage_unavailable", "server_error")
    assert int(result.headers["retry-after"]) > 0
    assert result.headers["x-should-retry"] == "true"
    for secret in ("secret-data", "jobs.db", "Traceback", "sqlite", "SQLite", "/tmp"):
        assert secret not in result.text


@pytest.mark.parametrize("method", ["get", "list", "create"])
def test_a_database_that_is_down_is_a_503_that_names_nothing(hung, monkeypatch, method):
    job_id = submit_job(hung)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseError(f"SQLite database {SECRET_PATH}: disk I/O error")

    monkeypatch.setattr(hung.history.records, method, down)
    requests = {
        "get": [("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                ("GET", f"/v1/jobs/{job_id}/events")],
        "list": [("GET", "/v1/jobs")],
        "create": [("POST", "/v1/jobs"), ("POST", GENERATIONS)],
    }[method]
    for verb, path in requests:
        storage_unavailable(hung.client.simulate_request(verb, path, json=FOX))
    assert len(hung.broker.submitted) == 1  # nothing new reached the broker


def test_a_locked_sqlite_database_is_a_503(hung, tmp_path):
    hung.history.records._db._conn.execute("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(str(tmp_path / "jobs.db"), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        storage_unavailable(hung.client.simulate_post("/v1/jobs", json=FOX))
        storage_unavailable(hung.client.simulate_get("/v1/jobs"))
        assert hung.broker.submitted == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    submit_job(hung)
