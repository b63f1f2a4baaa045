"""Tests for group D's tiny pipeline builders: Lumina-Next, Lumina 2, Qwen-Image, Z-Image."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

FAMILIES = ("lumina_next", "lumina2", "qwen_image", "z_image")
# Whether `pipe._interrupt = True` inside callback_on_step_end ends the denoising loop early.
INTERRUPTIBLE = {"lumina_next": False, "lumina2": False, "qwen_image": True, "z_image": True}
# Guidance on and off in each family's own terms (Qwen-Image: true_cfg_scale; Z-Image: > 0).
CFG_ON = {
    "lumina_next": {"guidance_scale": 4.0},
    "lumina2": {"guidance_scale": 4.0},
    "qwen_image": {"true_cfg_scale": 4.0},
    "z_image": {"guidance_scale": 5.0},
}
CFG_OFF = {
    "lumina_next": {"guidance_scale": 1.0},
    "lumina2": {"guidance_scale": 1.0},
    "qwen_image": {"true_cfg_scale": 1.0},
    "z_image": {"guidance_scale": 0.0},
}
WIDTH, HEIGHT = 96, 64
STEPS = 2
MAX_SAVED_BYTES = 10 * 1024 * 1024


@dataclass
class Built:
    name: str
    family: ModuleType
    path: pathlib.Path
    pipe: DiffusionPipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one CPU thread, as the timing budget assumes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build one family once, then load it through the normal diffusers path."""
    name = request.param
    family = importlib.import_module(f"tests.gpu_worker.families.{name}")
    path = tmp_path_factory.mktemp(name) / "model"
    family.build(path)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return Built(name, family, path, pipe)


def generate(built: Built, seeds: tuple[int, ...], **kwargs: Any) -> tuple[list[Image.Image], int]:
    """Generate one image per seed; return the images and the number of callback steps."""
    steps: list[int] = []

    def count(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
        steps.append(step)
        return tensors

    call = {"callback_on_step_end": count, **built.family.CALL_KWARGS, **kwargs}
    images = built.pipe(
        prompt="a red cat on a blue mat",
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=STEPS,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pil",
        **call,
    ).images
    return images, len(steps)


def saved_files(path: pathlib.Path) -> dict[str, bytes]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): f.read_bytes() for f in files}


def test_loads_as_declared_pipeline(built: Built) -> None:
    assert type(built.pipe).__name__ == built.family.PIPELINE
    modules = [c for c in built.pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert modules
    assert not any(m.training for module in modules for m in module.modules())
    tokenizer = built.pipe.tokenizer
    assert len(tokenizer) == built.family.VOCAB_SIZE
    assert tokenizer.model_max_length == built.family.MAX_LENGTH
    assert sum(len(b) for b in saved_files(built.path).values()) < MAX_SAVED_BYTES


def test_build_is_byte_identical(built: Built, tmp_path: pathlib.Path) -> None:
    built.family.build(tmp_path / "again")
    assert saved_files(tmp_path / "again") == saved_files(built.path)


def test_generates_seeded_batch(built: Built) -> None:
    images, steps = generate(built, (5, 6))
    assert steps == STEPS
    assert [image.size for image in images] == [(WIDTH, HEIGHT)] * 2
    again, _ = generate(built, (5, 6))
    assert [i.tobytes() for i in again] == [i.tobytes() for i in images]
    other, _ = generate(built, (7, 8))
    assert other[0].tobytes() != images[0].tobytes()
    assert other[1].tobytes() != images[1].tobytes()


def test_interrupt_flag(built: Built) -> None:
    steps: list[int] = []

    def interrupt(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
        steps.append(step)
        pipe._interrupt = True
        return tensors

    images, _ = generate(built, (5,), callback_on_step_end=interrupt)
    assert len(images) == 1  # an interrupted run still decodes and returns its latents
    assert len(steps) == (1 if INTERRUPTIBLE[built.name] else STEPS)


def test_negative_prompt_only_matters_with_cfg(built: Built) -> None:
    def first(negative: str, cfg: dict[str, float]) -> bytes:
        return generate(built, (5,), negative_prompt=negative, **cfg)[0][0].tobytes()

    on, off = CFG_ON[built.name], CFG_OFF[built.name]
    assert first("blurry", on) != first("grainy", on)
    assert first("blurry", off) == first("grainy", off)
