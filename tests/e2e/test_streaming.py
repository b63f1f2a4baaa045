"""Streaming against a real cluster: OpenAI's image stream, and the jobs API's events."""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from tests.cluster import Cluster, wait_until
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs from a text/event-stream, skipping comments."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def idle(cluster: Cluster, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(w["running"] for w in cluster.cluster_status()["workers"]):
            return True
        time.sleep(0.1)
    return False


def test_openai_client_streams_partial_images_then_the_image(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    stream = client.images.generate(model="tiny", prompt="a lighthouse", size="128x96",
                                    stream=True, partial_images=2,
                                    extra_body={"steps": 6, "seed": 3})
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = events[-1]
    assert image(final.b64_json).size == (128, 96)
    assert final.output_format == "png" and final.size == "auto"
    assert final.model_extra["seed"] == 3
    # The streamed image is the image: the same request without streaming gives its bytes.
    plain = httpx.post(f"{cluster.url}/v1/images/generations",
                       json={"prompt": "a lighthouse", "size": "128x96", "steps": 6, "seed": 3},
                       timeout=60).json()
    assert plain["data"][0]["b64_json"] == final.b64_json


def test_stream_events_match_the_spec_and_cover_every_image(cluster: Cluster) -> None:
    with httpx.stream("POST", f"{cluster.url}/v1/images/generations", timeout=60,
                      json={"prompt": "x", "size": "64x64", "n": 2, "stream": True,
                            "partial_images": 1, "steps": 4, "seed": 10}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp.iter_lines()))
    partial = [d for e, d in events if e == "image_generation.partial_image"]
    completed = [d for e, d in events if e == "image_generation.completed"]
    for data in partial:
        validate(data, "ImageGenPartialImageEvent")
    for data in completed:
        validate(data, "ImageGenCompletedEvent")
    assert sorted(d["image_index"] for d in partial) == [0, 1]
    assert [(d["image_index"], d["seed"]) for d in completed] == [(0, 10), (1, 11)]


def test_a_refused_stream_is_a_plain_error(cluster: Cluster) -> None:
    resp = httpx.post(f"{cluster.url}/v1/images/generations", timeout=30,
                      json={"prompt": "x", "model": "sdxl", "stream": True})
    assert resp.status_code == 503
    assert resp.headers["content-type"].startswith("application/json")
    validate(resp.json(), "ErrorResponse")


def test_jobs_api_reports_position_steps_previews_and_the_result(cluster: Cluster) -> None:
    submitted = httpx.post(f"{cluster.url}/v1/jobs", timeout=30,
                           json={"prompt": "a fox", "size": "96x64", "steps": 5, "seed": 4,
                                 "partial_images": 2})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] in ("queued", "running") and job["seeds"] == [4]
    with httpx.stream("GET", f"{cluster.url}/v1/jobs/{job['id']}/events", timeout=60) as resp:
        events = list(sse_events(resp.iter_lines()))
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "completed"
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == [1, 2, 3, 4, 5]
    previews = [d for e, d in events if e == "preview"]
    assert len(previews) == 2 and all(image(p["b64_json"]).size == (96, 64) for p in previews)
    result = events[-1][1]
    assert result["id"] == job["id"]
    # The jobs API's completed event carries the stored image by URL.
    stored = httpx.get(result["data"][0]["url"], timeout=10).content
    assert Image.open(io.BytesIO(stored)).size == (96, 64)
    status = httpx.get(f"{cluster.url}/v1/jobs/{job['id']}").json()
    assert status["status"] == "succeeded"
    assert status["result"]["data"][0]["url"] == result["data"][0]["url"]
    # A late watcher still gets the whole story.
    with httpx.stream("GET", f"{cluster.url}/v1/jobs/{job['id']}/events", timeout=30) as resp:
        again = [e for e, _ in sse_events(resp.iter_lines())]
    assert again == names


