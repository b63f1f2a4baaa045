"""Load a diffusers pipeline for one model on one device, and run jobs on it."""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.models import ModelSpec

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], bool]  # (step done, steps) -> keep going?


class Interrupted(Exception):
    """The job was cancelled between denoising steps."""


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    device: str = "cpu"
    cache_dir: str | None = None
    threads: int | None = None  # torch threads on CPU; None keeps torch's default
    offload: bool = False
    compile: bool = False


def model_source(spec: ModelSpec, cache_dir: str | None) -> str:
    """What from_pretrained loads: the tiny model's cache dir, a repo id or a directory."""
    if spec.name == models.TINY:
        from gpu_worker.tiny import ensure_tiny_pipeline
        return str(ensure_tiny_pipeline(cache_dir))
    return spec.repo


def _dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if not device.startswith("cuda"):
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.dtype, torch.float32)


class PipelineRunner:
    """One pipeline on one device. Not thread-safe: one thread calls generate()."""

    def __init__(self, spec: ModelSpec, options: LoadOptions) -> None:
        self.spec = spec
        self.options = options
        self.device = options.device
        if options.threads and not self.device.startswith("cuda"):
            torch.set_num_threads(options.threads)
        self.pipe = self._load()
        self._params = set(inspect.signature(self.pipe.__call__).parameters)

    def _load(self) -> Any:
        from diffusers import DiffusionPipeline

        _quiet_libraries()
        source = model_source(self.spec, self.options.cache_dir)
        started = time.perf_counter()
        pipe = DiffusionPipeline.from_pretrained(source, dtype=_dtype(self.spec, self.device))
        if self.device.startswith("cuda"):
            self._optimise_for_cuda(pipe)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s (%s) on %s in %.1f s", self.spec.name, type(pipe).__name__,
                 self.device, time.perf_counter() - started)
        return pipe

    def _optimise_for_cuda(self, pipe: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        if self.options.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        for name in ("unet", "transformer", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
        if self.options.compile:
            denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
            if denoiser is not None:
                denoiser.compile(fullgraph=False)

    def warm_up(self) -> float:
        """Run one small generation so the first real job does not pay for lazy set-up."""
        width, height = self.spec.default_size
        job = JobSpec(id="warm-up", model=self.spec.name, prompt="warm-up", width=width,
                      height=height, steps=min(self.spec.default_steps, 2), seeds=(0,),
                      guidance=self.spec.default_guidance)
        started = time.perf_counter()
        self.generate(job)
        return time.perf_counter() - started

    def generate(self, job: JobSpec, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Make ``job.n`` images, image i from seed ``job.seeds[i]``."""
        kwargs = self._call_kwargs(job)
        if on_step is not None:
            kwargs["callback_on_step_end"] = self._step_callback(job.steps, on_step)
        with torch.inference_mode():
            output = self.pipe(**kwargs)
        if getattr(self.pipe, "_interrupt", False):
            self.pipe._interrupt = False
            raise Interrupted(job.id)
        return list(output.images)

    def _call_kwargs(self, job: JobSpec) -> dict[str, Any]:
        # CPU generators give the same noise for a seed on every device and machine.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        kwargs: dict[str, Any] = {
            "prompt": job.prompt, "width": job.width, "height": job.height,
            "num_inference_steps": job.steps, "num_images_per_prompt": job.n,
            "generator": generators, "output_type": "pil",
        }
        if job.guidance is not None:
            kwargs["guidance_scale"] = job.guidance
        if job.negative_prompt and self.spec.negative_prompt:
            kwargs["negative_prompt"] = job.negative_prompt
        if self.spec.max_sequence_length:
            kwargs["max_sequence_length"] = self.spec.max_sequence_length
        # Pass only what this pipeline's __call__ takes.
        return {k: v for k, v in kwargs.items() if k in self._params}

    def _step_callback(self, steps: int, on_step: StepCallback) -> Callable[..., Any]:
        def callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if not on_step(step + 1, steps):
                pipe._interrupt = True
            return callback_kwargs
        return callback


def _quiet_libraries() -> None:
    """Progress bars and import chatter from diffusers and transformers drown worker logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def cuda_devices() -> list[str]:
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES is honoured by torch)."""
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def describe_device(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({os.cpu_count()} cores)" if device == "cpu" else device
