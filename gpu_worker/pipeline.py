"""Load a diffusers pipeline for one model on one device, and run jobs on it."""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from broker.protocol import JobSpec
from gpu_worker import compiling, models, prompt_syntax
from gpu_worker.editing import EditInputs, EditPipelines, composite, usable_modes
from gpu_worker.loras import AdapterFile, LoraLibrary
from gpu_worker.models import ModelSpec
from gpu_worker.parallel import EXIT_GROUP_BROKEN, Group, ParallelError
from gpu_worker.preview import PreviewMaker, preview_steps
from gpu_worker.prompt_embeds import MAX_TOKENS, PromptEncoder
from gpu_worker.prompts import cut_warnings, truncation_warnings
from gpu_worker.quantize import quantize_denoiser
from gpu_worker.step_cache import AUTO, StepCache, StepCacheSetting

log = logging.getLogger(__name__)

# (steps done, total steps, previews of each image at this step or [], None for an image
# with none) -> keep going?
StepCallback = Callable[[int, int, Sequence[Image.Image | None]], bool]


class Interrupted(Exception):
    """The job was cancelled between denoising steps."""


VAE_TILING_PIXELS = 1536 * 1536


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    device: str = "cpu"
    cache_dir: str | None = None
    threads: int | None = None  # torch threads on CPU; None keeps torch's default
    offload: bool = False
    compile: bool = False
    compile_scope: str = "regional"  # the repeated blocks, or the "full" denoiser
    compile_backend: str = "inductor"  # torch.compile's; tests use "eager" (compiling.py)
    # Sizes the warm-up runs (with --compile: each at batch 1 and 2); () is the model's own.
    warm_up_sizes: tuple[tuple[int, int], ...] = ()
    step_cache: str = AUTO  # gpu_worker/step_cache.py; auto: the family's registry default
    quantize: str = "none"  # the denoiser's weights (gpu_worker/quantize.py)
    lora_dir: Path | None = None  # LoRA adapters this worker can apply (gpu_worker/loras.py)
    lora_repos: tuple[AdapterFile, ...] = ()  # and those of --lora-repo, resolved
    lora_cache: int = 8  # adapters kept in memory at most
    lora_cache_bytes: int = 2 << 30  # and their weights, at most


def model_source(spec: ModelSpec, cache_dir: str | None) -> str:
    """What from_pretrained loads: the tiny model's cache dir, a repo id or a directory."""
    if spec.name == models.TINY:
        from gpu_worker.tiny import ensure_tiny_pipeline
        return str(ensure_tiny_pipeline(cache_dir))
    return spec.repo


def dtype_for(spec: ModelSpec, device: str) -> torch.dtype:
    """The weights' dtype: the spec's on CUDA, float32 elsewhere (CPUs are slow in half)."""
    if not device.startswith("cuda"):
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.dtype, torch.float32)


