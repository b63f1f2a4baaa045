"""Jobs that outlive their frontend: kill -9 and restart, two frontends on one PostgreSQL and
one S3-compatible store, leases taken over."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.cluster import (
    REPO,
    OutputLog,
    bound_broker_endpoints,
    bound_http_port,
    cluster_env,
    wait_until,
)

pytestmark = pytest.mark.slow

HEARTBEAT = 0.5
BUSY = {"prompt": "keeps the worker busy", "size": "256x256", "steps": 40}


class Parts:
    """A broker, one tiny worker and any number of frontends, each a real process."""

    def __init__(self, cache_dir: Path, env: dict[str, str] | None = None) -> None:
        self.cache_dir = cache_dir
        self.env = env or {}
        self.processes: list[subprocess.Popen] = []
        _, log = self.start("-m", "broker", "--clients", "tcp://127.0.0.1:*",
                                 "--workers", "tcp://127.0.0.1:*", "--heartbeat",
                                 str(HEARTBEAT))
        self.clients, workers = bound_broker_endpoints(log)
        # One job at a time (and one more prefetched): the others wait in the broker's queue.
        self.start("-m", "gpu_worker", "--broker", workers, "--model", "tiny", "--device",
                   "cpu", "--threads", "1", "--heartbeat", str(HEARTBEAT))

    def start(self, *argv: str) -> tuple[subprocess.Popen, OutputLog]:
        process = subprocess.Popen([sys.executable, *argv], cwd=REPO,
                                   env={**cluster_env(self.cache_dir), **self.env},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process, OutputLog(process)

    def frontend(self, frontend_id: str, *options: str) -> Frontend:
        process, log = self.start("-m", "http_frontend", "--broker", self.clients, "--port",
                                  "0", "--frontend-id", frontend_id, "--heartbeat",
                                  str(HEARTBEAT), *options)
        url = f"http://127.0.0.1:{bound_http_port(log)}"
        wait_until(lambda: ready(url), 60, f"frontend {frontend_id} to see a worker", log.text)
        return Frontend(process, log, url)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


class Frontend:
    def __init__(self, process: subprocess.Popen, log: OutputLog, url: str) -> None:
        self.process = process
        self.log = log
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60)

    def submit(self, **body) -> str:
        resp = self.http.post("/v1/jobs", json={"size": "64x64", "steps": 2, **body})
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def job(self, job_id: str) -> dict:
        resp = self.http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_for(self, job_id: str, timeout: float = 120) -> dict:
        return wait_until(lambda: ended(self.job(job_id)), timeout, f"job {job_id} to end",
                          self.log.text)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def ended(job: dict) -> dict | None:
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def png_size(url: str) -> tuple[int, int]:
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200, (url, resp.status_code)
    return Image.open(io.BytesIO(resp.content)).size


@pytest.fixture
def parts(cache_dir: Path) -> Iterator[Parts]:
    running = Parts(cache_dir)
    try:
        yield running
    finally:
        running.stop()


def test_jobs_waiting_when_the_frontend_is_killed_complete_after_its_restart(
        parts: Parts, tmp_path: Path) -> None:
    options = ("--data-dir", str(tmp_path / "data"))
    first = parts.frontend("restarting", *options)
    busy = first.submit(**BUSY)
    waiting = [first.submit(prompt=f"waits {i}", seed=100 + i, size=f"{64 + 8 * i}x64")
               for i in range(5)]
    assert all(first.job(j)["status"] == "queued" for j in waiting)
    first.kill()  # no drain, no goodbye: the records are all that is left

    again = parts.frontend("restarting", *options)
    again.log.wait_for("following it again", 30)
    for index, job_id in enumerate(waiting):
        job = again.wait_for(job_id)
        assert job["status"] == "succeeded", job
        [image] = job["images"]
        assert image["seed"] == 100 + index
        assert png_size(image["url"]) == (64 + 8 * index, 64)
    listed = again.http.get("/v1/jobs", params={"limit": 10}).json()["data"]
    assert {j["id"] for j in listed} >= {busy, *waiting}
    assert all(j["images"] and j["images"][0]["url"] for j in listed if j["id"] in waiting)


def data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_an_edit_waiting_when_its_frontend_is_killed_runs_with_its_stored_inputs(
        parts: Parts, tmp_path: Path) -> None:
    """An edit's input images are kept in the image store with its record: a restarted
    frontend sends them again, and deleting the job deletes them."""
    options = ("--data-dir", str(tmp_path / "data"))
    first = parts.frontend("restarting-edits", *options)
    busy = first.submit(**BUSY)
    source = Image.new("RGB", (96, 64), (200, 40, 40))
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 64))
    resp = first.http.post("/v1/jobs/edits", json={
        "prompt": "a blue door", "images": [{"image_url": data_url(source)}],
        "mask": {"image_url": data_url(mask)}, "steps": 2, "seed": 3})
    assert resp.status_code == 202, resp.text
    edit = resp.json()
    assert edit["status"] == "queued" and (edit["width"], edit["height"]) == (96, 64)
    recorded = edit["request"]
    stored = [recorded["image"][0]["name"], recorded["mask"]["name"]]
    assert png_size(f"{first.url}/v1/images/files/{stored[0]}") == (96, 64)
    first.kill()

    again = parts.frontend("restarting-edits", *options)
    job = again.wait_for(edit["id"])
    assert job["status"] == "succeeded", job
    made = Image.open(io.BytesIO(httpx.get(job["images"][0]["url"], timeout=10).content))
    assert made.size == (96, 64)
    # The right half was outside the mask: the input's own red, exactly.
    assert made.convert("RGB").getpixel((80, 30)) == (200, 40, 40)
    again.wait_for(busy)
    assert again.http.delete(f"/v1/jobs/{edit['id']}").status_code == 200
    for name in stored:
        assert again.http.get(f"/v1/images/files/{name}").status_code == 404


@pytest.fixture
def shared(cache_dir: Path, postgres_server, s3_server) -> Iterator[tuple[Parts, list[str]]]:
    """Parts whose frontends share one PostgreSQL database and one S3 bucket."""
    running = Parts(cache_dir, env=s3_server.env)
    bucket = s3_server.make_bucket("shared-images")
    options = ["--db", postgres_server.make_database(), "--image-store",
               f"s3://{bucket}/cluster-a", "--lease", "3"]
    try:
        yield running, options
    finally:
        running.stop()


def test_two_frontends_share_jobs_images_and_cancels(shared, tmp_path: Path) -> None:
    parts, options = shared
    one = parts.frontend("one", *options, "--data-dir", str(tmp_path / "one"))
    two = parts.frontend("two", *options, "--data-dir", str(tmp_path / "two"))

    job_id = one.submit(prompt="made on one", seed=5, size="96x64", steps=6)
    seen = two.job(job_id)  # read on the other at once: the record was written first
    assert seen["prompt"] == "made on one" and seen["seeds"] == [5]
    with two.http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        names = [line[len("event: "):] for line in events.iter_lines()
                 if line.startswith("event: ")]
    assert names[-1] == "completed"
    done = two.job(job_id)
    [image] = done["images"]
    assert image["url"].startswith(two.url)
    name = image["url"].rsplit("/", 1)[1]
    # The same image from the bucket through either frontend.
    assert png_size(f"{one.url}/v1/images/files/{name}") == (96, 64)
    assert httpx.get(f"{one.url}/v1/images/files/{name}").content == \
        httpx.get(f"{two.url}/v1/images/files/{name}").content

    # A running job made on one is cancelled on two.
    long_id = one.submit(**BUSY)
    wait_until(lambda: one.job(long_id)["status"] == "running", 60, "the long job to run")
    assert two.http.delete(f"/v1/jobs/{long_id}").json()["status"] == "cancelled"
    assert one.wait_for(long_id, 30)["status"] == "cancelled"
    # The worker was told to stop: the next job does not wait for 40 steps.
    quick = two.submit(prompt="after the cancel")
    assert two.wait_for(quick, 60)["status"] == "succeeded"

    # Deleted on one: gone on both, images too.
    assert one.http.delete(f"/v1/jobs/{job_id}").json()["deleted"] is True
    assert two.http.get(f"/v1/jobs/{job_id}").status_code == 404
    assert httpx.get(f"{two.url}/v1/images/files/{name}").status_code == 404


def test_a_frontend_that_stops_renewing_loses_its_jobs_to_another(shared,
                                                                 tmp_path: Path) -> None:
    parts, options = shared
    one = parts.frontend("lease-one", *options, "--data-dir", str(tmp_path / "one"))
    two = parts.frontend("lease-two", *options, "--data-dir", str(tmp_path / "two"))
    one.submit(**BUSY)
    waiting = one.submit(prompt="taken over", seed=42)
    one.kill()
    done = two.wait_for(waiting, 120)
    assert done["status"] == "succeeded", done
    assert done["images"][0]["seed"] == 42
    assert png_size(done["images"][0]["url"]) == (64, 64)
    assert "following it again" in two.log.text()


def test_history_lists_per_key_and_an_admin_sees_all(shared, tmp_path: Path) -> None:
    parts, options = shared
    keys = tmp_path / "keys"
    keys.write_text("sk-alice name=alice\nsk-bob name=bob\nsk-ops name=ops admin\n")
    front = parts.frontend("keys", *options, "--api-keys-file", str(keys),
                           "--data-dir", str(tmp_path / "keys-data"))

    def as_key(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}
    made = front.http.post("/v1/jobs", headers=as_key("sk-alice"),
                           json={"prompt": "alice's", "size": "64x64", "steps": 1})
    job_id = made.json()["id"]
    assert front.http.get(f"/v1/jobs/{job_id}", headers=as_key("sk-bob")).status_code == 404
    assert front.http.delete(f"/v1/jobs/{job_id}", headers=as_key("sk-bob")).status_code == 404
    bobs = front.http.get("/v1/jobs", headers=as_key("sk-bob")).json()["data"]
    alices = front.http.get("/v1/jobs", headers=as_key("sk-alice")).json()["data"]
    everyone = front.http.get("/v1/jobs", headers=as_key("sk-ops")).json()["data"]
    assert bobs == [] and [j["id"] for j in alices] == [job_id]
    assert job_id in [j["id"] for j in everyone]
    assert alices[0]["owner"] == "alice"
    assert "sk-alice" not in json.dumps(everyone)
