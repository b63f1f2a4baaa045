"""Editing on the tiny SD pipeline through the runner: img2img and inpainting made from the
loaded pipeline's own modules, the input's pixels kept outside the mask, seeds and strength
deciding the result; and the inputs a worker refuses."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io

import numpy as np
import pytest
import torch
from PIL import Image

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.editing import FEATHER_FRACTION, EditInputs, InvalidInput, composite
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.tiny import build_tiny_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    path = tmp_path_factory.mktemp("sd") / "model"
    build_tiny_pipeline().save_pretrained(path)
    return PipelineRunner(models.resolve(str(path)), LoadOptions(threads=1))


def picture(seed: int) -> Image.Image:
    """A smooth image with structure: what a VAE would visibly alter."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def left_half_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255
    return Image.fromarray(mask, "L")


def edit_job(job_id: str = "e", *, mask: bool = False, strength: float = 0.75,
             seeds: tuple[int, ...] = (1,), steps: int = 4) -> JobSpec:
    return JobSpec(id=job_id, model="m", prompt="a fox", width=SIZE, height=SIZE, steps=steps,
                   seeds=seeds, guidance=5.0, inputs=1, mask=mask, strength=strength)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def run(runner: PipelineRunner, job: JobSpec, image: Image.Image,
        mask: Image.Image | None = None) -> list[Image.Image]:
    frames = [png(image)] + ([png(mask)] if mask is not None else [])
    inputs = {job.id: EditInputs.decode(job, frames)}
    return runner.generate_batch([job], None, inputs)[0]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------ the pipelines


def test_the_edit_pipelines_share_the_loaded_modules(runner: PipelineRunner) -> None:
    assert runner.spec.modes == ("generate", "edit", "inpaint")
    dtype = runner.pipe.unet.dtype
    for mode in ("edit", "inpaint"):
        made = runner.edits.for_mode(mode)
        assert made is not runner.pipe
        assert made.unet is runner.pipe.unet and made.vae is runner.pipe.vae
        assert made.text_encoder is runner.pipe.text_encoder
        assert runner.edits.for_mode(mode) is made  # made once
    assert runner.pipe.unet.dtype == dtype  # from_pipe cast nothing in place


def test_a_family_without_edits_says_so() -> None:
    spec = models.REGISTRY["pixart-sigma"]
    assert spec.modes == ("generate",)
    assert models.REGISTRY["kolors"].modes == ("generate", "edit")


@pytest.mark.parametrize("family, steps, strength, expected", [
    ("sd", 4, 0.75, 3), ("sd", 4, 0.2, 0), ("sd", 10, 1.0, 10),  # int(steps x strength)
    ("flux", 4, 0.2, 1), ("flux", 4, 0.75, 3), ("flux", 28, 0.6, 17),
    ("flux2-klein", 4, 0.5, 2),  # its inpainting takes a strength like the others
])
def test_the_steps_an_edit_runs(family: str, steps: int, strength: float,
                                expected: int) -> None:
    spec = next(s for s in models.FAMILIES.values() if s.family == family)
    assert spec.steps_run(steps, strength) == expected
    assert spec.steps_run(steps, None) == steps  # a generation, or Klein's references


# ------------------------------------------------------------------ img2img


def test_img2img_makes_the_jobs_size_and_the_same_seed_the_same_bytes(
        runner: PipelineRunner) -> None:
    first = run(runner, edit_job(), picture(1))
    again = run(runner, edit_job(), picture(1))
    assert [image.size for image in first] == [(SIZE, SIZE)]
    assert first[0].tobytes() == again[0].tobytes()


def test_img2img_follows_its_input_seed_and_strength(runner: PipelineRunner) -> None:
    base = pixels(run(runner, edit_job(), picture(1))[0])
    other_seed = pixels(run(runner, edit_job(seeds=(2,)), picture(1))[0])
    other_strength = pixels(run(runner, edit_job(strength=0.5), picture(1))[0])
    for other in (other_seed, other_strength):
        assert np.abs(base - other).mean() > 5.0
    # The input shows most at a low strength: the tiny model's random VAE encodes images
    # to nearly the same latents, which the noise of a high strength then drowns.
    near = pixels(run(runner, edit_job(strength=0.25), picture(1))[0])
    near_other = pixels(run(runner, edit_job(strength=0.25), picture(2))[0])
    assert np.abs(near - near_other).mean() > 3.0


