"""Tests for the group C tiny family builders: PixArt-Σ, Sana, Sana Sprint, HunyuanDiT."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import pathlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

FAMILIES = ["pixart_sigma", "sana", "sana_sprint", "hunyuan_dit"]
WIDTH, HEIGHT = 96, 64
STEPS = 2
PROMPT = "a red fox in the snow"
# Pipelines that only have the legacy per-step `callback=` hook.
LEGACY_CALLBACK = {"PixArtSigmaPipeline"}
# Timestep-distilled pipelines whose __call__ has no negative_prompt.
NO_NEGATIVE_PROMPT = {"SanaSprintPipeline"}
MAX_SAVED_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Run on one CPU thread, as the timing budget assumes, and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> types.ModuleType:
    return importlib.import_module(f"tests.gpu_worker.families.{request.param}")


@pytest.fixture(scope="module")
def built(family: types.ModuleType, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp(family.__name__.rsplit(".", 1)[-1]) / "pipeline"
    family.build(path)
    return path


@pytest.fixture(scope="module")
def pipe(built: pathlib.Path) -> DiffusionPipeline:
    loaded = DiffusionPipeline.from_pretrained(built)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def generate(pipe: DiffusionPipeline, family: types.ModuleType,
             seeds: tuple[int, ...]) -> tuple[list[Image.Image], int]:
    """Generate one image per seed in a single call; return the images and the steps seen."""
    steps: list[int] = []
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "width": WIDTH,
        "height": HEIGHT,
        "num_inference_steps": STEPS,
        "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        "output_type": "pil",
        "guidance_scale": 4.5,
        **_progress_kwargs(family.PIPELINE, steps.append),
        **family.CALL_KWARGS,
    }
    if family.PIPELINE not in NO_NEGATIVE_PROMPT:
        kwargs["negative_prompt"] = "blurry"
    return pipe(**kwargs).images, len(steps)


def _progress_kwargs(pipeline: str, record: Callable[[int], None]) -> dict[str, Any]:
    if pipeline in LEGACY_CALLBACK:
        return {"callback": lambda step, t, latents: record(step), "callback_steps": 1}

    def on_step_end(p: DiffusionPipeline, step: int, t: Any,
                    tensors: dict[str, Any]) -> dict[str, Any]:
        record(step)
        return tensors

    return {"callback_on_step_end": on_step_end}


def test_saved_pipeline_is_small(built: pathlib.Path) -> None:
    size = sum(f.stat().st_size for f in built.rglob("*") if f.is_file())
    assert size < MAX_SAVED_BYTES


def test_build_is_deterministic(family: types.ModuleType, built: pathlib.Path,
                                tmp_path: pathlib.Path) -> None:
    family.build(tmp_path)
    first = {f.relative_to(built): f.read_bytes() for f in built.rglob("*") if f.is_file()}
    second = {f.relative_to(tmp_path): f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    assert first == second


def test_loads_as_declared_class(family: types.ModuleType, pipe: DiffusionPipeline) -> None:
    assert type(pipe).__name__ == family.PIPELINE


def test_modules_are_in_eval_mode(pipe: DiffusionPipeline) -> None:
    modules = {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert modules
    training = [f"{n}.{sub}" for n, m in modules.items()
                for sub, s in m.named_modules() if s.training]
    assert not training


def test_tokenizers(family: types.ModuleType, pipe: DiffusionPipeline) -> None:
    for name, (size, max_length) in family.TOKENIZERS.items():
        tokenizer = getattr(pipe, name)
        assert (len(tokenizer), tokenizer.model_max_length) == (size, max_length), name


def test_generation_is_seeded(family: types.ModuleType, pipe: DiffusionPipeline) -> None:
    images, steps = generate(pipe, family, (5, 6))
    assert steps == STEPS
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 2
    again, _ = generate(pipe, family, (5, 6))
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    other, _ = generate(pipe, family, (7, 6))
    assert other[0].tobytes() != images[0].tobytes()
    assert other[1].tobytes() == images[1].tobytes()
