"""Every pipeline family the registry uses, served by a real worker and asked for over HTTP.

Each family's tiny random-weight pipeline (tests/gpu_worker/families/) is built once, saved,
and served by a real `python -m gpu_worker --model <dir>` against a real broker and frontend.
"""

from __future__ import annotations

import base64
import importlib
import io
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import zmq
from PIL import Image

from broker import protocol
from broker.protocol import JobSpec, MsgType
from gpu_worker import models
from tests.cluster import (
    REPO,
    OutputLog,
    bound_broker_endpoints,
    bound_http_port,
    cluster_env,
)
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow

FAMILY_DIR = Path(__file__).parent / "families"
FAMILIES = sorted(p.stem for p in FAMILY_DIR.glob("*.py")
                  if not p.stem.startswith(("_", "test_")))
HEARTBEAT = 0.2
STEPS = 2


def family_module(name: str) -> ModuleType:
    return importlib.import_module(f"tests.gpu_worker.families.{name}")


class Head:
    """A broker and a frontend, shared by the family tests."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.processes: list[subprocess.Popen] = []
        try:
            # Port 0 everywhere: each process binds what is free and logs what it got.
            broker = self._start("-m", "broker", "--clients", "tcp://127.0.0.1:*",
                                 "--workers", "tcp://127.0.0.1:*", "--heartbeat", str(HEARTBEAT))
            self.clients, self.workers = bound_broker_endpoints(OutputLog(broker))
            frontend = self._start("-m", "http_frontend", "--broker", self.clients,
                                   "--host", "127.0.0.1", "--port", "0",
                                   "--heartbeat", str(HEARTBEAT))
            self.url = f"http://127.0.0.1:{bound_http_port(OutputLog(frontend))}"
        except BaseException:
            self.stop()
            raise

    def _start(self, *argv: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, *argv], cwd=REPO,
                                   env=cluster_env(self.cache_dir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process

    def served(self) -> dict[str, dict]:
        try:
            resp = httpx.get(f"{self.url}/v1/models", timeout=5)
        except httpx.HTTPError:
            return {}
        return {m["id"]: m for m in resp.json().get("data", [])} if resp.is_success else {}

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(10)


# Families whose workers test_family_edits.py uses after this module: kept running for it.
SHARED_WITH_EDITS = ("chroma", "flux", "flux2_klein", "kolors", "qwen_image", "sana",
                     "sana_sprint", "sd", "sd3", "sdxl", "z_image")


class FamilyWorkers:
    """One real worker per family, started once for the whole run: this module and
    test_family_edits.py both use them, and starting one costs seconds of imports."""

    def __init__(self, head: Head, cache_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> None:
        self.head = head
        self.cache_dir = cache_dir
        self.tmp_path_factory = tmp_path_factory
        self._running: dict[str, tuple[subprocess.Popen, str]] = {}

    def serve(self, name: str) -> tuple[str, ModuleType]:
        """The family's model name (its directory), served by a running worker."""
        module = family_module(name)
        if name in self._running and self._running[name][0].poll() is None:
            return self._running[name][1], module
        path = self.tmp_path_factory.mktemp(name) / "model"
        module.build(path)
        worker = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker", "--broker", self.head.workers, "--model",
             str(path), "--device", "cpu", "--threads", "1", "--heartbeat", str(HEARTBEAT),
             "--no-warm-up"],
            cwd=REPO, env=cluster_env(self.cache_dir), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        log = OutputLog(worker)
        self._running[name] = (worker, str(path))
        deadline = time.monotonic() + 120
        while str(path) not in self.head.served():
            assert worker.poll() is None, f"the worker died:\n{log.text()}"
            assert time.monotonic() < deadline, f"the worker never registered:\n{log.text()}"
            time.sleep(0.1)
        return str(path), module

    def stop(self, name: str) -> None:
        worker, _ = self._running.pop(name, (None, ""))
        if worker is None:
            return
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()

    def stop_all(self) -> None:
        for name in list(self._running):
            self.stop(name)


@pytest.fixture(scope="session")
def head(cache_dir: Path) -> Iterator[Head]:
    running = Head(cache_dir)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def family_workers(head: Head, cache_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyWorkers]:
    workers = FamilyWorkers(head, cache_dir, tmp_path_factory)
    try:
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture(scope="module", params=FAMILIES)
def served_family(request: pytest.FixtureRequest, family_workers: FamilyWorkers
                  ) -> Iterator[tuple[str, ModuleType]]:
    """A family's tiny pipeline on disk, served by one real worker process. Kept for
    test_family_edits.py when it edits; stopped when this module is done with it else."""
    name = request.param
    yield family_workers.serve(name)
    if not (request.module.__name__.endswith("test_families") and name in SHARED_WITH_EDITS):
        family_workers.stop(name)


