"""CURVE on the broker's client endpoint, end to end: a single-node `launch.py --curve` wires
its own frontend's keys, and frontends (or bare sockets) without an admitted frontend key get
nothing, while the broker logs them and carries on."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zmq

from broker import protocol
from broker.auth import load_public, load_secret
from broker.protocol import MsgType
from tests.broker.fakes import make_spec
from tests.cluster import (
    REPO,
    Cluster,
    OutputLog,
    bound_http_port,
    cluster_env,
    wait_until,
)

pytestmark = pytest.mark.slow

# Seconds of work even on a fast CPU: it still runs when the attacks are over.
BUSY = {"prompt": "keeps the worker busy", "size": "768x768", "steps": 50}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys as a folder made before frontends had keys of their own: workers only."""
    folder = tmp_path_factory.mktemp("client-curve") / "keys"
    made = subprocess.run([sys.executable, "launch.py", "keys", str(folder), "--worker",
                           "local"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert not list((folder / "frontends").glob("*.key"))
    return folder


@pytest.fixture(scope="module")
def cluster(cache_dir: Path, keys: Path) -> Iterator[Cluster]:
    running = Cluster(cache_dir, workers=1, extra=["--curve", str(keys)])
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_launch_wires_its_own_frontend_key(cluster: Cluster, keys: Path) -> None:
    text = cluster.log.text()
    assert "Wrote the key pair of this host's frontend" in text
    assert (keys / "frontends" / "local.key").exists()
    assert "frontend allow-list: 1 key(s)" in text and "CURVE self-test passed" in text
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    made = client.images.generate(model="tiny", prompt="over curve", size="64x64",
                                  extra_body={"seed": 8, "steps": 2})
    assert made.data[0].model_extra["seed"] == 8 and made.data[0].b64_json


def frontend(cluster: Cluster, *options: str) -> tuple[subprocess.Popen, OutputLog, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "http_frontend", "--broker", cluster.clients, "--port", "0",
         "--heartbeat", "0.5", *options], cwd=REPO, env=cluster_env(cluster.cache_dir),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = OutputLog(process)
    return process, log, f"http://127.0.0.1:{bound_http_port(log)}"


def test_frontends_without_an_admitted_frontend_key_get_nothing(
        cluster: Cluster, keys: Path, tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "launch.py", "keys", str(tmp_path / "elsewhere"),
                           "--frontend", "rogue"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    broker_key = str(keys / "broker.key")
    rogue_key = tmp_path / "elsewhere" / "frontends" / "rogue.key_secret"
    attackers = {
        "a key not on the list": ["--broker-key", broker_key, "--key", str(rogue_key)],
        "a worker's key": ["--broker-key", broker_key,
                           "--key", str(keys / "workers" / "local.key_secret")],
        "no CURVE at all": [],
    }
    expected = {"a key not on the list": "is not on its allow-list",
                "a worker's key": "is not on its allow-list",
                "no CURVE at all": "requires CURVE: pass --broker-key and --key"}
    started = {name: frontend(cluster, *options) for name, options in attackers.items()}
    try:
        for name, (_, log, url) in started.items():
            log.wait_for(expected[name], 30)
            ready = httpx.get(f"{url}/readyz", timeout=10)
            assert ready.status_code == 503, (name, ready.text)
            answer = httpx.post(f"{url}/v1/images/generations", timeout=30,
                                json={"prompt": "x", "size": "64x64", "steps": 2})
            assert answer.status_code == 503, (name, answer.text)
            assert answer.json()["error"]["code"] == "broker_unavailable"
        rogue_public = load_public(tmp_path / "elsewhere" / "frontends" / "rogue.key")
        wait_until(lambda: f"refused frontend key {rogue_public.decode()}" in cluster.log.text()
                   and "it is worker key 'workers/local'" in cluster.log.text()
                   and "refused a frontend connection on" in cluster.log.text(), 30,
                   "the broker to log each refusal", cluster.log.text)
    finally:
        for process, _, _ in started.values():
            process.send_signal(signal.SIGTERM)
        for process, _, _ in started.values():
            process.wait(15)
    # The broker carried on: the admitted frontend still serves.
    assert httpx.get(f"{cluster.url}/readyz", timeout=10).status_code == 200
    assert len(cluster.pid_of("broker")) == 1
    assert "broker exited" not in cluster.log.text()


def dealer(ctx: zmq.Context, endpoint: str, curve: tuple[bytes, bytes, bytes] | None
           ) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve[0])
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[1])
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve[2])
    sock.connect(endpoint)
    return sock


def test_a_peer_without_a_frontend_key_cannot_cancel_or_steal_a_job(
        cluster: Cluster, keys: Path) -> None:
    """What a plain client endpoint let any peer do: cancel a job, or re-submit its id to
    take its answers, naming the frontend's owner id (HOST:PORT by default)."""
    http = httpx.Client(base_url=cluster.url, timeout=60)
    job_id = http.post("/v1/jobs", json={**BUSY, "seed": 4}).json()["id"]
    wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 60,
               "the job to run")
    owner = f"{socket.gethostname()}:{cluster.port}"
    server = load_public(keys / "broker.key")
    ctx = zmq.Context()
    try:
        peers = [dealer(ctx, cluster.clients, None),
                 dealer(ctx, cluster.clients, (server, *zmq.curve_keypair())),
                 dealer(ctx, cluster.clients,
                        (server, *load_secret(keys / "workers" / "local.key_secret")))]
        for peer in peers:
            peer.send_multipart(protocol.encode(MsgType.CANCEL, {"job_id": job_id,
                                                                  "owner": owner}))
            peer.send_multipart(protocol.submit(make_spec(job_id), owner))
            peer.send_multipart(protocol.encode(MsgType.STATUS))
        for peer in peers:
            assert not peer.poll(1000), "a peer without a frontend key got an answer"
    finally:
        ctx.destroy(linger=0)
    # Untouched by all that: it runs on, and only its own frontend's cancel ends it.
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    wait_until(lambda: not any(w["running"] for w in cluster.cluster_status()["workers"]), 30,
               "the worker to stop the job")
