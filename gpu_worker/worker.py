"""A GPU worker: load one model, register with the broker, run jobs until told to stop."""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from broker import protocol
from broker.protocol import ErrorCode, ImageInfo, JobSpec, MsgType
from gpu_worker import models
from gpu_worker.encode import encode_image
from gpu_worker.link import BrokerLink, CurveKeys
from gpu_worker.pipeline import Interrupted, LoadOptions, PipelineRunner, StepCallback

log = logging.getLogger(__name__)

VERSION = "0.1.0"

# Fault injection for the reliability tests: a job whose prompt contains this text kills the
# worker process outright, as a driver crash or the OOM killer would. Unset in production.
CRASH_PROMPT_ENV = "DC_FAULT_CRASH_ON_PROMPT"
PREVIEW_QUALITY = 70  # previews are glimpses: small and quick beat faithful


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    broker: str = "tcp://127.0.0.1:5556"
    model: str = models.TINY
    device: str = "cpu"
    worker_id: str | None = None
    max_batch: int = 1
    heartbeat: float = 1.0
    threads: int | None = None
    cache_dir: str | None = None
    warm_up: bool = True
    offload: bool = False
    compile: bool = False
    max_frame: int = 256 << 20
    curve: CurveKeys | None = None  # encrypt and authenticate to a broker that uses CURVE


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.spec = models.resolve(config.model)
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{config.device}"
        self._stop = threading.Event()
        self.runner: PipelineRunner | None = None
        self.link: BrokerLink | None = None
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        # When the device last finished a batch: the gap before the next one is time the
        # device sat idle, which prefetching (capacity 2 x max_batch) is there to remove.
        self._device_free_since: float | None = None

    def stop(self) -> None:
        """Finish the current job, hand back the rest, leave. Safe from a signal handler."""
        self._stop.set()

    def load(self) -> None:
        options = LoadOptions(device=self.config.device, cache_dir=self.config.cache_dir,
                              threads=self.config.threads, offload=self.config.offload,
                              compile=self.config.compile)
        self.runner = PipelineRunner(self.spec, options)
        self.spec = self.runner.spec  # what the loaded pipeline really takes
        if self.config.warm_up:
            seconds = self.runner.warm_up()
            log.info("warm-up generation took %.2f s", seconds)

    def ready_fields(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id, "host": socket.gethostname(),
            "device": self.config.device, "models": [self.spec.name],
            # One batch running and one waiting, so the device never idles between batches.
            "max_batch": self.config.max_batch, "capacity": 2 * self.config.max_batch,
            "version": VERSION,
            "model_info": {self.spec.name: self.spec.limits()},
        }

    def run(self) -> None:
        """Load, register, then take batches until stop(); the caller's thread drives the GPU.

        Encoding and sending happen on another thread, so the GPU starts on the next batch
        (which the broker already sent: capacity covers one running and one waiting) while
        the last one's images are compressed.
        """
        if self.runner is None:
            self.load()
        self.link = BrokerLink(self.config.broker, self.ready_fields(),
                               heartbeat=self.config.heartbeat, max_frame=self.config.max_frame,
                               curve=self.config.curve)
        self.link.start()
        log.info("worker %s serving %s on %s; broker %s", self.worker_id, self.spec.name,
                 self.config.device, self.config.broker)
        try:
            while not self._stop.is_set():
                try:
                    batch = self.link.jobs.get(timeout=0.2)
                except queue.Empty:
                    if not self.link.alive:  # it logged why; exit so a supervisor restarts us
                        raise RuntimeError("the link to the broker stopped") from None
                    continue
                self._run_batch(batch)
        finally:
            # Answers still being encoded go out first; then BYE hands back what is left.
            self._encoder.shutdown(wait=True)
            self.link.stop(bye=True)
            log.info("worker %s stopped", self.worker_id)

    def _run_batch(self, batch: list[JobSpec]) -> None:
        """Run jobs that share a batch key as one pipeline call; answer each on its own."""
        assert self.link is not None and self.runner is not None
        link = self.link
        for job in batch:
            if link.is_cancelled(job.id):
                link.job_done(job.id)
        jobs = [job for job in batch if not link.is_cancelled(job.id)]
        if not jobs:
            return
        for job in jobs:
            link.job_started(job.id)
            _maybe_crash(job)
        started = time.perf_counter()
        idle = None if self._device_free_since is None else started - self._device_free_since
        try:
            # 1. Denoise: the only step on the device.
            images = self.runner.generate_batch(jobs, self._progress_reporter(jobs))
        except Interrupted:
            log.info("job(s) %s interrupted", ", ".join(job.id for job in jobs))
            self._done(jobs)
            return
        except Exception as exc:
            log.exception("job(s) %s failed", ", ".join(job.id for job in jobs))
            for job in jobs:
                link.send(protocol.failed(job.id, ErrorCode.WORKER_ERROR, _client_safe(exc)))
            self._done(jobs)
            return
        finally:
            self._device_free_since = time.perf_counter()
        timings = {"generate_s": self._device_free_since - started, "batch_size": len(jobs)}
        if idle is not None:
            timings["device_idle_s"] = idle
        # 2. Encode and answer off this thread, while the device takes the next batch.
        for job, job_images in zip(jobs, images, strict=True):
            self._encoder.submit(self._answer, job, job_images, timings)

    def _progress_reporter(self, jobs: list[JobSpec]) -> StepCallback:
        """Report each step (and previews) to every job of the batch; stop when all left."""
        link = self.link
        assert link is not None
        owners = [(job, index) for job in jobs for index in range(job.n)]

        def on_step(step: int, steps: int, previews: list[Image.Image]) -> bool:
            for job in jobs:
                link.send(protocol.encode(MsgType.PROGRESS,
                                          {"job_id": job.id, "step": step, "steps": steps}))
            for (job, index), preview in zip(owners, previews, strict=False):
                link.send(protocol.encode(
                    MsgType.PROGRESS,
                    {"job_id": job.id, "step": step, "steps": steps, "image_index": index,
                     "preview_format": job.output_format},
                    [encode_image(preview, job.output_format, PREVIEW_QUALITY)]))
            return not all(link.is_cancelled(job.id) for job in jobs)

        return on_step

    def _answer(self, job: JobSpec, images: list[Image.Image], timings: dict[str, float]
                ) -> None:
        """Encode one job's images and send its RESULT (the encoder thread)."""
        assert self.link is not None
        try:
            if self.link.is_cancelled(job.id):
                return  # cancelled while its batch ran: nobody waits for it
            started = time.perf_counter()
            payloads = [encode_image(img, job.output_format, job.output_compression)
                        for img in images]
            infos = [ImageInfo(seed=seed, width=img.width, height=img.height,
                               format=job.output_format)
                     for seed, img in zip(job.seeds, images, strict=True)]
            timings = {**timings, "encode_s": time.perf_counter() - started}
            self.link.send(protocol.result(job.id, infos, payloads, timings=timings,
                                           worker_id=self.worker_id))
            log.info("job %s: %d image(s) %dx%d, %d steps, batch of %d, in %.2f s", job.id,
                     job.n, job.width, job.height, job.steps, timings["batch_size"],
                     timings["generate_s"])
        except Exception as exc:  # an encoding failure answers the job, never kills the worker
            log.exception("job %s failed while encoding", job.id)
            self.link.send(protocol.failed(job.id, ErrorCode.WORKER_ERROR, _client_safe(exc)))
        finally:
            self.link.job_done(job.id)

    def _done(self, jobs: list[JobSpec]) -> None:
        assert self.link is not None
        for job in jobs:
            self.link.job_done(job.id)


def _maybe_crash(job: JobSpec) -> None:
    crash_on = os.environ.get(CRASH_PROMPT_ENV)
    if crash_on and crash_on in job.prompt:
        log.error("fault injection: crashing on job %s", job.id)
        os._exit(70)


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"]+")


def _client_safe(exc: BaseException) -> str:
    """A one-line account of a failure, with file paths removed: clients never see paths."""
    text = _PATH.sub("<path>", str(exc).splitlines()[0] if str(exc) else "")[:300]
    return f"generation failed: {type(exc).__name__}" + (f": {text}" if text else "")
