"""Image editing (img2img and inpainting) on every pipeline family that has it, served by a
real worker and asked for through the official `openai` client, as a user would.

Each family's tiny random-weight pipeline is built, saved and served by a real
`python -m gpu_worker --model <dir>` against a real broker and frontend: test_families.py's
`head` and `served_family` fixtures, parametrized here with the families that edit. Their
random VAEs blur most inputs towards similar latents, so comparisons measure how far apart
two outputs are (mean absolute difference, 0-255) with thresholds well under what was seen.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import openai
import pytest
from PIL import Image

from gpu_worker import models
from tests.e2e.test_image_edits import decoded, openai_mask, picture, png_file
from tests.gpu_worker import test_families
from tests.gpu_worker.test_families import Head, announced_spec, family_module, size_for
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow

# test_families' fixtures: a broker and frontend for the module, and one worker per family.
head = test_families.head
family_workers = test_families.family_workers
served_family = test_families.served_family

Served = tuple[str, ModuleType]  # served_family: the model's name, its family module
STEPS = 4  # strength 0.25 runs 1 of them, 0.5 runs 2 and 0.75 runs 3, on every family
ALL = ("generate", "edit", "inpaint")
IMG2IMG = ("generate", "edit")
# What /v1/models must say each family can do (test_families' module names).
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "sd": ALL,
    "sdxl": ALL,
    # SD3's inpainting blends latents and needs a 16-channel transformer (33 for an
    # inpainting one), as the real SD3/3.5 have. The tiny fixture's has 4 channels, so the
    # worker finds at load time that it would fail (editing.usable_modes) and never announces
    # inpaint for it.
    "sd3": IMG2IMG,
    "flux": ALL,
    "flux2_klein": ALL,
    "chroma": ALL,
    "sana_sprint": IMG2IMG,
    "qwen_image": ALL,
    "z_image": ALL,
    "kolors": IMG2IMG,
}
NO_EDITS = "sana"  # cheap, and its sibling sana-sprint edits
STRENGTH_FAMILIES = [f for f in CAPABILITIES if f != "flux2_klein"]
INPAINT_FAMILIES = [f for f, can in CAPABILITIES.items() if "inpaint" in can]
# Mean absolute difference between the outputs of two different inputs at strength 0.25:
# 7.5-39 on most families; Qwen-Image's tiny VAE squeezes inputs to nearly one latent, 0.76.
INPUT_DIFFERENCE = {"qwen_image": 0.3}
STRENGTH_DIFFERENCE = 1.0  # 0.75 against 0.5: 3.9 (Qwen-Image) to 34 seen


def families(*names: str) -> pytest.MarkDecorator:
    """Serve each of these families (one worker each, started once for the module)."""
    return pytest.mark.parametrize("served_family", names, indirect=True, ids=names)


@pytest.fixture(scope="module")
def client(head: Head) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{head.url}/v1", api_key="unused", max_retries=0,
                         timeout=180)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decoded(b64), dtype=np.int16)


def difference(a: np.ndarray, b: np.ndarray | Image.Image) -> float:
    return float(np.abs(a - np.asarray(b, dtype=np.int16)).mean())


def capabilities(client: openai.OpenAI, model: str) -> list[str]:
    # From the list: GET /v1/models/{id} cannot name a model served from a directory, since
    # a path's slashes end the route's one segment.
    served = {m.id: m for m in client.models.list()}
    return served[model].model_extra["capabilities"]


def test_every_family_that_edits_is_here_with_its_registry_modes() -> None:
    editing = {pipeline for pipeline, spec in models.FAMILIES.items()
               if spec.edit_pipeline or spec.inpaint_pipeline}
    assert {family_module(name).PIPELINE for name in CAPABILITIES} == editing
    for name, can in CAPABILITIES.items():
        registry = models.FAMILIES[family_module(name).PIPELINE].modes
        assert can == (IMG2IMG if name == "sd3" else registry)  # sd3: see CAPABILITIES


@families(*CAPABILITIES)
def test_models_announce_what_the_family_can_edit(client: openai.OpenAI,
                                                  served_family: Served) -> None:
    model, module = served_family
    name = module.__name__.rsplit(".", 1)[1]
    assert capabilities(client, model) == list(CAPABILITIES[name])
    if "inpaint" not in CAPABILITIES[name]:  # a mask is then refused before anything runs
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(model=model, image=png_file(picture()),
                               mask=png_file(openai_mask(), "mask.png"), prompt="a door")
        assert refused.value.body["param"] == "mask"
        assert "cannot inpaint" in refused.value.body["message"]


@families(*STRENGTH_FAMILIES)
def test_img2img_follows_its_input_strength_and_seed(head: Head, client: openai.OpenAI,
                                                     served_family: Served) -> None:
    model, module = served_family
    width, height = size_for(announced_spec(head, model))  # 96x64 fits 8, 16 and 32
    source, other = picture(width, height, 1), picture(width, height, 2)

    def edit(image: Image.Image, strength: float, seed: int = 5) -> str:
        result = client.images.edit(model=model, image=png_file(image), prompt="a watercolour",
                                    size=f"{width}x{height}",
                                    extra_body={"seed": seed, "steps": STEPS,
                                                "strength": strength})
        validate(result.model_dump(exclude_none=True), "ImagesResponse")
        assert result.model_extra.get("warnings") is None
        return result.data[0].b64_json

    low = edit(source, 0.25)
    assert decoded(low).size == (width, height)
    assert edit(source, 0.25) == low  # the same seed: the same bytes
    # Low strength keeps most of the input, so a different input shows through.
    name = module.__name__.rsplit(".", 1)[1]
    assert difference(pixels(low), pixels(edit(other, 0.25))) > INPUT_DIFFERENCE.get(name, 3.0)
    strong, medium = edit(source, 0.75), edit(source, 0.5)
    assert decoded(strong).size == (width, height)
    assert difference(pixels(strong), pixels(medium)) > STRENGTH_DIFFERENCE


@families("flux2_klein")
def test_klein_edits_with_references_and_no_strength(head: Head, client: openai.OpenAI,
                                                     served_family: Served) -> None:
    """FLUX.2 Klein conditions on its inputs as in-context references and runs the whole
    schedule: a strength is ignored, with a warning, and each reference counts. On the tiny
    fixture references move the output only a little (about 200 of its 18,432 channel values
    by one step), so the check is that the bytes change at all."""
    model, _ = served_family
    width, height = size_for(announced_spec(head, model))
    source, reference = png_file(picture(width, height, 1)), png_file(
        picture(width, height, 2), "reference.png")

    def edit(images: object, **extra: object) -> openai.types.ImagesResponse:
        return client.images.edit(model=model, image=images, prompt="a watercolour",
                                  size=f"{width}x{height}",
                                  extra_body={"seed": 5, "steps": STEPS, **extra})

    plain = edit(source)
    assert decoded(plain.data[0].b64_json).size == (width, height)
    assert plain.model_extra.get("warnings") is None
    with_strength = edit(source, strength=0.5)
    assert any("'strength' was ignored" in w for w in with_strength.model_extra["warnings"])
    assert with_strength.data[0].b64_json == plain.data[0].b64_json
    two = edit([source, reference])
    assert decoded(two.data[0].b64_json).size == (width, height)
    assert two.data[0].b64_json != plain.data[0].b64_json
    assert np.any(pixels(two.data[0].b64_json) != pixels(plain.data[0].b64_json))


@families(*INPAINT_FAMILIES)
def test_inpainting_keeps_every_pixel_outside_the_mask(head: Head, client: openai.OpenAI,
                                                       served_family: Served) -> None:
    """The left half is transparent in the mask: edited. The worker puts the input's own
    pixels back everywhere else, exactly. Just inside the mask's edge it blends the two over
    a ramp a few pixels wide (about 1/256 of the short side as a blur radius, at least 1: at
    96x64 the output's share is 6% in the last column, 29% in the one before, 70% and 94% in
    the two before that), so the edit fades out rather than ending on a seam; deeper inside,
    the output is the pipeline's own."""
    model, _ = served_family
    width, height = size_for(announced_spec(head, model))
    original = picture(width, height, 3)
    result = client.images.edit(model=model, image=png_file(original),
                                mask=png_file(openai_mask(width, height), "mask.png"),
                                prompt="a red door", size=f"{width}x{height}",
                                extra_body={"seed": 9, "steps": 2})
    got, had = pixels(result.data[0].b64_json), np.asarray(original, dtype=np.int16)
    assert got.shape == had.shape
    edge = width // 2
    assert np.array_equal(got[:, edge:], had[:, edge:])  # kept: the input's own pixels
    inside = difference(got[:, :edge - 6], had[:, :edge - 6])
    assert inside > 20  # made anew: 54-67 seen
    last, before = (difference(got[:, x], had[:, x]) for x in (edge - 1, edge - 2))
    assert 0 < last < before < inside  # the ramp


@families(NO_EDITS)
def test_a_family_without_editing_is_a_400_naming_the_model(client: openai.OpenAI,
                                                            served_family: Served) -> None:
    model, _ = served_family
    assert capabilities(client, model) == ["generate"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model=model, image=png_file(picture()), prompt="a watercolour")
    assert refused.value.body["param"] == "model"
    assert model in refused.value.body["message"]
    assert "cannot edit" in refused.value.body["message"]
