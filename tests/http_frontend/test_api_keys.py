"""API keys and CORS on the Falcon app, with a fake broker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import falcon.testing
import pytest

from broker import protocol
from broker.protocol import Quota
from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import Share, default_name, load_keys
from tests.http_frontend.test_app import FakeBroker
from tests.openapi_spec import validate

KEYS = ("sk-first-key", "sk-second-key")


@pytest.fixture
def client() -> falcon.testing.TestClient:
    config = FrontendConfig(api_keys=KEYS, cors_origins=("https://studio.example",))
    return falcon.testing.TestClient(create_app(config, FakeBroker()))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [
    {}, bearer("sk-wrong"), {"Authorization": "sk-first-key"}, {"Authorization": "Basic eDp5"},
    bearer(""), bearer("sk-first-key-and-more"),
])
def test_v1_needs_a_valid_key(client, headers) -> None:
    result = client.simulate_get("/v1/models", headers=headers)
    assert result.status_code == 401
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["code"] == "invalid_api_key"
    assert result.headers["www-authenticate"] == "Bearer"
    assert result.headers["x-should-retry"] == "false"
    assert "sk-" not in result.text  # neither the keys nor what was sent


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(client, key) -> None:
    assert client.simulate_get("/v1/models", headers=bearer(key)).status_code == 200
    resp = client.simulate_post("/v1/images/generations", headers=bearer(key),
                                json={"prompt": "x", "size": "64x64"})
    assert resp.status_code == 200


def test_scheme_is_case_insensitive(client) -> None:
    headers = {"Authorization": f"bearer {KEYS[0]}"}
    assert client.simulate_get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/static/app.js"])
def test_health_and_the_ui_stay_open(client, path) -> None:
    assert client.simulate_get(path).status_code == 200


def test_cors_only_for_configured_origins(client) -> None:
    allowed = client.simulate_get("/v1/models", headers={
        **bearer(KEYS[0]), "Origin": "https://studio.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://studio.example"
    other = client.simulate_get("/v1/models", headers={
        **bearer(KEYS[0]), "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.simulate_options("/v1/images/generations", headers={
        "Origin": "https://studio.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200  # no key needed to ask
    assert preflight.headers["access-control-allow-origin"] == "https://studio.example"


def test_no_cors_and_no_keys_by_default() -> None:
    client = falcon.testing.TestClient(create_app(FrontendConfig(), FakeBroker()))
    resp = client.simulate_get("/v1/models", headers={"Origin": "https://studio.example"})
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers


def test_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nsk-a\n\n  sk-b  # ops\n")
    keys = load_keys(["sk-c", " "], str(keys_file))
    assert [k.secret for k in keys] == ["sk-c", "sk-a", "sk-b"]
    assert not any(k.admin for k in keys)
    # A key given without a name gets a stable one that does not show the key.
    assert keys[1].name == default_name("sk-a") and "sk-a" not in keys[1].name
    assert "sk-" not in repr(keys)


def test_keys_file_attributes(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-alice name=alice\nsk-root name=ops admin  # sees all\n"
                         "sk-bob admin\n")
    keys = load_keys(None, str(keys_file))
    assert [(k.secret, k.name, k.admin) for k in keys] == [
        ("sk-alice", "alice", False), ("sk-root", "ops", True),
        ("sk-bob", default_name("sk-bob"), True)]


@pytest.mark.parametrize("line", ["sk-a name=", "sk-a name=has/slash", "sk-a sk-b",
                                  "sk-a admin=yes", "sk-a name=" + "x" * 65])
def test_keys_file_refuses_unknown_attributes_without_showing_them(tmp_path, line) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# first\n{line}\n")
    with pytest.raises(ValueError, match="line 2: word 2") as caught:
        load_keys(None, str(keys_file))
    assert "sk-" not in str(caught.value)


def test_two_keys_with_one_name_are_refused(tmp_path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-a name=ops\nsk-b name=ops\n")
    with pytest.raises(ValueError, match="same name"):
        load_keys(None, str(keys_file))


def test_config_repr_hides_keys() -> None:
    assert "sk-" not in repr(FrontendConfig(api_keys=KEYS))


def test_keys_file_weights(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-alice name=alice weight=3\nsk-bob name=bob weight=0.5 admin\n"
                         "sk-carol name=carol\nsk-plain\n")
    keys = load_keys(None, str(keys_file))
    assert [(k.name, k.admin, k.share.weight) for k in keys] == [
        ("alice", False, 3.0), ("bob", True, 0.5), ("carol", False, 1.0),
        (default_name("sk-plain"), False, 1.0)]


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "1001", "", "x", "1e400"])
def test_keys_file_refuses_bad_weights_without_showing_the_key(tmp_path, weight) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"sk-ok\nsk-secret-key name=a weight={weight}\n")
    with pytest.raises(ValueError, match="line 2: word 3: weight=N takes a number") as caught:
        load_keys(None, str(keys_file))
    assert "sk-" not in str(caught.value)


@pytest.mark.parametrize(("headers", "body", "tenant", "weight"), [
    (bearer("sk-heavy"), {"user": "someone-else"}, "heavy", 3.0),  # the key, not `user`
    (bearer("sk-plain"), {}, default_name("sk-plain"), 1.0),
])
def test_jobs_are_queued_for_the_keys_identity_with_its_weight(
        tmp_path, headers, body, tenant, weight) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-heavy name=heavy weight=3\nsk-plain\n")
    broker = FakeBroker()
    config = FrontendConfig(api_keys=tuple(load_keys(None, str(keys_file))))
    client = falcon.testing.TestClient(create_app(config, broker))
    resp = client.simulate_post("/v1/images/generations", headers=headers,
                                json={"prompt": "a fox", "size": "64x64", **body})
    assert resp.status_code == 200, resp.text
    (job,) = broker.submitted
    assert (job.tenant, job.weight) == (tenant, weight)


@pytest.mark.parametrize(("body", "tenant"), [
    ({"user": "alice"}, "alice"), ({}, None),
    # Longer than the protocol's ids: a digest of it stands for it.
    ({"user": "u" * 200}, "user-" + hashlib.sha256(b"u" * 200).hexdigest()[:40]),
])
def test_without_keys_the_identity_is_the_requests_user(body, tenant) -> None:
    broker = FakeBroker()
    client = falcon.testing.TestClient(create_app(FrontendConfig(), broker))
    resp = client.simulate_post("/v1/images/generations",
                                json={"prompt": "a fox", "size": "64x64", **body})
    assert resp.status_code == 200, resp.text
    (job,) = broker.submitted
    assert (job.tenant, job.weight) == (tenant, 1.0)


def test_keys_file_classes_and_limits_reach_the_job(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-bulk name=bulk class=batch max_queued=20 max_running=2 "
                         "per_minute=30 weight=0.5\nsk-plain\n")
    keys = load_keys(None, str(keys_file))
    assert keys[0].share == Share(weight=0.5, priority="batch",
                                  quota=Quota(max_queued=20, max_running=2, per_minute=30))
    assert keys[1].share == Share()  # interactive, weight 1, no limits
    broker = FakeBroker()
    client = falcon.testing.TestClient(create_app(FrontendConfig(api_keys=tuple(keys)), broker))
    resp = client.simulate_post("/v1/images/generations", headers=bearer("sk-bulk"),
                                json={"prompt": "a fox", "size": "64x64"})
    assert resp.status_code == 200, resp.text
    (job,) = broker.submitted
    assert (job.priority, job.quota) == ("batch", Quota(max_queued=20, max_running=2,
                                                        per_minute=30))
    assert protocol.JobSpec.from_wire(job.to_wire()) == job  # it travels as it is


@pytest.mark.parametrize(("word", "says"), [
    ("class=urgent", "class= takes interactive or batch"),
    ("max_queued=0", "max_queued=N takes a whole number from 1"),
    ("max_running=-1", "max_running=N takes a whole number"),
    ("per_minute=2.5", "per_minute=N takes a whole number"),
    ("per_minute=99999999", "per_minute=N takes a whole number"),
    ("priority=batch", "is not a key attribute"),
])
def test_keys_file_refuses_bad_classes_and_limits_without_showing_the_key(
        tmp_path: Path, word: str, says: str) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"sk-secret-key name=a {word}\n")
    with pytest.raises(ValueError, match=f"line 1: word 3.*{says}") as caught:
        load_keys(None, str(keys_file))
    assert "sk-" not in str(caught.value)


def test_the_cluster_view_shows_a_key_its_own_line_and_an_admin_every_line(
        tmp_path: Path) -> None:
    """Identities by name, never by key; a plain key never learns the other names."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-alice name=alice\nsk-ops name=ops admin\n")
    broker = FakeBroker()
    broker.identities = [
        protocol.IdentityLoad(model="tiny", identity="bob", queued=5, running=1),
        protocol.IdentityLoad(model="tiny", identity="alice", queued=2, running=0)]
    config = FrontendConfig(api_keys=tuple(load_keys(None, str(keys_file))))
    client = falcon.testing.TestClient(create_app(config, broker))
    mine = client.simulate_get("/v1/cluster", headers=bearer("sk-alice")).json["identities"]
    assert mine == [{"model": "tiny", "identity": "alice", "queued": 2, "running": 0}]
    every = client.simulate_get("/v1/cluster", headers=bearer("sk-ops")).json["identities"]
    assert [line["identity"] for line in every] == ["bob", "alice"]
    assert "sk-" not in client.simulate_get("/v1/cluster", headers=bearer("sk-ops")).text
