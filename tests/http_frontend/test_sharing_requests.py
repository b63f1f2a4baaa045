"""Attacks on sharing from the HTTP side: keys-file lines that say two things at once, and
what a caller without an admin key (or without any key) learns of the other identities."""

from __future__ import annotations

from pathlib import Path

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import protocol
from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import load_keys, parse_key_line
from tests.http_frontend.test_app import FakeBroker


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("line", [
    "sk-secret-key name=a weight=1 weight=1000",
    "sk-secret-key name=a max_queued=20 max_queued=2000",
    "sk-secret-key name=a class=batch class=interactive",
    "sk-secret-key name=a name=b",
])
def test_an_attribute_given_twice_is_refused_not_taken_silently(line: str) -> None:
    with pytest.raises(ValueError, match=r"word [34]: \w+= is given twice") as caught:
        parse_key_line(line)
    assert "sk-" not in str(caught.value)


def test_admin_twice_and_odd_spacing_are_fine() -> None:
    key = parse_key_line("\tsk-secret-key \t name=a\u00a0 admin   admin weight=2  # note")
    assert key is not None and key.name == "a" and key.admin and key.share.weight == 2.0


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b9", "\u0663"])
def test_limits_take_ascii_digits_only(tmp_path: Path, value: str) -> None:
    """``"²".isdigit()`` is True and ``int("²")`` fails: the line must be refused with the
    usual message, not int()'s."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"sk-secret-key name=a max_queued={value}\n")
    with pytest.raises(ValueError, match="line 1: word 3: max_queued=N takes a whole number"):
        load_keys(None, str(keys_file))


def test_class_and_weight_empty_are_refused() -> None:
    for word in ("class=", "weight=", "max_running="):
        with pytest.raises(ValueError, match="word 3"):
            parse_key_line(f"sk-secret-key name=a {word}")


def keyed_client(tmp_path: Path) -> falcon.testing.TestClient:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-alice name=alice\nsk-ops name=ops admin\n")
    broker = FakeBroker()
    broker.identities = [
        protocol.IdentityLoad(model="tiny", identity="bob-the-secret-customer", queued=5,
                              running=1),
        protocol.IdentityLoad(model="tiny", identity="alice", queued=2, running=0)]
    config = FrontendConfig(api_keys=tuple(load_keys(None, str(keys_file))))
    return falcon.testing.TestClient(create_app(config, broker))


def test_a_plain_key_learns_no_other_name_from_the_v1_routes(tmp_path: Path) -> None:
    client = keyed_client(tmp_path)
    for path in ("/v1/cluster", "/v1/models", "/v1/jobs", "/v1/loras"):
        result = client.simulate_get(path, headers=bearer("sk-alice"))
        assert "bob-the-secret-customer" not in result.text, path


def test_metrics_open_to_anyone_do_not_name_the_identities_v1_cluster_hides(
        tmp_path: Path) -> None:
    client = keyed_client(tmp_path)
    assert client.simulate_get("/v1/cluster").status_code == 401  # no key: nothing
    result = client.simulate_get("/metrics")  # no key, no metrics token configured
    assert result.status_code == 200
    names = {sample.labels.get("identity")
             for family in text_string_to_metric_families(result.text)
             for sample in family.samples if family.name == "dc_identity_jobs"}
    assert "bob-the-secret-customer" not in names
