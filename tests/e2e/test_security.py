"""A secured single-node cluster: CURVE workers, API keys, a host joining with its key."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster import REPO, Cluster, OutputLog, cluster_env, descendants, free_port

pytestmark = pytest.mark.slow


def test_curve_cluster_with_api_keys_and_a_joining_host(cache_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "launch.py", "keys", str(keys), "--worker", "local",
                           "--worker", "gpu-host-1"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("# test keys\nsk-test-one\nsk-test-two\n")
    workers_port = free_port()
    cluster = Cluster(cache_dir, workers=1, extra=[
        "--curve", str(keys), "--workers", f"tcp://0.0.0.0:{workers_port}",
        "--api-keys-file", str(keys_file)])
    cluster.workers_endpoint = f"tcp://127.0.0.1:{workers_port}"
    joiner = None
    try:
        cluster.wait_ready()
        assert "CURVE self-test passed" in cluster.log.text()
        auth = {"Authorization": "Bearer sk-test-two"}
        assert httpx.get(f"{cluster.url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{cluster.url}/v1/models", headers=auth, timeout=10).status_code == 200
        assert httpx.get(f"{cluster.url}/healthz", timeout=10).status_code == 200

        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="sk-test-one",
                               max_retries=0)
        assert client.images.generate(model="tiny", prompt="x", size="64x64").data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="sk-wrong",
                          max_retries=0).images.generate(model="tiny", prompt="x")

        joiner = subprocess.Popen(
            [sys.executable, "launch.py", "worker", "--broker", cluster.workers_endpoint,
             "--model", "tiny", "--device", "cpu", "--heartbeat", "0.5",
             "--broker-key", str(keys / "broker.key"),
             "--key", str(keys / "workers" / "gpu-host-1.key_secret")],
            cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        joiner_log = OutputLog(joiner)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = httpx.get(f"{cluster.url}/v1/cluster", headers=auth, timeout=10).json()
            if len(workers["workers"]) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the CURVE worker never joined:\n{joiner_log.text()}")
        joined = {int(w["worker_id"].split("-")[-2]) for w in workers["workers"]}
        assert joined & descendants(joiner.pid)
        # Nothing secret in what the API shows.
        for secret_file in keys.rglob("*.key_secret"):
            secret = secret_file.read_text().split('secret-key = "')[1].split('"')[0]
            assert secret not in str(workers)
            assert secret not in cluster.log.text()
    finally:
        if joiner is not None:
            joiner.send_signal(signal.SIGTERM)
            joiner.wait(15)
        cluster.stop()
