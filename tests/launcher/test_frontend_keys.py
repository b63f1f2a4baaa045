"""launch.py and the frontend's CURVE keys: `keys --frontend`, and a single node with --curve
wiring its own frontend's pair (written when a keys folder predates frontend keys)."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

import launch
from broker.auth import create_keys, load_public
from http_frontend.__main__ import load_broker_keys


def keys_command(*argv: str) -> int:
    return launch.make_keys(launch.parse_args(["keys", *argv]))


def names(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.key"))


def test_keys_without_names_write_the_local_pairs_and_a_worker(tmp_path: Path) -> None:
    assert keys_command(str(tmp_path / "k")) == 0
    assert names(tmp_path / "k" / "workers") == ["local", "worker-1"]
    assert names(tmp_path / "k" / "frontends") == ["local"]


def test_keys_write_only_the_pairs_named(tmp_path: Path) -> None:
    assert keys_command(str(tmp_path / "k"), "--frontend", "web-1", "--frontend", "web-2") == 0
    assert names(tmp_path / "k" / "frontends") == ["web-1", "web-2"]
    assert names(tmp_path / "k" / "workers") == []
    secret = tmp_path / "k" / "frontends" / "web-1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert keys_command(str(tmp_path / "k"), "--frontend", "web-1") == 2  # never overwritten


def test_the_frontend_of_a_curve_cluster_gets_its_local_pair(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "visible_gpus", lambda limit=None: [])
    _, worker, frontend = launch.cluster_specs(launch.parse_args(["--curve", "/keys"]))
    argv = frontend.argv
    assert argv[argv.index("--broker-key") + 1] == "/keys/broker.key"
    assert argv[argv.index("--key") + 1] == "/keys/frontends/local.key_secret"
    assert worker.argv[worker.argv.index("--key") + 1] == "/keys/workers/local.key_secret"
    plain = launch.cluster_specs(launch.parse_args([]))[-1].argv
    assert "--key" not in plain and "--broker-key" not in plain


def test_a_keys_folder_without_frontend_keys_gets_the_local_pair_once(tmp_path: Path,
                                                                       capsys) -> None:
    create_keys(tmp_path, ["local"])  # as made before frontends had keys
    args = argparse.Namespace(curve=str(tmp_path))
    launch.ensure_local_frontend_key(args)
    public = load_public(tmp_path / "frontends" / "local.key")
    assert "Wrote the key pair of this host's frontend" in capsys.readouterr().out
    launch.ensure_local_frontend_key(args)
    assert load_public(tmp_path / "frontends" / "local.key") == public  # kept, not replaced
    assert capsys.readouterr().out == ""


def test_no_local_frontend_pair_is_made_without_the_broker_key(tmp_path: Path) -> None:
    # The broker refuses to start and says why; a broker pair made here would not be the
    # one every worker holds.
    launch.ensure_local_frontend_key(argparse.Namespace(curve=str(tmp_path / "missing")))
    assert not (tmp_path / "missing").exists()
    launch.ensure_local_frontend_key(argparse.Namespace(curve=None))


def test_the_frontend_takes_both_key_files_or_neither(tmp_path: Path) -> None:
    create_keys(tmp_path, [], frontends=["web"])
    with pytest.raises(ValueError, match="go together"):
        load_broker_keys(str(tmp_path / "broker.key"), None)
    assert load_broker_keys(None, None) is None
    keys = load_broker_keys(str(tmp_path / "broker.key"),
                            str(tmp_path / "frontends" / "web.key_secret"))
    assert keys is not None and keys.public == load_public(tmp_path / "frontends" / "web.key")
    (tmp_path / "frontends" / "web.key_secret").chmod(0o644)
    with pytest.raises(PermissionError):
        load_broker_keys(str(tmp_path / "broker.key"),
                         str(tmp_path / "frontends" / "web.key_secret"))