def test_progress_counts_the_steps_the_strength_runs(runner: PipelineRunner) -> None:
    seen: list[tuple[int, int]] = []

    def on_step(done: int, total: int, previews: object) -> bool:
        seen.append((done, total))
        return True

    job = edit_job(steps=4, strength=0.75)
    inputs = {job.id: EditInputs.decode(job, [png(picture(1))])}
    runner.generate_batch([job], on_step, inputs)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert runner.total_steps(job) == 3


def test_a_batch_of_edits_keeps_each_jobs_input_and_seeds(runner: PipelineRunner) -> None:
    one, two = edit_job("one", seeds=(1, 2)), edit_job("two", seeds=(3,))
    inputs = {"one": EditInputs.decode(one, [png(picture(1))]),
              "two": EditInputs.decode(two, [png(picture(2))])}
    batched = runner.generate_batch([one, two], None, inputs)
    assert [len(images) for images in batched] == [2, 1]
    alone = run(runner, edit_job("two", seeds=(3,)), picture(2))
    # Its own input and seed decide its image whatever shares the batch (to within the
    # batched kernels' rounding: docs/performance.md).
    assert np.abs(pixels(batched[1][0]) - pixels(alone[0])).max() <= 2


# ------------------------------------------------------------------ inpainting


def test_inpainting_keeps_every_pixel_outside_the_mask(runner: PipelineRunner) -> None:
    original = picture(3)
    made = run(runner, edit_job(mask=True, strength=1.0), original, left_half_mask())[0]
    assert made.size == (SIZE, SIZE)
    got, had = pixels(made), pixels(original)
    assert np.array_equal(got[:, SIZE // 2:], had[:, SIZE // 2:])  # kept: exactly
    assert np.abs(got[:, : SIZE // 4] - had[:, : SIZE // 4]).mean() > 10  # repainted


def test_the_seam_blends_only_just_inside_the_mask() -> None:
    original = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    painted = Image.new("RGB", (SIZE, SIZE), (200, 200, 200))
    inputs = EditInputs((original,), left_half_mask())
    row = pixels(composite(painted, inputs))[SIZE // 2, :, 0]
    radius = max(1, round(SIZE * FEATHER_FRACTION))
    edge = SIZE // 2
    assert (row[edge:] == 0).all()  # outside: the input's own
    # Deep inside: the pipeline's. The blend spans a few radii (two blurs and a threshold).
    assert (row[: edge - 6 * radius] == 200).all()
    ramp = row[edge - 6 * radius: edge]
    assert (np.diff(ramp) <= 0).all()  # rises steadily into the mask
    assert ramp[-1] < 60  # from near the input's value at the edge: no seam


def test_inpainting_a_batch_keeps_each_images_own_seed(runner: PipelineRunner) -> None:
    both = run(runner, edit_job(mask=True, seeds=(1, 2), strength=1.0), picture(3),
               left_half_mask())
    second = run(runner, edit_job(mask=True, seeds=(2,), strength=1.0), picture(3),
                 left_half_mask())
    assert both[0].tobytes() != both[1].tobytes()
    assert np.abs(pixels(both[1]) - pixels(second[0])).max() <= 2


# ------------------------------------------------------------------ inputs refused


def test_frames_that_are_not_the_jobs_images_are_refused() -> None:
    job = edit_job(mask=True)
    good = png(picture(1))
    with pytest.raises(InvalidInput, match="input frames"):
        EditInputs.decode(job, [good])
    with pytest.raises(InvalidInput, match="cannot be read"):
        EditInputs.decode(job, [good, b"not a png"])
    huge = png(Image.new("L", (SIZE * 4, SIZE * 4)))
    with pytest.raises(InvalidInput, match="256x256"):
        EditInputs.decode(job, [good, huge])


def test_an_input_of_another_size_is_fitted_not_refused() -> None:
    job = edit_job()
    inputs = EditInputs.decode(job, [png(picture(1).resize((SIZE, SIZE // 2)))])
    assert inputs.images[0].size == (SIZE, SIZE)


def test_a_generation_still_runs_on_the_text_pipeline(runner: PipelineRunner) -> None:
    job = JobSpec(id="g", model="m", prompt="a fox", width=SIZE, height=SIZE, steps=2,
                  seeds=(1,), guidance=5.0)
    images = runner.generate_batch([job])[0]
    assert images[0].size == (SIZE, SIZE)
    assert torch.is_inference_mode_enabled() is False
