"""Images by URL through a real cluster: the openai client, LangChain, the stream, caching."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.cluster import REPO, Cluster, OutputLog, bound_http_port, cluster_env, wait_until
from tests.e2e.test_streaming import sse_events
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow

FILES = "/v1/images/files/"


def openai_client(url: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **options)


def test_url_answers_download_the_bytes_b64_json_gives(cluster: Cluster) -> None:
    client = openai_client(cluster.url)
    by_url = client.images.generate(model="tiny", prompt="a lighthouse", size="96x64", n=2,
                                    response_format="url", extra_body={"seed": 77})
    inline = client.images.generate(model="tiny", prompt="a lighthouse", size="96x64", n=2,
                                    response_format="b64_json", extra_body={"seed": 77})
    assert [d.b64_json for d in by_url.data] == [None, None]
    for url_item, b64_item in zip(by_url.data, inline.data, strict=True):
        assert url_item.url.startswith(f"{cluster.url}{FILES}")
        name = url_item.url.rsplit("/", 1)[1]
        assert len(name.split(".")[0]) == 32 and name.endswith(".png")  # 192 random bits
        downloaded = httpx.get(url_item.url, timeout=10)
        assert downloaded.status_code == 200
        assert downloaded.headers["content-type"] == "image/png"
        assert downloaded.content == base64.b64decode(b64_item.b64_json)
        assert Image.open(io.BytesIO(downloaded.content)).size == (96, 64)
    validate(by_url.model_dump(exclude_none=True), "ImagesResponse")


def test_an_image_url_is_cacheable_and_revalidates_with_its_etag(cluster: Cluster) -> None:
    url = generate_url(cluster)
    first = httpx.get(url, timeout=10)
    assert first.headers["etag"] and "immutable" in first.headers["cache-control"]
    assert "max-age=" in first.headers["cache-control"]
    again = httpx.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and again.content == b""
    head = httpx.head(url, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(first.content)


@pytest.mark.parametrize("name", [
    "x" * 32 + ".png", "../../etc/passwd", "..%2F..%2Fjobs.db", "jobs.db",
    "A" * 32 + ".gif", "%00" * 3, "é" * 32 + ".png",
])
def test_unknown_or_hostile_image_names_are_404s(cluster: Cluster, name: str) -> None:
    resp = httpx.get(f"{cluster.url}{FILES}{name}", timeout=10)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] in ("image_not_found", "not_found")


def test_a_deleted_job_takes_its_images_with_it(cluster: Cluster) -> None:
    with cluster.client() as http:
        created = http.post("/v1/images/generations", json={
            "prompt": "gone soon", "size": "64x64", "response_format": "url"}).json()
        url = created["data"][0]["url"]
        assert httpx.get(url, timeout=10).status_code == 200
        assert http.delete(f"/v1/jobs/{created['job_id']}").json()["deleted"] is True
        assert http.get(f"/v1/jobs/{created['job_id']}").status_code == 404
    assert httpx.get(url, timeout=10).status_code == 404


def test_streamed_completed_events_carry_the_url_beside_b64_json(cluster: Cluster) -> None:
    with httpx.stream("POST", f"{cluster.url}/v1/images/generations", timeout=60,
                      json={"prompt": "x", "size": "64x64", "n": 2, "stream": True,
                            "steps": 2, "seed": 5}) as resp:
        events = list(sse_events(resp.iter_lines()))
    completed = [d for e, d in events if e == "image_generation.completed"]
    assert len(completed) == 2
    for event in completed:
        assert httpx.get(event["url"], timeout=10).content == \
            base64.b64decode(event["b64_json"])


def test_the_jobs_api_reads_back_urls(cluster: Cluster) -> None:
    with cluster.client() as http:
        job = http.post("/v1/jobs", json={"prompt": "a kite", "size": "64x64",
                                          "seed": 9}).json()
        done = wait_for_job(http, job["id"])
    assert done["status"] == "succeeded"
    [image] = done["images"]
    assert image["seed"] == 9 and image["url"] == done["result"]["data"][0]["url"]
    assert httpx.get(image["url"], timeout=10).content.startswith(b"\x89PNG")


def test_an_idempotency_key_runs_a_generation_once(cluster: Cluster) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    body = {"prompt": "generated-exactly-once", "size": "64x64", "response_format": "url"}
    with cluster.client() as http:
        first = http.post("/v1/images/generations", json=body, headers=headers).json()
        again = http.post("/v1/images/generations", json=body, headers=headers).json()
        assert again["job_id"] == first["job_id"]
        assert again["data"][0]["url"] == first["data"][0]["url"]
        inline = http.post("/v1/images/generations", headers=headers,
                           json=body | {"response_format": "b64_json"})
        assert inline.status_code == 409
        assert inline.json()["error"]["param"] == "Idempotency-Key"
        listed = http.get("/v1/jobs", params={"q": "generated-exactly-once",
                                              "limit": 100}).json()["data"]
    assert [j["id"] for j in listed] == [first["job_id"]]


def test_an_idempotency_key_attaches_to_a_running_job(cluster: Cluster) -> None:
    headers = {"Idempotency-Key": "attach-1"}
    body = {"prompt": "attached-once", "size": "64x64", "steps": 30, "seed": 4}
    with cluster.client() as http:
        job = http.post("/v1/jobs", json=body, headers=headers)
        assert job.status_code == 202
        same = http.post("/v1/jobs", json=body, headers=headers)
        assert same.status_code == 200 and same.json()["id"] == job.json()["id"]
        # A retried generation with the same key waits for that job and answers with it.
        answer = http.post("/v1/images/generations", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["job_id"] == job.json()["id"]
        assert wait_for_job(http, job.json()["id"])["status"] == "succeeded"
        other = http.post("/v1/images/generations", headers=headers,
                          json=body | {"prompt": "another"})
        assert other.status_code == 409
        jobs = http.get("/v1/jobs", params={"q": "attached-once", "limit": 100}).json()["data"]
    assert [j["id"] for j in jobs] == [job.json()["id"]]  # one job ran, not three


def test_the_sdk_retrying_after_its_timeout_gets_the_one_job(cluster: Cluster) -> None:
    # The openai SDK retries a request that timed out; with an Idempotency-Key the job goes
    # on after the first attempt gave up, and a retry gets its images: one job, not three.
    attempts: list[httpx.Request] = []
    http_client = httpx.Client(event_hooks={"request": [attempts.append]})
    client = openai_client(cluster.url, timeout=1.0, http_client=http_client
                           ).with_options(max_retries=6)
    # Long enough to outlive the 1 s timeout on any machine: 512x512, 40 steps (a 256x256 job
    # took under a second once CPU workers stopped spinning).
    answer = client.images.generate(
        model="tiny", prompt="outlives-the-timeout", size="512x512", response_format="url",
        extra_body={"steps": 40, "seed": 31}, extra_headers={"Idempotency-Key": "sdk-1"})
    assert len(attempts) >= 2  # it did time out and retry
    assert {a.headers["idempotency-key"] for a in attempts} == {"sdk-1"}
    assert answer.data[0].model_extra["seed"] == 31
    assert png_size_of(answer.data[0].url) == (512, 512)
    with cluster.client() as http:
        jobs = http.get("/v1/jobs", params={"q": "outlives-the-timeout"}).json()["data"]
    assert [(j["status"], j["seeds"]) for j in jobs] == [("succeeded", [31])]


# ------------------------------------------------------------------ a frontend with options

@pytest.fixture
def frontend(cluster: Cluster, cache_dir: Path, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start frontends with options of their own on the shared cluster's broker."""
    processes: list[subprocess.Popen] = []
    logs: list[OutputLog] = []

    def start(*options: str) -> str:
        process = subprocess.Popen(
            [sys.executable, "-m", "http_frontend", "--broker", cluster.clients, "--port", "0",
             "--frontend-id", f"url-frontend-{len(processes)}",
             "--data-dir", str(tmp_path / f"data-{len(processes)}"), *options],
            cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        logs.append(OutputLog(process))
        url = f"http://127.0.0.1:{bound_http_port(logs[-1])}"
        wait_until(lambda: ready(url), 30, "the frontend to see the broker", logs[-1].text)
        return url
    try:
        yield start
    finally:
        for process, log in zip(processes, logs, strict=True):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                raise AssertionError(f"the frontend did not stop:\n{log.text()}") from None


@pytest.mark.filterwarnings("ignore:`langchain-community` is being sunset")
def test_langchain_dalle_wrapper_returns_a_url_that_works(frontend) -> None:
    # LangChain never sends response_format and reads data[0].url: the operator makes url
    # the default.
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    url = frontend("--default-response-format", "url")
    wrapper = DallEAPIWrapper(model="tiny", size="64x64", n=1, api_key="unused",
                              base_url=f"{url}/v1", max_retries=0)
    image_url = wrapper.run("a watercolour fox")
    assert image_url.startswith(f"{url}{FILES}")
    image = httpx.get(image_url, timeout=10)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_default_url_answers_behind_a_public_url_need_no_key(frontend, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-url-test name=tester\n")
    url_frontend = frontend("--default-response-format", "url", "--api-keys-file", str(keys),
                            "--public-url", "https://images.example.com/base/")
    client = openai.OpenAI(base_url=f"{url_frontend}/v1", api_key="sk-url-test",
                           max_retries=0)
    answer = client.images.generate(model="tiny", prompt="a boat", size="64x64")
    url = answer.data[0].url
    assert url.startswith("https://images.example.com/base/v1/images/files/")
    # The proxy's URL maps to this frontend's path; fetched without any key.
    local = f"{url_frontend}{FILES}{url.rsplit('/', 1)[1]}"
    assert httpx.get(local, timeout=10).content.startswith(b"\x89PNG")
    listed = httpx.get(f"{url_frontend}/v1/jobs", timeout=10,
                       headers={"Authorization": "Bearer sk-url-test"}).json()
    assert listed["data"][0]["owner"] == "tester"
    assert "sk-url-test" not in str(listed)


# ------------------------------------------------------------------ helpers

def png_size_of(url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(httpx.get(url, timeout=10).content)).size


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def generate_url(cluster: Cluster) -> str:
    with cluster.client() as http:
        resp = http.post("/v1/images/generations", json={
            "prompt": "cache me", "size": "64x64", "response_format": "url"})
    assert resp.status_code == 200, resp.text
    return resp.json()["data"][0]["url"]


def wait_for_job(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")