def test_delete_cancels_a_running_job(cluster: Cluster) -> None:
    job = httpx.post(f"{cluster.url}/v1/jobs", timeout=30,
                     json={"prompt": "slow", "size": "512x512", "steps": 50}).json()
    events: list[str] = []

    def watch() -> None:
        with httpx.stream("GET", f"{cluster.url}/v1/jobs/{job['id']}/events",
                          timeout=60) as resp:
            for name, _ in sse_events(resp.iter_lines()):
                events.append(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    deadline = time.monotonic() + 30
    while "progress" not in events and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = httpx.delete(f"{cluster.url}/v1/jobs/{job['id']}", timeout=10)
    assert cancelled.json()["status"] == "cancelled"
    watcher.join(30)
    assert events[-1] == "cancelled"
    assert idle(cluster), "the worker kept running the cancelled job"
    assert httpx.get(f"{cluster.url}/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_a_job_nobody_watches_any_more_runs_to_its_end(cluster: Cluster) -> None:
    # A jobs-API job outlives its watchers: the result waits in the records.
    job = httpx.post(f"{cluster.url}/v1/jobs", timeout=30,
                     json={"prompt": "unwatched", "size": "128x128", "steps": 12}).json()
    with httpx.stream("GET", f"{cluster.url}/v1/jobs/{job['id']}/events", timeout=60) as resp:
        for name, _ in sse_events(resp.iter_lines()):
            if name == "progress":
                break  # leaving the block closes the connection mid-job
    done = wait_until(lambda: ended(httpx.get(f"{cluster.url}/v1/jobs/{job['id']}").json()),
                      60, "the job to end")
    assert done["status"] == "succeeded"
    assert httpx.get(done["images"][0]["url"], timeout=10).status_code == 200


def ended(job: dict) -> dict | None:
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def test_unknown_job_is_a_404(cluster: Cluster) -> None:
    for method, path in (("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"),
                         ("GET", "/v1/jobs/nope/events")):
        resp = httpx.request(method, f"{cluster.url}{path}", timeout=10)
        assert resp.status_code == 404
        validate(resp.json(), "ErrorResponse")
        assert resp.json()["error"]["code"] == "job_not_found"


def test_streams_are_bounded_and_never_starve_plain_requests(cluster: Cluster,
                                                             cache_dir) -> None:
    import signal
    import subprocess
    import sys

    from tests.cluster import REPO, OutputLog, bound_http_port, cluster_env

    # A second frontend on the same broker: 4 threads, so at most 2 streams. On port 0 its
    # default id would be HOST:0, so it gets its own.
    frontend = subprocess.Popen(
        [sys.executable, "-m", "http_frontend", "--broker", cluster.clients, "--port", "0",
         "--frontend-id", "streaming-second", "--threads", "4", "--keepalive", "0.2",
         "--heartbeat", "0.5"],
        cwd=REPO, env=cluster_env(cache_dir), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    log = OutputLog(frontend)
    opened: list[httpx.Response] = []
    clients: list[httpx.Client] = []
    try:
        url = f"http://127.0.0.1:{bound_http_port(log)}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        jobs = [httpx.post(f"{url}/v1/jobs", timeout=30,
                           json={"prompt": "slow", "size": "512x512", "steps": 50}).json()
                for _ in range(3)]
        # Two workers run the first two jobs; the third waits in the queue, quietly.
        for job in (jobs[0], jobs[2]):
            client = httpx.Client(timeout=30)
            clients.append(client)
            resp = client.send(client.build_request("GET", f"{url}/v1/jobs/{job['id']}/events"),
                               stream=True)
            assert resp.status_code == 200
            opened.append(resp)
        third = httpx.get(f"{url}/v1/jobs/{jobs[1]['id']}/events", timeout=10)
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "too_many_streams"
        assert int(third.headers["retry-after"]) > 0
        # Plain requests still get threads.
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v1/jobs/{jobs[2]['id']}", timeout=5).status_code == 200
        # A quiet stream (its job is queued) carries keep-alive comments.
        first_lines = itertools.islice(opened[1].iter_lines(), 200)
        assert any(line.startswith(": keep-alive") for line in first_lines)
    finally:
        for resp in opened:
            resp.close()
        for client in clients:
            client.close()
        for job in jobs if "jobs" in locals() else []:
            httpx.delete(f"{cluster.url}/v1/jobs/{job['id']}", timeout=10)
        frontend.send_signal(signal.SIGTERM)
        frontend.wait(15)
