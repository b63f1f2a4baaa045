"""API keys and CORS on the Falcon app, with a fake broker."""

from __future__ import annotations

from pathlib import Path

import falcon.testing
import pytest

from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import load_keys
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
    assert load_keys(["sk-c", " "], str(keys_file)) == ["sk-c", "sk-a", "sk-b"]


def test_config_repr_hides_keys() -> None:
    assert "sk-" not in repr(FrontendConfig(api_keys=KEYS))
