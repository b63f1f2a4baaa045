"""A whole cluster configured partly by its environment: launch.py reads the variables, its
processes read them again (they inherit its environment), and a secret from a file never
reaches a command line."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.cluster import Cluster


def test_a_cluster_takes_its_settings_and_secrets_from_the_environment(
        cache_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "api-keys").write_text("sk-env-1\nsk-env-2\n")  # bare keys, one a line
    cluster = Cluster(cache_dir, workers=1, env={
        "DC_FRONTEND_API_KEY_FILE": str(tmp_path / "api-keys"),
        "DC_WORKER_WORKER_ID": "from-the-environment",
        "DC_WORKER_MODEL": "tiny", "DC_LAUNCH_READY_TIMEOUT": "300"})
    try:
        cluster.wait_ready()
        key = {"Authorization": "Bearer sk-env-2"}
        assert httpx.get(f"{cluster.url}/v1/models", timeout=10).status_code == 401
        answer = httpx.post(f"{cluster.url}/v1/images/generations", headers=key, timeout=120,
                            json={"prompt": "a lighthouse", "size": "64x64", "seed": 1})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["model"], answer.json()["worker_id"]) == (
            "tiny", "from-the-environment")
        for module in ("http_frontend", "gpu_worker"):
            pids = cluster.pid_of(module)
            assert pids, module
            for pid in pids:
                command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert b"sk-env" not in command_line and b"api-keys" not in command_line
    finally:
        cluster.stop()
