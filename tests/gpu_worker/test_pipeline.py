"""The runner adapts to the pipeline it loads: family from its class, defaults from __call__."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.pipeline import Interrupted, LoadOptions, PipelineRunner, to_pil
from gpu_worker.preview import preview_steps
from gpu_worker.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sd") / "model"
    build_tiny_pipeline().save_pretrained(path)
    return path


def job(**overrides) -> JobSpec:
    fields = dict(id="j", model="m", prompt="a fox", width=64, height=64, steps=3, seeds=(1,),
                  guidance=5.0)
    fields.update(overrides)
    return JobSpec(**fields)


def test_a_directory_gets_its_family_from_model_index(sd_dir: Path) -> None:
    spec = models.resolve(str(sd_dir))
    assert (spec.family, spec.pipeline, spec.size_multiple) == ("sd", "StableDiffusionPipeline", 8)
    assert spec.name == spec.repo == str(sd_dir)


def test_an_unknown_pipeline_class_gets_defaults_from_its_signature(sd_dir: Path) -> None:
    # A class the registry has no family for: the runner reads __call__'s defaults instead.
    spec = models.generic(str(sd_dir))
    runner = PipelineRunner(spec, LoadOptions(threads=1))
    fitted = runner._defaults_from_signature(spec)
    assert fitted.default_steps == 50  # StableDiffusionPipeline.__call__'s default
    assert fitted.default_guidance == 7.5
    assert fitted.negative_prompt is True
    assert fitted.pipeline == "StableDiffusionPipeline"


def test_returning_false_from_on_step_interrupts_at_that_step(sd_dir: Path) -> None:
    runner = PipelineRunner(models.resolve(str(sd_dir)), LoadOptions(threads=1))
    seen: list[tuple[int, int]] = []

    def on_step(done: int, total: int, previews: list) -> bool:
        seen.append((done, total))
        return done < 2

    with pytest.raises(Interrupted):
        runner.generate(job(steps=5), on_step)
    assert seen == [(1, 5), (2, 5)]
    # The runner is usable afterwards, and a seed still gives the same image.
    first = runner.generate(job(steps=2))[0].tobytes()
    assert runner.generate(job(steps=2))[0].tobytes() == first


def test_a_pipeline_built_in_memory_runs_like_the_same_one_loaded(sd_dir: Path) -> None:
    # bench/gpu.py wraps real-size pipelines it builds itself; they must be fitted and run
    # exactly as a loaded one: same spec adjustments, same device placement, same pixels.
    from diffusers import StableDiffusionPipeline

    spec = models.resolve(str(sd_dir))
    loaded = PipelineRunner(spec, LoadOptions(threads=1))
    built = StableDiffusionPipeline.from_pretrained(sd_dir)
    wrapped = PipelineRunner(spec, LoadOptions(threads=1), pipe=built)
    assert wrapped.pipe is built
    assert wrapped.spec == loaded.spec
    assert wrapped.generate(job())[0].tobytes() == loaded.generate(job())[0].tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [3, 1])
def test_to_pil_gives_the_bytes_of_diffusers_own_pil_output(dtype: torch.dtype,
                                                            channels: int) -> None:
    # The runner asks pipelines for tensors and converts them itself (on the device); the
    # pixels must be exactly those of output_type="pil", ties at .5 included.
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(0)
    decoded = (torch.rand(3, channels, 24, 40, generator=generator) * 2.2 - 1.1).to(dtype)
    decoded[0, 0, 0, :6] = torch.tensor([-1.0, 1.0, 0.0, -1 + 1 / 255, 1 / 255, 3 / 255])
    processor = VaeImageProcessor()
    expected = processor.postprocess(decoded, output_type="pil")
    got = to_pil(processor.postprocess(decoded, output_type="pt"))
    assert [im.mode for im in got] == [im.mode for im in expected]
    assert [im.tobytes() for im in got] == [im.tobytes() for im in expected]


def test_to_pil_passes_pil_images_through() -> None:
    from PIL import Image

    images = [Image.new("RGB", (8, 8), "red")]
    assert to_pil(images) == images


def test_cpu_runs_float32(sd_dir: Path) -> None:
    runner = PipelineRunner(models.resolve(str(sd_dir)), LoadOptions(threads=1))
    assert runner.pipe.unet.dtype == torch.float32


def test_previews_come_from_the_first_step_then_spread(sd_dir: Path) -> None:
    runner = PipelineRunner(models.resolve(str(sd_dir)), LoadOptions(threads=1))
    previews: dict[int, list] = {}

    def on_step(done: int, total: int, images: list) -> bool:
        if images:
            previews[done] = images
        return True

    final = runner.generate(job(steps=8, seeds=(1, 2), width=96, height=64, previews=3),
                            on_step)
    assert sorted(previews) == [1, 3, 6]
    for images in previews.values():
        assert len(images) == 2  # one per image of the batch
        assert all(i.size == (96, 64) and i.mode == "RGB" for i in images)
    assert len(final) == 2


@pytest.mark.parametrize("total, count, expected", [
    (8, 3, {1, 3, 6}), (4, 3, {1, 2, 3}), (2, 3, {1}), (1, 3, {1}), (30, 0, set()),
    (10, 1, {1}),
])
def test_preview_steps(total: int, count: int, expected: set) -> None:
    assert preview_steps(total, count) == expected


def test_a_batch_of_jobs_is_one_call_and_each_seed_keeps_its_image(sd_dir: Path) -> None:
    import numpy as np

    runner = PipelineRunner(models.resolve(str(sd_dir)), LoadOptions(threads=1))
    first = job(id="a", prompt="a red fox", seeds=(10, 11), width=64, height=48)
    second = job(id="b", prompt="a blue whale", seeds=(20,), width=64, height=48,
                 negative_prompt="blurry")
    steps_seen: list[int] = []
    batched = runner.generate_batch([first, second],
                                    lambda done, total, p: steps_seen.append(done) or True)
    assert steps_seen == [1, 2, 3]  # one pipeline call, not two
    assert [len(images) for images in batched] == [2, 1]
    solo = runner.generate(second)[0]
    assert batched[1][0].size == solo.size == (64, 48)
    # Same seed and prompt alone: the same image up to float rounding in the batched matmuls.
    difference = np.abs(np.asarray(batched[1][0], dtype=int) - np.asarray(solo, dtype=int))
    assert difference.max() <= 2


def test_a_pipeline_of_no_known_family_keeps_diffusers_own_pil_output(sd_dir: Path) -> None:
    # Some pipelines (Kandinsky, DeepFloyd IF) post-process only their "pil"/"np" outputs, so
    # tensors are asked only of the families the registry knows.
    assert PipelineRunner(models.resolve(str(sd_dir)), LoadOptions(threads=1))._output_type() \
        == "pt"
    generic = PipelineRunner(models.generic(str(sd_dir)), LoadOptions(threads=1))
    assert generic.spec.family == "sd"  # the loaded class is known: fitted to its family
    unknown = PipelineRunner(models.generic(str(sd_dir)), LoadOptions(threads=1))
    unknown.spec = unknown._defaults_from_signature(models.generic(str(sd_dir)))
    assert unknown.spec.family == "generic"
    assert unknown._output_type() == "pil"
    assert unknown.generate(job())[0].size == (64, 64)
