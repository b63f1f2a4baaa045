"""Quotas on a real cluster: an API key's limits give 429s exactly at the limit, in OpenAI's
shape with Retry-After, and recover; enforced by the broker, so two frontends against one
broker share each key's count (broker/quotas.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster import (
    HEARTBEAT,
    REPO,
    Cluster,
    OutputLog,
    bound_http_port,
    cluster_env,
    wait_until,
)

pytestmark = pytest.mark.slow

KEYS = """\
sk-queue-key name=queuer max_queued=2
sk-rate-key name=rater per_minute=3
sk-bulk-key name=bulk
"""
# Two long jobs fill the one worker (max batch 1: it holds two), so every job the limited keys
# send meanwhile stays queued: what max_queued counts. Seconds, against the test's few requests.
BLOCKER = {"prompt": "a long one", "size": "512x512", "steps": 50}
SMALL = {"prompt": "a quota", "size": "64x64", "steps": 1}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def two_frontends(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[Cluster, str]]:
    """A one-worker cluster with the keys file, and a second frontend on its broker."""
    keys_file = tmp_path_factory.mktemp("quota-keys") / "keys"
    keys_file.write_text(KEYS)
    cluster = Cluster(cache_dir, workers=1,
                      extra=["--api-keys-file", str(keys_file), "--max-batch", "1"])
    second = None
    try:
        cluster.wait_ready()
        second = subprocess.Popen(
            [sys.executable, "-m", "http_frontend", "--broker", cluster.clients, "--port", "0",
             "--heartbeat", str(HEARTBEAT), "--api-keys-file", str(keys_file)],
            cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        log = OutputLog(second)
        url = f"http://127.0.0.1:{bound_http_port(log)}"
        wait_until(lambda: _serves(url), 60, "the second frontend to see a worker", log.text)
        yield cluster, url
    finally:
        if second is not None:
            second.terminate()
            second.wait(15)
        cluster.stop()


def _serves(url: str) -> bool:
    try:
        models = httpx.get(f"{url}/v1/models", headers=bearer("sk-bulk-key"), timeout=5)
    except httpx.HTTPError:
        return False
    return models.status_code == 200 and bool(models.json()["data"])


def api_url(http: httpx.Client) -> str:
    """The openai client's base URL for a frontend (it must not retry: a 429 is the point)."""
    return f"{str(http.base_url).rstrip('/')}/v1"


def submit(http: httpx.Client, key: str, body: dict[str, object]) -> httpx.Response:
    return http.post("/v1/jobs", json=body, headers=bearer(key))


def assert_quota_429(resp: httpx.Response, limit: str) -> int:
    """Check a quota refusal's shape; return its Retry-After."""
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "rate_limit_error", "quota_exceeded", None)
    assert limit in error["message"], error
    retry_after = int(resp.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


def test_quotas_count_across_frontends_refuse_at_the_limit_and_recover(
        two_frontends: tuple[Cluster, str]) -> None:
    cluster, second_url = two_frontends
    with cluster.client(timeout=60) as one, httpx.Client(base_url=second_url,
                                                         timeout=60) as two:
        blockers = [submit(one, "sk-bulk-key", {**BLOCKER, "seed": i}) for i in range(2)]
        assert [b.status_code for b in blockers] == [202, 202], [b.text for b in blockers]
        wait_until(lambda: not one.get("/v1/cluster", headers=bearer("sk-bulk-key"))
                   .json()["queues"], 30, "the worker to hold both long jobs")
        try:
            check_max_queued(one, two)
            check_per_minute(one, two)
        finally:
            for job in blockers:
                one.post(f"/v1/jobs/{job.json()['id']}/cancel",
                         headers=bearer("sk-bulk-key"))


def check_max_queued(one: httpx.Client, two: httpx.Client) -> None:
    # max_queued=2 counts jobs sent through either frontend: one each, then both refuse.
    first, second = submit(one, "sk-queue-key", SMALL), submit(two, "sk-queue-key", SMALL)
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    for http in (one, two):
        refused = submit(http, "sk-queue-key", SMALL)
        assert assert_quota_429(refused, "max_queued=2") == 5  # the frontend's hint
        assert refused.json()["error"]["message"].startswith(
            "queuer has 2 jobs queued, its limit (max_queued=2)")
    # /v1/cluster shows the key its own line, by name, from either frontend.
    mine = [{"model": "tiny", "identity": "queuer", "queued": 2, "running": 0}]
    for http in (one, two):
        wait_until(lambda http=http: http.get("/v1/cluster", headers=bearer("sk-queue-key"))
                   .json()["identities"] == mine, 10, "the key's own line in /v1/cluster")
    streamed = two.post("/v1/images/generations", json={**SMALL, "stream": True},
                        headers=bearer("sk-queue-key"))
    assert_quota_429(streamed, "max_queued")
    waited = one.post("/v1/images/generations", json=SMALL, headers=bearer("sk-queue-key"))
    assert_quota_429(waited, "max_queued")
    sdk = openai.OpenAI(api_key="sk-queue-key", base_url=api_url(one), max_retries=0)
    with pytest.raises(openai.RateLimitError, match="max_queued=2") as caught:
        sdk.images.generate(prompt="a quota", size="256x256")
    assert caught.value.response.headers["Retry-After"] == "5"
    # The refusals left no record behind: only the two jobs taken are listed.
    listed = {job["id"] for job in
              one.get("/v1/jobs", headers=bearer("sk-queue-key")).json()["data"]}
    assert listed == {first.json()["id"]}
    # A cancelled job frees its place, on whichever frontend it was sent.
    cancelled = one.post(f"/v1/jobs/{first.json()['id']}/cancel",
                         headers=bearer("sk-queue-key"))
    assert cancelled.status_code == 200, cancelled.text
    again = submit(two, "sk-queue-key", SMALL)
    assert again.status_code == 202, again.text
    assert_quota_429(submit(one, "sk-queue-key", SMALL), "max_queued")
    for http, job in ((two, second), (two, again)):
        http.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=bearer("sk-queue-key"))


def check_per_minute(one: httpx.Client, two: httpx.Client) -> None:
    # per_minute=3: three at once, through both frontends; the fourth waits for a token.
    taken = [submit(http, "sk-rate-key", SMALL) for http in (one, two, one)]
    assert [r.status_code for r in taken] == [202, 202, 202], [r.text for r in taken]
    for http in (two, one):
        retry_after = assert_quota_429(submit(http, "sk-rate-key", SMALL), "per_minute=3")
        assert 1 <= retry_after <= 20  # a token every 20 s: the broker's own count
    sdk = openai.OpenAI(api_key="sk-rate-key", base_url=api_url(two), max_retries=0)
    with pytest.raises(openai.RateLimitError, match="per_minute=3"):
        sdk.images.generate(prompt="a quota", size="256x256")
    for job in taken:
        one.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=bearer("sk-rate-key"))
