"""A GPU worker: load one model, register with the broker, run jobs until told to stop."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from broker import defaults, logs, protocol
from broker.connection import CurveKeys
from broker.protocol import ErrorCode, ImageInfo, JobSpec, MsgType
from gpu_worker import models
from gpu_worker.editing import EditInputs, InvalidInput
from gpu_worker.encode import Generation, ImageMetadata, encode_image
from gpu_worker.link import BrokerLink
from gpu_worker.loras import AdapterFile, LoraError
from gpu_worker.marking import Marking
from gpu_worker.parallel import Group, GroupPlan, group_devices
from gpu_worker.pipeline import Interrupted, LoadOptions, PipelineRunner, StepCallback
from gpu_worker.prompt_syntax import PromptSyntaxError
from gpu_worker.stats import StatsRecorder

log = logging.getLogger(__name__)

VERSION = "0.1.0"

# Fault injection for the reliability tests: a job whose prompt contains this text kills the
# worker process outright, as a driver crash or the OOM killer would. Unset in production.
# DCTEST_, not DC_: every DC_WORKER_* variable configures the worker (docs/configuration.md).
CRASH_PROMPT_ENV = "DCTEST_FAULT_CRASH_ON_PROMPT"
# And one whose every job fails at once, as on a broken driver or a full disk.
FAIL_EVERY_JOB_ENV = "DCTEST_FAULT_FAIL_EVERY_JOB"
PREVIEW_QUALITY = 70  # previews are glimpses: small and quick beat faithful


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    broker: str = defaults.WORKERS_ENDPOINT
    model: str = models.TINY
    device: str = "cpu"
    worker_id: str | None = None
    max_batch: int = 1
    heartbeat: float = defaults.HEARTBEAT_INTERVAL
    threads: int | None = None
    cache_dir: str | None = None
    warm_up: bool = True
    offload: bool = False
    compile: bool = False
    compile_scope: str = "regional"  # gpu_worker/compiling.py
    warm_up_sizes: tuple[tuple[int, int], ...] = ()  # () : the model's own
    step_cache: str = "auto"  # gpu_worker/step_cache.py
    quantize: str = "none"  # gpu_worker/quantize.py
    gpus_per_worker: int = 1  # >1: a group splitting each image (gpu_worker/parallel.py)
    context_parallel: str = "ulysses"  # the group's attention: ulysses or ring
    log_level: str = "INFO"  # --log-level and --log-format: a group's followers log alike
    log_format: str = "text"
    lora_dir: str | None = None  # LoRA adapters it can apply (gpu_worker/loras.py)
    lora_repos: tuple[AdapterFile, ...] = ()  # and those of --lora-repo, resolved
    lora_cache: int = 8  # adapters kept in memory at most, and their weights' bytes
    lora_cache_bytes: int = 2 << 30
    max_frame: int = 256 << 20
    curve: CurveKeys | None = None  # encrypt and authenticate to a broker that uses CURVE
    image_metadata: bool = True  # how each image was made, prompt included, inside the image
    marking: Marking | None = None  # the operator's watermark and C2PA signing, if any


class Link(Protocol):
    """What the worker needs of its link to the broker (gpu_worker.link.BrokerLink)."""

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def send(self, frames: list[Any]) -> None: ...

    def stop(self, *, bye: bool = True) -> None: ...


class Runner(Protocol):
    """What the worker needs of its pipeline (gpu_worker.pipeline.PipelineRunner)."""

    def generate_batch(self, jobs: list[JobSpec], on_step: StepCallback | None = None,
                       inputs: Mapping[str, EditInputs] | None = None
                       ) -> list[list[Image.Image]]: ...

    def prompt_error(self, job: JobSpec) -> str | None: ...


class Worker:
    """Runs the jobs the broker leases to it and answers each exactly once.

    It is the link's handler: the link's I/O thread hands it batches and cancellations, and
    asks which jobs it holds. Every job received is held until answered, with a RESULT, a
    FAILED worker_error, or a FAILED cancelled: the broker frees the job's slot on this worker
    only when the answer arrives, so a cancelled job is answered too.
    """

    def __init__(self, config: WorkerConfig, *, runner: Runner | None = None) -> None:
        self.config = config
        self.spec = models.resolve(config.model)
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{config.device}"
        # Tells the broker a reconnection of this process from a restart under the same id.
        self.session = secrets.token_hex(8)
        self._stop = threading.Event()
        self.runner = runner  # loaded by run() when not given
        self.link: Link | None = None
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        # Previews are encoded on their own thread: not on the device's, which goes on to the
        # next step, and not behind the last batch's full-size images on the encoder's.
        self._previewer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")
        # When the device last finished a batch: the gap before the next one is time the
        # device sat idle, which prefetching (capacity 2 x max_batch) is there to remove.
        self._device_free_since: float | None = None
        self.stats = StatsRecorder(config.device)  # sent in every heartbeat
        # The jobs held, under one lock: the I/O thread adds and cancels, the main thread
        # takes batches, the encoder answers. Invariant: _cancelled <= _held, and every id in
        # a waiting batch is in _held.
        self._lock = threading.Lock()
        self._waiting: deque[list[JobSpec]] = deque()  # batches not started, oldest first
        self._arrived = threading.Condition(self._lock)  # a batch joined _waiting
        self._held: set[str] = set()  # received, not answered: running, encoding or waiting
        self._cancelled: set[str] = set()  # held, and cancelled by the broker
        self._inputs: dict[str, tuple[bytes, ...]] = {}  # an edit's frames, held till answered

    def stop(self) -> None:
        """Finish the current job, hand back the rest, leave. Safe from a signal handler."""
        self._stop.set()  # only this: a signal handler must not take a lock its thread holds

    def load(self) -> None:
        lora_dir = Path(self.config.lora_dir) if self.config.lora_dir else None
        options = LoadOptions(device=self.config.device, cache_dir=self.config.cache_dir,
                              threads=self.config.threads, offload=self.config.offload,
                              compile=self.config.compile,
                              compile_scope=self.config.compile_scope,
                              warm_up_sizes=self.config.warm_up_sizes,
                              step_cache=self.config.step_cache,
                              quantize=self.config.quantize, lora_dir=lora_dir,
                              lora_repos=self.config.lora_repos,
                              lora_cache=self.config.lora_cache,
                              lora_cache_bytes=self.config.lora_cache_bytes)
        group = None
        if self.config.gpus_per_worker > 1:
            plan = GroupPlan(group_devices(self.config.device, self.config.gpus_per_worker),
                             self.config.context_parallel, log_level=self.config.log_level,
                             log_format=self.config.log_format)
            group = Group.lead(plan, self.spec, options)
        try:
            runner = PipelineRunner(self.spec, options, group=group)
        except BaseException:
            if group is not None:
                group.close()  # the followers fail the same way: no group to restart
            raise
        if group is not None:
            group.started()
        self.spec = runner.spec  # what the loaded pipeline really takes
        self.runner = runner
        if self.config.warm_up:
            seconds = runner.warm_up()
            log.info("warm-up generation took %.2f s", seconds)

    def ready_fields(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id, "host": socket.gethostname(),
            "device": self.config.device, "models": [self.spec.name],
            # One batch running and one waiting, so the device never idles between batches.
            "max_batch": self.config.max_batch, "capacity": 2 * self.config.max_batch,
            "version": VERSION, "session": self.session,
            "model_info": {self.spec.name: self.spec.describe()},
            # The broker checks it against its own: peers that disagree declare each other dead.
            "heartbeat": self.config.heartbeat,
        }

    # ---------------------------------------------------------------- the link's handler

    def on_jobs(self, batch: list[JobSpec], inputs: Sequence[Any] = ()) -> None:
        """Queue a batch the broker leased to us (the link's I/O thread); ``inputs``: its
        edits' frames, job by job (decoded on the device thread, when the batch runs)."""
        frames: dict[str, tuple[bytes, ...]] = {}
        start = 0
        for job in batch:
            frames[job.id] = tuple(bytes(f) for f in inputs[start:start + job.frames])
            start += job.frames
        with self._lock:
            # A job we already hold is running here or waiting: running it twice would
            # answer it twice.
            fresh = [job for job in batch if job.id not in self._held]
            if len(fresh) < len(batch):
                log.warning("dropped %d job(s) sent again while held", len(batch) - len(fresh))
            if not fresh:
                return
            self._held.update(job.id for job in fresh)
            self._inputs.update((job.id, frames[job.id]) for job in fresh if job.frames)
            self._waiting.append(fresh)
            self._arrived.notify()

    def on_cancel(self, job_id: str) -> None:
        """Cancel a held job (the link's I/O thread); ignore one we do not hold.

        A waiting job is answered at once, so the broker frees its slot without waiting for
        the batch before it; a running one is marked, and stops at its next step or is
        answered cancelled instead of with its images.
        """
        with self._lock:
            if job_id not in self._held:
                log.debug("CANCEL for job %s, which we do not hold", job_id)
                return  # late (answered already) or never ours: keeping it would leak
            if self._unqueue(job_id):
                self._answer_locked(job_id, None)
                log.info("job %s cancelled before it started", job_id,
                         extra={"job_id": job_id})
            else:
                self._cancelled.add(job_id)
                log.info("job %s cancelled while running", job_id, extra={"job_id": job_id})

    def held(self) -> list[str]:
        """Return the ids of the jobs held: running, encoding or waiting (the I/O thread)."""
        with self._lock:
            return sorted(self._held)

    def _unqueue(self, job_id: str) -> bool:
        """Remove a job from the batch that waits with it; whether it was waiting. Lock held."""
        for batch in self._waiting:
            for index, job in enumerate(batch):
                if job.id == job_id:
                    del batch[index]
                    if not batch:
                        self._waiting.remove(batch)
                    return True
        return False

    # ---------------------------------------------------------------- answers, once each

    def _answer(self, job_id: str, frames: list[Any] | None) -> bool:
        """Send a held job's one answer and forget it; see _answer_locked."""
        with self._lock:
            return self._answer_locked(job_id, frames)

    def _answer_locked(self, job_id: str, frames: list[Any] | None) -> bool:
        """Send ``frames`` as the job's answer, or FAILED cancelled if it was cancelled (or
        ``frames`` is None); nothing for a job already answered. Whether ``frames`` went.

        Called with the lock held, so a CANCEL cannot slip in between the check and the send,
        and the answer is queued on the link before the job leaves what held() reports.
        """
        assert self.link is not None
        if job_id not in self._held:
            return False
        self._held.discard(job_id)
        self._inputs.pop(job_id, None)
        if job_id in self._cancelled or frames is None:
            self._cancelled.discard(job_id)
            self.link.send(protocol.failed(job_id, ErrorCode.CANCELLED, "cancelled"))
            return False
        self.link.send(frames)
        return True

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    # ---------------------------------------------------------------- the job loop

    def run(self, link: Link | None = None) -> None:
        """Load, register, then take batches until stop(); the caller's thread drives the GPU.

        ``link`` replaces the BrokerLink to config.broker (tests pass a fake); it must deliver
        to this worker's on_jobs, on_cancel and held. Encoding and sending happen on another
        thread, so the GPU starts on the next batch (which the broker already sent: capacity
        covers one running and one waiting) while the last one's images are compressed.
        """
        if self.runner is None:
            self.load()
        self.link = link if link is not None else BrokerLink(
            self.config.broker, self.ready_fields(), handler=self,
            heartbeat=self.config.heartbeat, max_frame=self.config.max_frame,
            curve=self.config.curve, stats=self.stats.snapshot, loras=self._lora_listing())
        self.link.start()
        log.info("worker %s serving %s on %s; broker %s", self.worker_id, self.spec.name,
                 self.config.device, self.config.broker)
        try:
            while not self._stop.is_set():
                batch = self._next_batch(timeout=0.2)
                if batch is None:
                    if not self.link.alive:  # it logged why; exit so a supervisor restarts us
                        raise RuntimeError("the link to the broker stopped")
                    continue
                self._run_batch(batch)
        finally:
            # Answers still being encoded go out first; then BYE hands back what is left,
            # the batches that never started included.
            self._previewer.shutdown(wait=True)
            self._encoder.shutdown(wait=True)
            self.link.stop(bye=True)
            group = getattr(self.runner, "group", None)
            if group is not None:
                group.close()
            log.info("worker %s stopped", self.worker_id)

    def _lora_listing(self) -> Callable[[], dict[str, Any]] | None:
        """What announces the worker's LoRA adapters, when it applies any."""
        library = getattr(self.runner, "loras", None)
        applies = self.config.lora_dir or self.config.lora_repos
        return library.announcement if applies and library is not None else None

    def _next_batch(self, timeout: float) -> list[JobSpec] | None:
        """Take the oldest waiting batch; None after ``timeout``, or when stopping."""
        with self._arrived:
            if not self._waiting:
                self._arrived.wait(timeout)
            if not self._waiting or self._stop.is_set():  # stopping: the BYE hands it back
                return None
            return self._waiting.popleft()

    def _start(self, batch: list[JobSpec]) -> list[JobSpec]:
        """The jobs of ``batch`` to run: the cancelled ones are answered, never started."""
        with self._lock:
            for job in batch:
                if job.id in self._cancelled:
                    self._answer_locked(job.id, None)
            return [job for job in batch if job.id in self._held]

    def _run_batch(self, batch: list[JobSpec]) -> None:
        """Run jobs that share a batch key as one pipeline call; answer each on its own."""
        assert self.link is not None and self.runner is not None
        jobs, inputs = self._with_inputs(self._readable(self._start(batch)))
        if not jobs:
            return
        for job in jobs:
            _maybe_crash(job)
        started = time.perf_counter()
        idle = None if self._device_free_since is None else started - self._device_free_since
        previews: list[Future[None]] = []  # this batch's previews, being encoded and sent
        try:
            # 1. Denoise: the only step on the device.
            _maybe_fail()
            self.stats.batch_started()
            images = self.runner.generate_batch(jobs, self._progress_reporter(jobs, previews),
                                                inputs)
        except Interrupted:
            wait(previews)  # a preview never follows its job's answer, whatever the answer
            for job in jobs:
                log.info("job %s interrupted", job.id, extra=logs.job_fields(job))
                self._answer(job.id, None)
            return
        except (LoraError, PromptSyntaxError) as exc:  # the request is at fault, not the worker
            for job in jobs:
                log.warning("job %s: %s", job.id, exc, extra=logs.job_fields(job))
                self._answer(job.id, protocol.failed(job.id, ErrorCode.INVALID_REQUEST,
                                                     str(exc)))
            return
        except Exception as exc:
            wait(previews)
            log.exception("job(s) %s failed", ", ".join(job.id for job in jobs),
                          extra=logs.job_fields(jobs[0]))
            for job in jobs[1:]:  # one line each, so that grep finds every job's failure
                log.error("job %s failed with the batch of job %s", job.id, jobs[0].id,
                          extra=logs.job_fields(job))
            for job in jobs:  # a job cancelled meanwhile is answered cancelled all the same
                self._answer(job.id, protocol.failed(job.id, ErrorCode.WORKER_ERROR,
                                                     _client_safe(exc)))
            return
        finally:
            self._device_free_since = time.perf_counter()
        self.stats.batch_finished(jobs=len(jobs), images=sum(job.n for job in jobs),
                                  steps=jobs[0].steps,
                                  megapixels=sum(job.work for job in jobs) / jobs[0].steps)
        timings = {"generate_s": self._device_free_since - started, "batch_size": len(jobs)}
        if idle is not None:
            timings["device_idle_s"] = idle
        # 2. Encode and answer off this thread, while the device takes the next batch.
        for job, job_images in zip(jobs, images, strict=True):
            self._encoder.submit(self._encode_and_answer, job, job_images, timings, previews)

    def _readable(self, jobs: list[JobSpec]) -> list[JobSpec]:
        """The jobs whose prompts this model can read; each of the others is answered (weights
        out of range: never from our frontend, which checked them)."""
        assert self.runner is not None
        readable: list[JobSpec] = []
        for job in jobs:
            error = self.runner.prompt_error(job)
            if error is None:
                readable.append(job)
                continue
            log.warning("job %s: %s", job.id, error, extra=logs.job_fields(job))
            self._answer(job.id, protocol.failed(job.id, ErrorCode.INVALID_REQUEST, error))
        return readable

    def _with_inputs(self, jobs: list[JobSpec]) -> tuple[list[JobSpec], dict[str, EditInputs]]:
        """The jobs whose inputs read, with them; each of the others is answered: its frames
        are not the images its spec says (never from our frontend, which checked them)."""
        if not any(job.frames for job in jobs):
            return jobs, {}
        with self._lock:
            frames = {job.id: self._inputs.get(job.id, ()) for job in jobs}
        readable: list[JobSpec] = []
        inputs: dict[str, EditInputs] = {}
        for job in jobs:
            try:
                inputs[job.id] = EditInputs.decode(job, frames[job.id])
            except InvalidInput as exc:
                log.warning("job %s: %s", job.id, exc, extra=logs.job_fields(job))
                self._answer(job.id, protocol.failed(job.id, ErrorCode.INVALID_REQUEST,
                                                     str(exc)))
                continue
            readable.append(job)
        return readable, inputs

    def _progress_reporter(self, jobs: list[JobSpec], previews_sent: list[Future[None]]
                           ) -> StepCallback:
        """Report each step (and previews) to every job still wanted; stop when none is.

        Previews are handed to the preview thread (their futures join ``previews_sent``).
        """
        link = self.link
        assert link is not None
        owners = [(job, index) for job in jobs for index in range(job.n)]

        def on_step(step: int, steps: int, previews: Sequence[Image.Image | None]) -> bool:
            self.stats.step()
            with self._lock:
                cancelled = self._cancelled.intersection(job.id for job in jobs)
            if len(cancelled) == len(jobs):
                return False  # nobody waits: leave the pipeline now
            for job in jobs:
                if job.id not in cancelled:
                    link.send(protocol.encode(MsgType.PROGRESS,
                                              {"job_id": job.id, "step": step, "steps": steps}))
            for (job, index), preview in zip(owners, previews, strict=False):
                if preview is not None and job.id not in cancelled:
                    previews_sent.append(self._previewer.submit(
                        self._send_preview, job, index, step, steps, preview))
            return True

        return on_step

    def _send_preview(self, job: JobSpec, index: int, step: int, steps: int,
                      preview: Image.Image) -> None:
        """Encode one preview and send it, unless its job was answered or cancelled
        meanwhile (the preview thread)."""
        assert self.link is not None
        with self._lock:
            if job.id not in self._held or job.id in self._cancelled:
                return
        try:
            data = encode_image(preview, job.output_format, PREVIEW_QUALITY)
            self.link.send(protocol.encode(
                MsgType.PROGRESS,
                {"job_id": job.id, "step": step, "steps": steps, "image_index": index,
                 "preview_format": job.output_format}, [data]))
        except Exception:  # a preview is a glimpse: losing one must not cost the job
            log.exception("job %s: a preview failed", job.id, extra=logs.job_fields(job))

    def _encode_and_answer(self, job: JobSpec, images: list[Image.Image],
                           timings: dict[str, float],
                           previews: list[Future[None]] | None = None) -> None:
        """Encode one job's images and send its RESULT (the encoder thread), after the
        batch's previews: a preview never follows its image."""
        if previews:
            wait(previews)
        if self._is_cancelled(job.id):
            self._answer(job.id, None)  # cancelled while its batch ran: skip the encoding
            return
        try:
            started = time.perf_counter()
            payloads = [encode_image(img, job.output_format, job.output_compression,
                                     metadata=self._metadata(job, seed),
                                     marking=self.config.marking)
                        for img, seed in zip(images, job.seeds, strict=True)]
            infos = [ImageInfo(seed=seed, width=img.width, height=img.height,
                               format=job.output_format)
                     for seed, img in zip(job.seeds, images, strict=True)]
            timings = {**timings, "encode_s": time.perf_counter() - started}
            frames = protocol.result(job.id, infos, payloads, timings=timings,
                                     worker_id=self.worker_id,
                                     warnings=self._prompt_warnings(job))
        except Exception as exc:  # an encoding failure answers the job, never kills the worker
            log.exception("job %s failed while encoding", job.id, extra=logs.job_fields(job))
            self._answer(job.id, protocol.failed(job.id, ErrorCode.WORKER_ERROR,
                                                 _client_safe(exc)))
            return
        if not self._answer(job.id, frames):
            log.info("job %s cancelled while its images were encoded", job.id,
                     extra=logs.job_fields(job))
            return
        log.info("job %s: %d image(s) %dx%d, %d steps, batch of %d, in %.2f s", job.id,
                 job.n, job.width, job.height, job.steps, timings["batch_size"],
                 timings["generate_s"], extra=logs.job_fields(job))

    def _prompt_warnings(self, job: JobSpec) -> list[str]:
        """The runner's warnings for ``job`` (a prompt cut short); none from one that has
        none to give, or when working them out fails: they are notes, not the job."""
        warn = getattr(self.runner, "prompt_warnings", None)
        if warn is None:
            return []
        try:
            return list(warn(job))
        except Exception:
            log.exception("job %s: could not check how its prompt was read", job.id,
                          extra=logs.job_fields(job))
            return []

    def _metadata(self, job: JobSpec, seed: int) -> ImageMetadata:
        """What the image of ``seed`` says about itself: AI-made always, how when allowed."""
        return ImageMetadata(Generation.of(job, seed) if self.config.image_metadata else None,
                             model=job.model)


def _maybe_crash(job: JobSpec) -> None:
    crash_on = os.environ.get(CRASH_PROMPT_ENV)
    if crash_on and crash_on in job.prompt:
        log.error("fault injection: crashing on job %s", job.id)
        os._exit(70)


def _maybe_fail() -> None:
    if os.environ.get(FAIL_EVERY_JOB_ENV):
        raise RuntimeError("fault injection: the device is broken")


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"]+")


def _client_safe(exc: BaseException) -> str:
    """A one-line account of a failure, with file paths removed: clients never see paths."""
    text = _PATH.sub("<path>", str(exc).splitlines()[0] if str(exc) else "")[:300]
    return f"generation failed: {type(exc).__name__}" + (f": {text}" if text else "")
