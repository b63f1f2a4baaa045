"""What an edit request becomes: img2img or inpainting, at which size, strength and inputs.

The rules a client sees, in one place:

- a model edits only if every worker serving it announced so (``ModelSpec.modes``); a model
  that cannot is a 400 naming it, as is a mask for a model that cannot inpaint;
- no mask: img2img. A mask: inpainting of the first image. No mask, but a first image with
  fully transparent pixels: those are the mask (OpenAI's dall-e-2 rule);
- several images only for a model that takes references (``max_inputs``: FLUX.2 Klein); one
  image, and one only, for inpainting;
- the size is the first image's own, scaled (never cropped) to the model's limits, with a
  warning when that changed it, unless the request names a size: then every input is resized
  to it;
- ``strength`` defaults to 0.75 for img2img (recognisably the input) and 1.0 for inpainting
  (the masked area made anew); a model that takes references has none, and a strength that
  would run no step at all is refused with the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from PIL import Image

from gpu_worker.models import ModelSpec
from http_frontend import edit_inputs, schema
from http_frontend.edit_requests import EditUpload
from http_frontend.errors import invalid

EDIT_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0


@dataclass(frozen=True)
class EditPlan:
    request: schema.ImageRequest  # with the size the edit runs at
    images: tuple[Image.Image, ...]
    mask: Image.Image | None
    strength: float | None  # None: the model takes references, the whole schedule runs
    warnings: tuple[str, ...] = ()

    @classmethod
    def make(cls, request: schema.ImageRequest, spec: ModelSpec, upload: EditUpload
             ) -> EditPlan:
        if "edit" not in spec.modes:
            raise invalid("model", f"{spec.name} cannot edit images; ask /v1/models for the "
                                   f"models whose capabilities include 'edit'",
                          "unsupported_value")
        images = tuple(edit_inputs.read_image(data, param) for param, data in upload.images)
        first = images[0]
        mask = edit_inputs.read_mask(upload.mask[1], first.size, upload.mask[0]) \
            if upload.mask is not None else edit_inputs.mask_from_alpha(first)
        _check_inputs(spec, images, mask, upload)
        warnings: list[str] = []
        request = _sized(request, spec, first.size, warnings)
        strength = _strength(request, spec, mask is not None, warnings)
        return cls(request, images, mask, strength, tuple(warnings))

    def check_steps(self, steps: int, spec: ModelSpec) -> None:
        """Refuse a strength so low that ``steps`` would run none of them."""
        if self.strength is not None and spec.steps_run(steps, self.strength) < 1:
            needed = 1 / steps
            raise invalid("strength", f"with {steps} steps, strength {self.strength:g} runs "
                                      f"no step on {spec.name}; raise 'strength' to at least "
                                      f"{needed:.2g} or 'steps'")

    def frames(self, width: int, height: int) -> tuple[bytes, ...]:
        """The frames the job travels with: each image, then the mask, at width x height."""
        frames = [edit_inputs.prepare_input(image, width, height) for image in self.images]
        if self.mask is not None:
            frames.append(edit_inputs.prepare_mask(self.mask, width, height))
        return tuple(frames)


def _check_inputs(spec: ModelSpec, images: tuple[Image.Image, ...], mask: Image.Image | None,
                  upload: EditUpload) -> None:
    param = upload.images[-1][0]
    if mask is not None and "inpaint" not in spec.modes:
        raise invalid(upload.mask[0] if upload.mask else "image",
                      f"{spec.name} cannot inpaint (edit under a mask); send the image "
                      f"without a mask (or transparency) to edit all of it", "unsupported_value")
    if mask is not None and len(images) > 1:
        raise invalid(param, "inpainting takes one image: the mask applies to the first; "
                             "send it alone")
    if len(images) > spec.max_inputs:
        takes = "one image" if spec.max_inputs == 1 else f"at most {spec.max_inputs} images"
        raise invalid(param, f"{spec.name} takes {takes} to edit; got {len(images)}")


def _sized(request: schema.ImageRequest, spec: ModelSpec, size: tuple[int, int],
           warnings: list[str]) -> schema.ImageRequest:
    """The request at the size the edit runs at: the one it names, else the input's own."""
    if request.size != "auto" or request.width is not None or request.height is not None:
        return request
    width, height, warning = edit_inputs.fit_edit_size(size[0], size[1], spec)
    if warning:
        warnings.append(warning)
    return dataclasses.replace(request, size=f"{width}x{height}")


def _strength(request: schema.ImageRequest, spec: ModelSpec, masked: bool,
              warnings: list[str]) -> float | None:
    if spec.edit_by_reference and not masked:
        if request.strength is not None:
            warnings.append(f"{spec.name} edits with its input images as references and "
                            f"takes no strength; 'strength' was ignored")
        return None
    if request.strength is not None:
        return request.strength
    return INPAINT_STRENGTH if masked else EDIT_STRENGTH