def size_for(spec: models.ModelSpec) -> tuple[int, int]:
    """A small, non-square size the family accepts."""
    if spec.allowed_sizes:
        return spec.allowed_sizes[0]
    m = spec.size_multiple
    return m * math.ceil(96 / m), m * math.ceil(64 / m) if m < 96 else m


def announced_spec(head: Head, model: str) -> models.ModelSpec:
    return models.ModelSpec.from_description(head.served()[model]["limits"])


def generate(head: Head, model: str, **body) -> dict:
    resp = httpx.post(f"{head.url}/v1/images/generations",
                      json={"prompt": "a red fox in the snow", "model": model,
                            "steps": STEPS, **body}, timeout=180)
    assert resp.status_code == 200, resp.text
    validate(resp.json(), "ImagesResponse")
    return resp.json()


def test_image_of_the_requested_size_with_reproducible_seeds(head: Head, served_family) -> None:
    model, module = served_family
    spec = announced_spec(head, model)
    assert spec.pipeline == module.PIPELINE
    width, height = size_for(spec)
    first = generate(head, model, size=f"{width}x{height}", seed=11, n=2)
    again = generate(head, model, size=f"{width}x{height}", seed=11, n=2)
    other = generate(head, model, size=f"{width}x{height}", seed=12, n=1)
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in first["data"]]
    assert [i.size for i in images] == [(width, height)] * 2
    assert [d["seed"] for d in first["data"]] == [11, 12]
    assert [d["b64_json"] for d in first["data"]] == [d["b64_json"] for d in again["data"]]
    # Image 1 of the first batch had seed 12, like image 0 here: batching keeps seeds apart.
    assert first["data"][0]["b64_json"] != other["data"][0]["b64_json"]


def test_negative_prompt_is_used_or_warned_about(head: Head, served_family) -> None:
    model, _ = served_family
    spec = announced_spec(head, model)
    width, height = size_for(spec)
    body = {"size": f"{width}x{height}", "seed": 5, "guidance": 4.0}
    with_negative = generate(head, model, negative_prompt="blurry, dark", **body)
    if spec.negative_prompt:
        plain = generate(head, model, **body)
        assert "warnings" not in with_negative
        assert with_negative["data"][0]["b64_json"] != plain["data"][0]["b64_json"]
    else:
        assert any("negative prompt" in w for w in with_negative["warnings"])


def test_progress_arrives_for_every_step(head: Head, served_family) -> None:
    model, _ = served_family
    spec = announced_spec(head, model)
    width, height = size_for(spec)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(head.clients)
    try:
        job = JobSpec(id=f"progress-{abs(hash(model))}", model=model, prompt="a fox",
                      width=width, height=height, steps=STEPS, seeds=(1,),
                      guidance=spec.default_guidance, timeout=120)
        sock.send_multipart(protocol.submit(job))
        steps_seen: list[tuple[int, int]] = []
        while True:
            assert sock.poll(120_000), "no answer from the broker"
            msg = protocol.decode(sock.recv_multipart())
            if msg.type is MsgType.PROGRESS:
                steps_seen.append((msg["step"], msg["steps"]))
            elif msg.type in (MsgType.RESULT, MsgType.FAILED):
                break
        assert msg.type is MsgType.RESULT, msg.fields
        total = STEPS + spec.decoder_steps
        assert steps_seen == [(i, total) for i in range(1, total + 1)]
    finally:
        sock.close()


def test_images_have_the_bytes_of_diffusers_own_pil_output(served_family) -> None:
    # The runner asks a known family for tensors and converts them on the device (to_pil);
    # the pixels must be exactly those diffusers' own output_type="pil" gives.
    from gpu_worker.pipeline import LoadOptions, PipelineRunner

    model, _ = served_family
    runner = PipelineRunner(models.resolve(model), LoadOptions(threads=1))
    assert runner._output_type() == "pt"
    width, height = size_for(runner.spec)
    jobs = [JobSpec(id=name, model=model, prompt=prompt, width=width, height=height,
                    steps=STEPS, seeds=seeds, guidance=runner.spec.default_guidance)
            for name, prompt, seeds in (("a", "a red fox", (1, 2)), ("b", "a blue owl", (3,)))]
    ours = runner.generate_batch(jobs)
    runner._output_type = lambda: "pil"  # type: ignore[method-assign]
    theirs = runner.generate_batch(jobs)
    assert [[im.mode for im in job] for job in ours] == [[im.mode for im in job]
                                                         for job in theirs]
    assert [[im.tobytes() for im in job] for job in ours] == [[im.tobytes() for im in job]
                                                             for job in theirs]
