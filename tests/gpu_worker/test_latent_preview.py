"""Previews from the first step: latent maps with each family's colours, sized to the image,
small VAE decodes later only where cheap, and a fallback for families without factors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from broker import protocol
from broker.protocol import JobSpec, Message, MsgType
from gpu_worker import models, preview
from gpu_worker import worker as worker_module
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.preview import (
    FLUX_RGB,
    SD1_RGB,
    SDXL_RGB,
    PreviewMaker,
    latent_rgb,
    latents_to_images,
    preview_size,
    preview_steps,
)
from gpu_worker.tiny import build_tiny_pipeline
from gpu_worker.worker import Worker, WorkerConfig

WAIT = 30.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runner(tiny_dir: Path) -> PipelineRunner:
    return PipelineRunner(models.resolve(str(tiny_dir)), LoadOptions(threads=1))


def job(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = dict(id="j", model="m", prompt="a fox", width=64, height=64,
                                  steps=4, seeds=(1,), guidance=5.0, previews=1)
    fields.update(overrides)
    return JobSpec(**fields)


def previews_of(runner: PipelineRunner, spec: JobSpec) -> dict[int, list[Image.Image]]:
    seen: dict[int, list[Image.Image]] = {}

    def on_step(done: int, total: int, images: list[Image.Image]) -> bool:
        if images:
            seen[done] = images
        return True

    runner.generate(spec, on_step)
    return seen


# ------------------------------------------------------------------ which steps

@pytest.mark.parametrize("total, count, expected", [
    (1, 1, {1}), (1, 3, {1}), (2, 1, {1}), (2, 3, {1}), (4, 1, {1}), (4, 2, {1, 3}),
    (4, 3, {1, 2, 3}), (8, 3, {1, 3, 6}), (20, 3, {1, 7, 14}), (30, 0, set()), (0, 2, set()),
])
def test_the_first_preview_is_at_step_one_then_spread(total: int, count: int,
                                                      expected: set[int]) -> None:
    assert preview_steps(total, count) == expected


@pytest.mark.parametrize("steps", [1, 4])
def test_one_and_four_step_runs_preview_at_step_one(runner: PipelineRunner, steps: int) -> None:
    seen = previews_of(runner, job(steps=steps, previews=1))
    assert sorted(seen) == [1]


@pytest.mark.parametrize("steps", [1, 4])
def test_a_worker_sends_a_preview_at_step_one(runner: PipelineRunner, steps: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    encoded_on: list[str] = []
    real_encode = worker_module.encode_image

    def encode(image: Image.Image, *args: Any, **kwargs: Any) -> bytes:
        encoded_on.append(threading.current_thread().name)
        return real_encode(image, *args, **kwargs)

    monkeypatch.setattr(worker_module, "encode_image", encode)
    link = RecordingLink()
    worker = Worker(WorkerConfig(worker_id="w", warm_up=False), runner=runner)
    thread = threading.Thread(target=worker.run, kwargs={"link": link}, daemon=True,
                              name="job-loop")
    thread.start()
    try:
        worker.on_jobs([job(id=f"p{steps}", steps=steps, previews=2, width=96, height=64)])
        link.wait_for(lambda m: m.type is MsgType.RESULT)
    finally:
        worker.stop()
        thread.join(WAIT)
    shown = [m for m in link.sent if m.type is MsgType.PROGRESS and m.payloads]
    assert shown, "no preview was sent"
    assert shown[0]["step"] == 1 and shown[0]["steps"] == steps
    first = Image.open(_bytes_io(shown[0].payloads[0]))
    assert first.size == preview_size(96, 64) == (96, 64)
    # Encoded off the device thread, and never after the image they preview.
    assert encoded_on and not any(name.startswith("job-loop") for name in encoded_on)
    assert any(name.startswith("previews") for name in encoded_on)
    order = [m.type for m in link.sent if m.type is MsgType.RESULT or m.payloads]
    assert order[-1] is MsgType.RESULT and order.count(MsgType.RESULT) == 1


# ------------------------------------------------------------------ size and colour

@pytest.mark.parametrize("width, height, expected", [
    (1024, 1024, (256, 256)), (1344, 768, (256, 146)), (768, 1344, (146, 256)),
    (96, 64, (96, 64)), (2048, 512, (256, 64)),
])
def test_previews_have_the_images_aspect_ratio(width: int, height: int,
                                               expected: tuple[int, int]) -> None:
    latents = torch.randn(2, 4, height // 8, width // 8)
    images = latents_to_images(latents, None, width, height, "sd")
    assert [i.size for i in images] == [expected, expected]
    assert all(i.mode == "RGB" for i in images)


def test_a_run_previews_at_the_images_aspect_ratio(runner: PipelineRunner) -> None:
    seen = previews_of(runner, job(steps=4, previews=3, width=128, height=64, seeds=(1, 2)))
    assert sorted(seen) == [1, 2, 3]
    for images in seen.values():
        assert [i.size for i in images] == [(128, 64), (128, 64)]


def expected_colour(rgb: preview.LatentRGB, channel: int, value: float) -> tuple[int, ...]:
    row = rgb.factors[channel]
    return tuple(round(max(0.0, min(1.0, (value * row[i] + rgb.bias[i] + 1) / 2)) * 255)
                 for i in range(3))


@pytest.mark.parametrize("family, rgb, channels", [
    ("sd", SD1_RGB, 4), ("sdxl", SDXL_RGB, 4), ("flux", FLUX_RGB, 16),
])
def test_the_projection_of_a_known_latent_gives_its_colour(family: str,
                                                           rgb: preview.LatentRGB,
                                                           channels: int) -> None:
    latents = torch.zeros(1, channels, 4, 6)
    latents[0, 1] = 2.0
    pixels = latent_rgb(latents, family)
    assert pixels.shape == (1, 3, 4, 6) and pixels.dtype == torch.uint8
    colour = tuple(int(c) for c in pixels[0, :, 0, 0])
    assert colour == expected_colour(rgb, 1, 2.0)
    assert (pixels == pixels[:, :, :1, :1]).all()  # uniform latents, uniform colour


def test_zero_latents_are_mid_grey_with_sd_factors() -> None:
    assert latent_rgb(torch.zeros(1, 4, 2, 2), "sd")[0, :, 0, 0].tolist() == [128, 128, 128]


def test_sd_factors_make_the_first_channel_warm_and_the_last_blue() -> None:
    latents = torch.zeros(2, 4, 2, 2)
    latents[0, 0] = 1.5  # SD's first channel: luminance with a warm cast
    latents[1, 3] = -1.5  # its last: blue against yellow
    warm, blue = latent_rgb(latents, "sd")[:, :, 0, 0].tolist()
    assert warm[0] > warm[2] > 128
    assert blue[2] == 255 and blue[2] > blue[1] > blue[0]


class PackingPipe:
    """The FLUX pipeline's packing, as its callback hands latents over."""

    vae_scale_factor = 8

    @staticmethod
    def _unpack_latents(latents: torch.Tensor, height: int, width: int,
                        vae_scale_factor: int) -> torch.Tensor:
        from diffusers import FluxPipeline
        return FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)