class PipelineRunner:
    """One pipeline on one device. Not thread-safe: one thread calls generate()."""

    def __init__(self, spec: ModelSpec, options: LoadOptions, *, pipe: Any = None,
                 group: Group | None = None) -> None:
        """Load ``spec``'s pipeline, or wrap ``pipe``, one already built in memory (bench/gpu.py
        builds real-size architectures with random weights); either way it is placed on the
        device with the same settings. In a worker group (gpu_worker/parallel.py) every rank
        builds one, on its own device, and its denoiser is split across the group."""
        self.options = options
        self.group = group
        self.device = group.device if group is not None else options.device
        if options.threads and not self.device.startswith("cuda"):
            torch.set_num_threads(options.threads)
        if (options.lora_dir is not None or options.lora_repos) and options.compile:
            # A compiled denoiser recompiles whenever adapters change, and hot-swapping them
            # into one is not wired here: refused at start rather than slow or wrong later.
            raise ValueError("--compile cannot be used with LoRA adapters yet: choose one")
        self.pipe = self._place(self._load(spec) if pipe is None else pipe)
        if group is not None:
            group.parallelise(self.pipe)
        self.step_cache = StepCache(self.pipe, self._step_cache_setting(spec))
        if group is not None and self.step_cache.enabled:
            # Each rank would decide to skip from its own part of the sequence: one skipping
            # a block another runs leaves them at different collectives.
            raise ParallelError("--step-cache cannot be used with --gpus-per-worker: the "
                                "ranks would decide apart which steps to skip")
        self.compile_log: compiling.CompileLog | None = None
        if options.compile:
            compiling.compile_denoiser(self.pipe, options.compile_scope,
                                       options.compile_backend)
            self.compile_log = compiling.CompileLog()
        self.loras = LoraLibrary(self.pipe, options.lora_dir, repos=options.lora_repos,
                                 max_loaded=options.lora_cache,
                                 max_bytes=options.lora_cache_bytes)
        self._trained_sample_size: int | None = getattr(self.pipe, "default_sample_size", None)
        self.spec = usable_modes(self._fit_spec(spec), self.pipe).with_defaults(
            step_cache=str(self.step_cache.setting) if self.step_cache.enabled else "")
        self.prompt_encoder = PromptEncoder(self.pipe) if self.spec.prompt_weighting else None
        self.edits = EditPipelines(self.pipe, self.spec)
        self.previews = PreviewMaker(self.pipe, self.spec.family, offloaded=options.offload)
        self._preview_failed = False

    # ---------------------------------------------------------------- loading

    def _load(self, spec: ModelSpec) -> Any:
        quiet_libraries()
        import diffusers

        loader = getattr(diffusers, spec.load_as or "DiffusionPipeline")
        source = model_source(spec, self.options.cache_dir)
        dtype = dtype_for(spec, self.device)
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"dtype": dtype, **_extra_components(spec, dtype)}
        if spec.variant and self.device.startswith("cuda"):
            kwargs["variant"] = spec.variant
        pipe = loader.from_pretrained(source, **kwargs)
        log.info("loaded %s (%s) in %.1f s", spec.name, type(pipe).__name__,
                 time.perf_counter() - started)
        return pipe

    def _place(self, pipe: Any) -> Any:
        if self.device.startswith("cuda"):
            self._optimise_for_cuda(pipe)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        quantize_denoiser(pipe, self.options.quantize, self.device,  # before any compiling
                          loras=self.options.lora_dir is not None or bool(self.options.lora_repos))
        return pipe

    def _step_cache_setting(self, spec: ModelSpec) -> StepCacheSetting:
        """--step-cache, or with auto the registry's default for the model's family."""
        text = self.options.step_cache
        return StepCacheSetting.parse(spec.step_cache if text == AUTO else text)

    def _fit_spec(self, spec: ModelSpec) -> ModelSpec:
        """Adjust the spec to the pipeline that actually loaded."""
        loaded = type(self.pipe).__name__
        if spec.family == "generic" and loaded in models.FAMILIES:
            spec = models.for_pipeline(spec.name, loaded)
        elif spec.family == "generic":
            spec = self._defaults_from_signature(spec)
        if spec.resolution_binning and not self._binning_fits():
            # Aspect-ratio bins exist only for the trained resolutions; a miniature or
            # unusual checkpoint must take sizes as asked.
            spec = spec.with_defaults(resolution_binning=False, allowed_sizes=())
        if spec.allowed_sizes and not self._binning_fits():
            spec = spec.with_defaults(allowed_sizes=())
        if spec.prompt_weighting and not PromptEncoder.fits(self.pipe):
            spec = spec.with_defaults(prompt_weighting=False)  # not the CLIP encoders it reads
        if spec.sized_by_area:
            side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
            spec = spec.with_defaults(max_pixels=min(spec.max_pixels, side * side))
            width, height = spec.default_size
            if width * height > spec.max_pixels:  # a smaller checkpoint: its own area
                spec = spec.with_defaults(default_size=(side, side))
        return spec

    def _defaults_from_signature(self, spec: ModelSpec) -> ModelSpec:
        """Defaults for a pipeline class we have no family for, from its __call__."""
        params = inspect.signature(self.pipe.__call__).parameters

        def default(name: str, kinds: tuple[type, ...]) -> Any:
            value = params[name].default if name in params else None
            return value if isinstance(value, kinds) and not isinstance(value, bool) else None

        overrides: dict[str, Any] = {"pipeline": type(self.pipe).__name__,
                                     "negative_prompt": "negative_prompt" in params}
        steps = default("num_inference_steps", (int,))
        if steps:
            overrides["default_steps"] = steps
        guidance = default("guidance_scale", (int, float))
        overrides["default_guidance"] = float(guidance) if guidance is not None else None
        sample_size = getattr(self.pipe, "default_sample_size", None)
        scale = getattr(self.pipe, "vae_scale_factor", None)
        if isinstance(sample_size, int) and isinstance(scale, int):
            overrides["default_size"] = (sample_size * scale, sample_size * scale)
        return spec.with_defaults(**overrides)

    def _binning_fits(self) -> bool:
        denoiser = getattr(self.pipe, "transformer", None) or getattr(self.pipe, "unet", None)
        sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        if isinstance(sample_size, (tuple, list)):
            sample_size = sample_size[0]
        return isinstance(sample_size, int) and sample_size * scale in models.BINNED_SIZES

    def _optimise_for_cuda(self, pipe: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        if self.options.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        for module in (denoiser, getattr(pipe, "vae", None)):
            if module is not None:
                module.to(memory_format=torch.channels_last)
        if self.options.lora_dir is not None or self.options.lora_repos:
            # A fused QKV layer has no LoRA: diffusers would load adapters around it, silently
            # leaving out their q, k and v parts (gpu_worker/loras.py).
            log.info("QKV projections left unfused: this worker applies LoRA adapters")
        elif denoiser is not None and hasattr(denoiser, "fuse_qkv_projections"):
            try:
                denoiser.fuse_qkv_projections()
            except Exception as exc:  # some attention processors cannot be fused
                log.info("fused QKV not available for %s: %s", type(denoiser).__name__, exc)

    # ---------------------------------------------------------------- running

    def warm_up(self) -> float:
        """Run small generations so the first real jobs do not pay for lazy set-up: one, or
        with --compile each warm-up size at batch sizes 1 and 2. dynamo makes a dimension
        dynamic the second time it changes, so larger batches reuse the second's code, and
        after two sizes so does any size."""
        sizes = self.warm_up_sizes()
        shapes = [(size, batch) for size in sizes for batch in (1, 2)] \
            if self.compile_log is not None else [(sizes[0], 1)]
        started = time.perf_counter()
        for (width, height), batch in shapes:
            job = JobSpec(id="warm-up", model=self.spec.name, prompt="warm-up", width=width,
                          height=height, steps=min(self.spec.default_steps, 2),
                          seeds=tuple(range(batch)), guidance=self.spec.default_guidance)
            self.generate(job)
        if self.compile_log is not None:
            log.info("warm-up ran %s at batch sizes 1 and 2; a size it did not run may compile "
                     "on its first job (logged; from the second size on, dynamo compiles for "
                     "any size)", ", ".join(f"{w}x{h}" for w, h in sizes))
        return time.perf_counter() - started

    def warm_up_sizes(self) -> list[tuple[int, int]]:
        """--warm-up-size, else the only sizes the model takes, else its default size."""
        return list(self.options.warm_up_sizes or self.spec.allowed_sizes
                    or (self.spec.default_size,))

    def prompt_warnings(self, job: JobSpec) -> list[str]:
        """What the client should know of how its prompts were read (cut short by CLIP)."""
        if self.prompt_encoder is not None:  # in chunks, up to its own limit
            return cut_warnings(job, model=self.spec.name, tokens=self.prompt_encoder.tokens,
                                limit=MAX_TOKENS, reader="CLIP, in chunks of 75")
        return truncation_warnings(self.pipe, job, model=self.spec.name,
                                   long_encoder=self.spec.max_sequence_length is not None)

    def prompt_error(self, job: JobSpec) -> str | None:
        """Why ``job``'s prompts cannot be read here (weights out of range: a frontend that
        did not check them), or None. Checked per job, before its batch runs, so that one
        job's prompt never fails the others."""
        if self.prompt_encoder is None:
            return None
        for text in (job.prompt, job.negative_prompt or ""):
            try:
                prompt_syntax.check(text)
            except prompt_syntax.PromptSyntaxError as exc:
                return str(exc)
        return None

    def total_steps(self, job: JobSpec) -> int:
        """Denoising steps the job reports progress for (both stages of a two-stage model;
        of an edit, those its strength runs)."""
        return self.spec.steps_run(job.steps, job.strength if job.inputs else None) \
            + self.spec.decoder_steps

    def generate(self, job: JobSpec, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Make ``job.n`` images, image i from seed ``job.seeds[i]``.

        ``on_step(done, total, previews)`` runs after every denoising step, with previews at
        ``job.previews`` steps (the first, then spread: gpu_worker.preview.preview_steps);
        returning False interrupts the job there (Interrupted is raised).
        """
        return self.generate_batch([job], on_step)[0]

    def generate_batch(self, jobs: list[JobSpec], on_step: StepCallback | None = None,
                       inputs: Mapping[str, EditInputs] | None = None
                       ) -> list[list[Image.Image]]:
        """Run jobs that share a batch key as one pipeline call; the images of each job.

        Every image keeps its own generator, so its seed decides its noise whatever else is
        in the batch (see docs/performance.md for how close batched pixels are to solo ones).
        Edits take their decoded ``inputs`` by job id.
        """
        if self.group is None:
            return self.run_call(jobs, inputs, on_step)
        self.group.announce(jobs, inputs or {})
        try:
            return self.run_call(jobs, inputs, on_step)
        except Interrupted:
            raise  # agreed by every rank at the same step
        except Exception:
            # The other ranks may be waiting at a collective this rank will never reach.
            log.exception("a call failed in this worker's group: the group ends, to be "
                          "started again")
            os._exit(EXIT_GROUP_BROKEN)

    def run_call(self, jobs: list[JobSpec], inputs: Mapping[str, EditInputs] | None = None,
                 on_step: StepCallback | None = None) -> list[list[Image.Image]]:
        """generate_batch's work on this rank: what a group's followers run as told."""
        if on_step is None and self.group is not None:
            on_step = _go_on  # every rank asks the leader after every step
        head = jobs[0]
        if head.mode == "edit" and self.spec.edit_by_reference and len(jobs) > 1:
            return self._in_turn(jobs, [[job] for job in jobs], on_step, inputs or {})
        self.loras.apply(head.loras)  # the batch key makes every job's adapters the same
        pipe = self.edits.for_mode(head.mode)
        signature = inspect.signature(pipe.__call__).parameters
        if self.prompt_encoder is not None and len(jobs) > 1:
            groups = self.prompt_encoder.groups(jobs, guided=self._guided(head, signature))
            if len(groups) > 1:  # prompts of different lengths would pad each other
                return self._in_turn(jobs, groups, on_step, inputs or {})
        params = set(signature)
        kwargs = self._call_kwargs(jobs, params, per_image=head.mode != "generate")
        if self.prompt_encoder is not None:
            kwargs.update(self._prompt_embeds(jobs, kwargs, self._guided(head, signature)))
        if head.inputs:
            kwargs.update(self._edit_kwargs(jobs, inputs or {}, params))
        if on_step is not None:
            kwargs.update(self._progress_kwargs(head, on_step, params))
        self._tile_vae_for(head)
        if self.spec.sized_by_area:
            self._set_area(head)
        self.step_cache.prepare(head)
        with torch.inference_mode(), self._compile_watch(jobs):
            images = to_pil(pipe(**kwargs).images)
        split, start = [], 0
        for job in jobs:
            made = [self._fit_output(image, job) for image in images[start:start + job.n]]
            if job.mask:
                made = [composite(image, (inputs or {})[job.id]) for image in made]
            split.append(made)
            start += job.n
        return split

    def _compile_watch(self, jobs: list[JobSpec]) -> AbstractContextManager[None]:
        """With --compile, logs a call that compiled, with its shape."""
        if self.compile_log is None:
            return nullcontext()
        head, images = jobs[0], sum(job.n for job in jobs)
        return self.compile_log.watch(f"{head.width}x{head.height}, {images} image(s), "
                                      f"{head.steps} steps, {head.mode}")

    def _in_turn(self, jobs: list[JobSpec], groups: list[list[JobSpec]],
                 on_step: StepCallback | None, inputs: Mapping[str, EditInputs]
                 ) -> list[list[Image.Image]]:
        """A batch that cannot be one pipeline call, one call per group of its jobs: Klein's
        references are the whole call's, so its edits go one by one; prompts of different
        lengths would pad each other. Progress counts across the calls, and each preview
        goes where its image is in the whole batch."""
        first_image, images_before = {}, 0
        for job in jobs:
            first_image[job.id] = images_before
            images_before += job.n
        made: dict[str, list[Image.Image]] = {}
        for index, group in enumerate(groups):
            places = [first_image[job.id] + i for job in group for i in range(job.n)]

            def step(done: int, total: int, previews: Sequence[Image.Image | None],
                     offset: int = index, places: list[int] = places) -> bool:
                shifted: list[Image.Image | None] = []
                if previews:
                    shifted = [None] * (max(places) + 1)
                    for place, preview in zip(places, previews, strict=False):
                        shifted[place] = preview
                return on_step is None or on_step(offset * total + done, len(groups) * total,
                                                  shifted)
            for job, images in zip(group, self.run_call(group, inputs, step), strict=True):
                made[job.id] = images
        return [made[job.id] for job in jobs]

    def _guided(self, job: JobSpec, signature: Mapping[str, inspect.Parameter]) -> bool:
        """Whether the call runs classifier-free guidance, so needs negative embeddings: the
        job's guidance, else the pipeline's own default (the batch key makes it the batch's)."""
        guidance: Any = job.guidance
        if guidance is None and self.spec.guidance_param in signature:
            guidance = signature[self.spec.guidance_param].default
        return isinstance(guidance, (int, float)) and guidance > 1

    def _prompt_embeds(self, jobs: list[JobSpec], kwargs: dict[str, Any],
                       guided: bool) -> dict[str, Any]:
        """The prompts as embeddings (weights, long prompts), one row per image: instead of
        the prompt texts ``kwargs`` holds."""
        assert self.prompt_encoder is not None
        for text in ("prompt", "negative_prompt"):
            kwargs.pop(text, None)
        return {"num_images_per_prompt": 1, **self.prompt_encoder.call_kwargs(
            jobs, [job.negative_prompt for job in jobs], guided=guided)}

    def _edit_kwargs(self, jobs: list[JobSpec], inputs: Mapping[str, EditInputs],
                     params: set[str]) -> dict[str, Any]:
        """The input images (one per image made: each then keeps its own seed), the mask,
        the strength."""
        head = jobs[0]
        if head.mode == "edit" and self.spec.edit_by_reference:
            return {"image": list(inputs[head.id].images)}  # references, for the whole call
        kwargs: dict[str, Any] = {
            "image": [inputs[job.id].images[0] for job in jobs for _ in job.seeds]}
        if head.mask:
            kwargs["mask_image"] = [inputs[job.id].mask for job in jobs for _ in job.seeds]
        if head.strength is not None:
            kwargs["strength"] = head.strength
        return kwargs

    def _fit_output(self, image: Image.Image, job: JobSpec) -> Image.Image:
        """The job's size, whatever the pipeline made: some edit pipelines size their output
        from their input or round it (Klein's inpainting caps it at a megapixel)."""
        size = (job.width, job.height)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def _call_kwargs(self, jobs: list[JobSpec], params: set[str], *,
                     per_image: bool = False) -> dict[str, Any]:
        """The pipeline call's arguments that ``params`` (its __call__'s) takes. ``per_image``:
        one prompt per image even for one job, to go with one input image per image."""
        spec, job = self.spec, jobs[0]  # the batch key makes every shared setting equal
        # CPU generators give the same noise for a seed on every device and machine.
        generators = [torch.Generator("cpu").manual_seed(seed) for j in jobs for seed in j.seeds]
        kwargs: dict[str, Any] = {
            "width": job.width, "height": job.height, "num_inference_steps": job.steps,
            "generator": generators, "output_type": self._output_type(),
        }
        if len(jobs) == 1 and not per_image:
            kwargs.update(prompt=job.prompt, num_images_per_prompt=job.n)
        else:  # one prompt per image, so jobs with different n share the call
            kwargs.update(prompt=[j.prompt for j in jobs for _ in j.seeds],
                          num_images_per_prompt=1)
        if job.guidance is not None:
            kwargs[spec.guidance_param] = job.guidance
        negatives = [j.negative_prompt or spec.default_negative_prompt or "" for j in jobs]
        if spec.negative_prompt and any(negatives):
            kwargs["negative_prompt"] = negatives[0] if len(jobs) == 1 and not per_image else [
                negative for j, negative in zip(jobs, negatives, strict=True) for _ in j.seeds]
        if spec.max_sequence_length:
            kwargs["max_sequence_length"] = spec.max_sequence_length
        # Binning resizes to a trained bucket and back: an edit's input is already its size.
        kwargs["use_resolution_binning"] = spec.resolution_binning and not job.inputs
        # Keep the prompt as written: caption cleaning (PixArt, Lumina-Next) rewrites it and
        # needs bs4 and ftfy, warning on every call without them.
        kwargs["clean_caption"] = False
        if job.steps != 2:
            # Sana Sprint's default intermediate timestep fits only its trained 2-step schedule.
            kwargs["intermediate_timesteps"] = None
        if spec.decoder_steps:  # two stages: our steps drive the prior, the decoder's are fixed
            kwargs["prior_num_inference_steps"] = job.steps
            kwargs["num_inference_steps"] = spec.decoder_steps
        # Pass only what this pipeline's __call__ takes.
        return {k: v for k, v in kwargs.items() if k in params}

    def _output_type(self) -> str:
        """Tensors from the families we know, so the conversion to 8 bits runs on the device
        (to_pil); diffusers' own PIL output from any other pipeline, because some (Kandinsky,
        DeepFloyd IF) post-process only their "pil" and "np" outputs."""
        return "pil" if self.spec.family == "generic" else "pt"

    def _progress_kwargs(self, job: JobSpec, on_step: StepCallback, params: set[str]
                         ) -> dict[str, Any]:
        """Hook ``on_step`` into the pipeline's step callbacks; a False answer interrupts."""
        total = self.total_steps(job)
        with_previews = preview_steps(total, job.previews)
        done = 0
        last = time.perf_counter()

        def step(latents: Any) -> None:
            nonlocal done, last
            done += 1
            # The denoising step's own time: previews and reporting come after this point.
            step_seconds = time.perf_counter() - last
            previews = (self._previews(latents, job, first=done == 1,
                                       step_seconds=step_seconds)
                        if done in with_previews and self._leads() else [])
            wanted = on_step(min(done, total), total, previews)
            if self.group is not None:
                wanted = self.group.agree(wanted)
            last = time.perf_counter()
            if not wanted:
                # Raising leaves the pipeline at once; no VAE decode for an abandoned job.
                raise Interrupted()

        def on_step_end(pipe: Any, i: int, t: Any,
                        callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            step(callback_kwargs.get("latents"))
            return callback_kwargs

        if self.spec.legacy_callback or "callback_on_step_end" not in params:
            if "callback" not in params:
                return {}
            return {"callback": lambda i, t, latents: step(latents), "callback_steps": 1}
        hooks: dict[str, Any] = {"callback_on_step_end": on_step_end}
        if "prior_callback_on_step_end" in params:
            hooks["prior_callback_on_step_end"] = on_step_end
        return hooks

    def _leads(self) -> bool:
        """Whether this rank answers for the call: alone, or a group's leader."""
        return self.group is None or self.group.leader

    def _previews(self, latents: Any, job: JobSpec, *, first: bool,
                  step_seconds: float) -> list[Image.Image]:
        """This step's previews; none when making them fails: a preview never costs a job."""
        try:
            return self.previews.make(latents, job.width, job.height, first=first,
                                      step_seconds=step_seconds)
        except Exception:
            if not self._preview_failed:
                self._preview_failed = True
                log.exception("previews failed (logged once); the jobs go on without them")
            return []

    def _set_area(self, job: JobSpec) -> None:
        """Make an area-sized pipeline (HiDream) produce exactly width x height."""
        side = math.ceil(math.sqrt(job.width * job.height) / self.pipe.vae_scale_factor)
        self.pipe.default_sample_size = min(side, self._trained_sample_size or side)

    def _tile_vae_for(self, job: JobSpec) -> None:
        """Decode large images in tiles: a 2K+ decode in one piece can exhaust GPU memory."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None or not hasattr(vae, "enable_tiling"):
            return
        if job.width * job.height > VAE_TILING_PIXELS:
            vae.enable_tiling()
        else:
            vae.disable_tiling()


def _go_on(done: int, total: int, previews: Sequence[Image.Image | None]) -> bool:
    return True


def to_pil(images: Any) -> list[Image.Image]:
    """A pipeline's output_type="pt" images (N, C, H, W in [0, 1]) as PIL images.

    diffusers' own "pil" output converts on the host in numpy, float32 pixel by pixel: for 8
    images of 1024² that is a quarter of a second of CPU during which the GPU waits. Here the
    same arithmetic (float32, x255, round half to even, to uint8) and the transpose run where
    the images are, and only 8-bit pixels cross to the host: the bytes are the same as
    diffusers' "pil" (docs/performance.md has the figures).
    """
    if not isinstance(images, torch.Tensor):
        return list(images)  # a pipeline that ignores output_type and answers PIL anyway
    n, channels, height, width = images.shape
    # One pass to float32 and channels last (rows PIL takes as they are), then in place.
    scaled = torch.empty((n, height, width, channels), dtype=torch.float32, device=images.device)
    scaled.copy_(images.permute(0, 2, 3, 1)).mul_(255).round_()
    pixels = scaled.to(torch.uint8).cpu().numpy()
    if channels == 1:  # grey: an (H, W) array becomes mode "L", as diffusers does
        pixels = pixels[..., 0]
    return [Image.fromarray(p) for p in pixels]


def _extra_components(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """Components a repo does not ship (HiDream's Llama encoder), loaded from their own repo."""
    if not spec.extra_components:
        return {}
    import transformers

    loaded: dict[str, Any] = {}
    for kwarg, repo, class_name in spec.extra_components:
        cls = getattr(transformers, class_name)
        extra = {} if "Tokenizer" in class_name else {"dtype": dtype}
        loaded[kwarg] = cls.from_pretrained(repo, **extra)
    return loaded


def quiet_libraries() -> None:
    """Progress bars and import chatter from diffusers and transformers drown worker logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def route_library_logs() -> None:
    """diffusers and transformers print through stderr handlers of their own: send their
    records through the root logger's, so that every line is JSON."""
    import diffusers
    import transformers

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
    # torch prints its own warnings (torch.compile's, and those that importing torchao
    # raises) through a handler of its own on the "torch" logger: through the root's instead.
    torch_logger = logging.getLogger("torch")
    for handler in list(torch_logger.handlers):
        torch_logger.removeHandler(handler)
    torch_logger.propagate = True
    # A model's first download draws huggingface_hub's progress bars on stderr: not JSON.
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()
