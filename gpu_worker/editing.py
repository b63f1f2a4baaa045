"""Editing on a loaded pipeline: img2img and inpainting, made from its own components.

diffusers' ``from_pipe`` builds a family's img2img or inpainting pipeline around the modules
the text-to-image pipeline already holds: the same objects, so editing costs no memory and no
second load (about 10 ms, once per mode). They share the scheduler too, which is safe because
one thread runs one pipeline call at a time. Which classes a family has, and its quirks, are in
its registry entry (``ModelSpec.edit_pipeline``, ``inpaint_pipeline``, ``edit_by_reference``,
``strength_floors``); what the installed diffusers and the loaded checkpoint cannot do is found
here at load time, so a worker never announces a mode it would fail at.

An edit's inputs arrive as PNG frames already fitted by the frontend to the job's size
(http_frontend/edit_inputs.py); a worker still checks them, since a frame is only bytes.
Inpainting puts the input's own pixels back outside the mask after decoding (``composite``):
the VAE round trip would otherwise shift colours and soften everything the user did not mark.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageChops, ImageFilter

from broker.protocol import JobSpec
from gpu_worker.models import ModelSpec

log = logging.getLogger(__name__)

FEATHER_FRACTION = 1 / 256  # the blend at a mask's edge, as a share of the image's short side


class InvalidInput(ValueError):
    """An edit's input frames are not what its job says: the job fails, the worker goes on."""


@dataclass(frozen=True)
class EditInputs:
    """One job's decoded inputs: its images (RGB, at the job's size) and mask (L, 255: edit)."""

    images: tuple[Image.Image, ...]
    mask: Image.Image | None = None

    @classmethod
    def decode(cls, job: JobSpec, frames: Sequence[Any]) -> EditInputs:
        """Read ``job``'s frames: ``job.inputs`` images, then its mask when ``job.mask``."""
        if len(frames) != job.frames:
            raise InvalidInput(f"job {job.id} came with {len(frames)} input frames, "
                               f"not {job.frames}")
        size = (job.width, job.height)
        images = tuple(_read(frame, size, "RGB") for frame in frames[:job.inputs])
        mask = _read(frames[job.inputs], size, "L") if job.mask else None
        return cls(images, mask)


def _read(frame: Any, size: tuple[int, int], mode: str) -> Image.Image:
    """A frame as an image of ``size``; the frontend sends exactly that, so anything larger
    is refused before its pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(frame)))
            if image.width * image.height > 4 * size[0] * size[1]:
                raise InvalidInput(f"an input image of {image.width}x{image.height} for a "
                                   f"{size[0]}x{size[1]} job")
            image.load()
    except InvalidInput:
        raise
    except Exception as exc:  # PIL raises many types for a bad file
        raise InvalidInput(f"an input image cannot be read: {type(exc).__name__}") from None
    converted = image.convert(mode)
    if converted.size != size:  # never from our frontend; a guard against diffusers stretching
        converted = converted.resize(size, Image.Resampling.LANCZOS)
    return converted


def usable_modes(spec: ModelSpec, pipe: Any) -> ModelSpec:
    """``spec`` without the edit modes this diffusers or this checkpoint cannot run."""
    edit, inpaint = spec.edit_pipeline, spec.inpaint_pipeline
    if edit and not _exists(edit):
        edit = ""
    if inpaint and not (_exists(inpaint) and _inpaint_fits(inpaint, pipe)):
        inpaint = ""
    if (edit, inpaint) != (spec.edit_pipeline, spec.inpaint_pipeline):
        log.info("%s edits with %s and inpaints with %s here", spec.name, edit or "nothing",
                 inpaint or "nothing")
    return spec.with_defaults(edit_pipeline=edit, inpaint_pipeline=inpaint)


def _exists(name: str) -> bool:
    import diffusers

    return hasattr(diffusers, name)


def _inpaint_fits(name: str, pipe: Any) -> bool:
    """SD3's inpainting blends latents and needs a 16-channel transformer (or a 33-channel
    inpainting one); a miniature with 4 channels cannot."""
    if name != "StableDiffusion3InpaintPipeline":
        return True
    channels = getattr(getattr(getattr(pipe, "transformer", None), "config", None),
                       "in_channels", None)
    return channels in (16, 33)


class EditPipelines:
    """The img2img and inpainting pipelines of one loaded pipeline, made on first use."""

    def __init__(self, pipe: Any, spec: ModelSpec) -> None:
        self._pipe = pipe
        self._spec = spec
        self._made: dict[str, Any] = {}

    def for_mode(self, mode: str) -> Any:
        """The pipeline that runs ``mode`` (``generate``, ``edit`` or ``inpaint``)."""
        if mode == "generate":
            return self._pipe
        if mode not in self._made:
            self._made[mode] = self._make(mode)
        return self._made[mode]

    def _make(self, mode: str) -> Any:
        import diffusers

        name = self._spec.edit_pipeline if mode == "edit" else self._spec.inpaint_pipeline
        if not name:
            raise InvalidInput(f"{self._spec.name} cannot {mode} images")
        if name == type(self._pipe).__name__:
            return self._pipe  # it takes the images itself (Klein's references)
        if name == "ChromaInpaintPipeline" and \
                "guidance_embeds" not in self._pipe.transformer.config:
            # diffusers 0.42 reads this key, which Chroma's transformer config lacks; the
            # value it computes from it is never used.
            self._pipe.transformer.register_to_config(guidance_embeds=False)
        # dtype= is not optional: without it from_pipe casts the new pipeline to float32, and
        # its modules are the text-to-image pipeline's own, cast in place with it.
        made = getattr(diffusers, name).from_pipe(self._pipe, dtype=self._pipe.dtype)
        made.set_progress_bar_config(disable=True)  # not carried over
        return made


def composite(output: Image.Image, inputs: EditInputs) -> Image.Image:
    """Inpainting's output with the input's own pixels wherever the mask says keep.

    Outside the mask every pixel is the input's, exactly. Just inside its edge the two are
    blended over a few pixels (FEATHER_FRACTION of the short side), so the edit does not end
    on a hard seam; deeper inside, the output is the pipeline's.
    """
    assert inputs.mask is not None
    original = inputs.images[0]
    if output.size != original.size:
        output = output.resize(original.size, Image.Resampling.LANCZOS)
    mask = inputs.mask
    radius = max(1, round(min(mask.size) * FEATHER_FRACTION))
    # Shrink the mask (blur, keep what stayed solid: about two radii in from the edge), blur
    # it back out, and never above the mask itself (darker: the minimum of the two): a ramp
    # that rises inside the edge, with nothing outside it changed. Blurs cost the same at
    # any radius, unlike a rank filter.
    inner = mask.filter(ImageFilter.GaussianBlur(radius)).point(lambda v: 255 if v >= 254 else 0)
    ramp = ImageChops.darker(mask, inner.filter(ImageFilter.GaussianBlur(radius)))
    return Image.composite(output.convert("RGB"), original, ramp)
