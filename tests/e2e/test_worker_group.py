"""--gpus-per-worker through launch.py: one worker, two processes splitting each image (CPU
processes and gloo here), serving HTTP; the group lives and dies together."""

from __future__ import annotations

import base64
import io
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gpu_worker import models
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from tests.cluster import Cluster, alive, descendants, wait_until
from tests.gpu_worker.families import flux

pytestmark = pytest.mark.slow

BODY = {"prompt": "a lighthouse", "size": "64x64", "steps": 4, "guidance": 3.5, "seed": 11}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux") / "model"
    flux.build(path)
    return path


def generate(url: str) -> np.ndarray:
    resp = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=120)
    assert resp.status_code == 200, resp.text
    data = base64.b64decode(resp.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def followers_of(worker: int) -> list[int]:
    """The group's follower processes: multiprocessing's spawned children of the worker."""
    found = []
    for pid in descendants(worker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in argv:
            found.append(pid)
    return found


def test_a_group_serves_the_image_one_device_makes_and_restarts_as_one(
        cache_dir: Path, flux_dir: Path) -> None:
    alone = PipelineRunner(models.resolve(str(flux_dir)), LoadOptions(threads=1))
    expected = np.asarray(alone.generate(alone_job(flux_dir))[0], dtype=np.int16)
    cluster = Cluster(cache_dir, workers=1, heartbeat=1.0,
                      extra=["--model", str(flux_dir), "--gpus-per-worker", "2"])
    try:
        cluster.wait_ready(180)
        assert np.abs(generate(cluster.url) - expected).max() <= 1
        [worker] = cluster.pid_of("gpu_worker")
        [follower] = followers_of(worker)

        # A follower lost: its leader ends the group, the supervisor starts it again.
        os.kill(follower, signal.SIGKILL)
        wait_until(lambda: not alive(worker), 30, "the leader to follow its follower out")
        cluster.log.wait_for("worker-cpu0 exited with status 70", 10)
        wait_until(lambda: len(cluster.pid_of("gpu_worker")) == 1
                   and cluster.pid_of("gpu_worker")[0] != worker, 60, "a new group")
        assert np.abs(generate(cluster.url) - expected).max() <= 1

        # The leader lost: its follower does not linger holding a device.
        [leader] = cluster.pid_of("gpu_worker")
        [follower] = followers_of(leader)
        os.kill(leader, signal.SIGKILL)
        wait_until(lambda: not alive(follower), 30, "the follower to follow its leader out")
    finally:
        cluster.stop(30)


def alone_job(flux_dir: Path):
    from broker.protocol import JobSpec

    return JobSpec(id="j", model=str(flux_dir), prompt=BODY["prompt"], width=64, height=64,
                   steps=4, seeds=(11,), guidance=3.5)