def test_packed_flux_latents_are_unpacked_before_the_projection() -> None:
    from diffusers import FluxPipeline

    width, height = 128, 64
    spatial = torch.zeros(1, 16, height // 8, width // 8)
    spatial[0, 4, :, : width // 16] = 3.0  # the left half lights channel 4
    packed = FluxPipeline._pack_latents(spatial, 1, 16, height // 8, width // 8)
    assert packed.ndim == 3
    image = latents_to_images(packed, PackingPipe(), width, height, "flux")[0]
    assert image.size == (128, 64)
    left, right = image.getpixel((10, 32)), image.getpixel((118, 32))
    assert left == expected_colour(FLUX_RGB, 4, 3.0)
    assert right == expected_colour(FLUX_RGB, 0, 0.0)


# ------------------------------------------------------------------ fallbacks

@pytest.mark.parametrize("family, channels", [
    ("generic", 4), (None, 16), ("sd", 16), ("flux", 4), ("qwen-image", 16), ("sana", 32),
    ("cogview4", 2), ("flux2-klein", 128),
])
def test_families_without_factors_fall_back_to_a_stretched_channel_map(
        family: str | None, channels: int) -> None:
    latents = torch.randn(1, channels, 8, 8)
    pixels = latent_rgb(latents, family)
    assert pixels.shape == (1, 3, 8, 8)
    assert int(pixels.min()) == 0 and int(pixels.max()) == 255  # stretched to the full range
    assert latents_to_images(latents, None, 64, 64, family)[0].size == (64, 64)


def test_unreadable_latents_give_no_preview_rather_than_an_error() -> None:
    assert latents_to_images(None, None, 64, 64, "sd") == []
    assert latents_to_images(torch.zeros(1, 16, 4), object(), 64, 64, "flux") == []


class OtherVae(torch.nn.Module):
    """A VAE that is not an AutoencoderKL (DC-AE, Cascade's): never decoded for previews."""


def test_a_vae_we_cannot_drive_keeps_latent_maps() -> None:
    pipe = type("Pipe", (), {"vae": OtherVae(), "vae_scale_factor": 8})()
    maker = PreviewMaker(pipe, "sana")
    assert not maker.decodes
    images = maker.make(torch.randn(1, 32, 4, 4), 32, 32, first=False, step_seconds=1.0)
    assert [i.size for i in images] == [(32, 32)]


def test_an_offloaded_pipeline_keeps_latent_maps(runner: PipelineRunner) -> None:
    assert not PreviewMaker(runner.pipe, "tiny", offloaded=True).decodes


# ------------------------------------------------------------------ the small decode

def test_later_previews_decode_small_while_that_is_cheap(runner: PipelineRunner) -> None:
    maker = PreviewMaker(runner.pipe, runner.spec.family)
    assert maker.decodes
    latents = torch.randn(1, 4, 16, 32)
    first = maker.make(latents, 256, 128, first=True, step_seconds=1000.0)
    assert maker.decode_seconds is None  # the first preview is always the latent map
    later = maker.make(latents, 256, 128, first=False, step_seconds=1000.0)
    assert maker.decode_seconds is not None and maker.decodes
    assert [i.size for i in first] == [i.size for i in later] == [(256, 128)]
    assert first[0].tobytes() != later[0].tobytes()


def test_a_decode_dearer_than_its_budget_gives_way_to_latent_maps_for_that_size(
        runner: PipelineRunner) -> None:
    maker = PreviewMaker(runner.pipe, runner.spec.family)
    latents = torch.randn(1, 4, 8, 8)
    for _ in range(2):  # measured twice: the first call may pay a one-time set-up
        maker.make(latents, 64, 64, first=False, step_seconds=1e-9)
    measured = maker.decode_seconds
    assert measured is not None
    maker.decode_seconds = None
    maker.make(latents, 64, 64, first=False, step_seconds=1e-9)
    assert maker.decode_seconds is None  # over budget at this size: a latent map, no decode
    # Another size is its own question; a slow step there still affords one.
    maker.make(torch.randn(1, 4, 16, 32), 256, 128, first=False, step_seconds=1000.0)
    assert maker.decode_seconds is not None and maker.decodes


# ------------------------------------------------------------------ helpers

class RecordingLink:
    """What the worker sends, decoded as the broker would read it."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.changed = threading.Condition()
        self.alive = True

    def start(self) -> None:
        pass

    def stop(self, *, bye: bool = True) -> None:
        self.alive = False

    def send(self, frames: list[Any]) -> None:
        with self.changed:
            self.sent.append(protocol.decode(frames))
            self.changed.notify_all()

    def wait_for(self, match: Any) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(match(m) for m in self.sent), WAIT), \
                self.sent


def _bytes_io(data: Any) -> Any:
    import io
    return io.BytesIO(bytes(data))


# ------------------------------------------------------------------ real families

@pytest.mark.parametrize("family", ["flux", "sd3", "pixart_sigma", "sana", "qwen_image"])
def test_every_kind_of_latent_previews_from_step_one(family: str,
                                                     tmp_path_factory: pytest.TempPathFactory
                                                     ) -> None:
    # Packed (FLUX), packed with a frame axis (Qwen-Image), 16 channels (SD3), a VAE with no
    # factors (PixArt's, here tiny), a VAE that is no AutoencoderKL (Sana's DC-AE).
    import importlib

    builder = importlib.import_module(f"tests.gpu_worker.families.{family}")
    path = tmp_path_factory.mktemp(family) / "model"
    builder.build(path)
    runner = PipelineRunner(models.resolve(str(path)), LoadOptions(threads=1))
    seen = previews_of(runner, job(steps=4, previews=3, width=128, height=64, guidance=None))
    assert sorted(seen) == [1, 2, 3]
    for images in seen.values():
        assert [(i.size, i.mode) for i in images] == [((128, 64), "RGB")]
