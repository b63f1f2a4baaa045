"""Tests for the group E tiny pipeline builders: AuraFlow, CogView4, HiDream-I1."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import math
import pathlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import PreTrainedTokenizerBase

FAMILIES = ("auraflow", "cogview4", "hidream")
WIDTH, HEIGHT = 96, 64
STEPS = 2
PROMPT = "a red fox in the snow, héllo 猫"

# Whether pipe._interrupt = True in callback_on_step_end skips the remaining steps.
INTERRUPT_STOPS = {"auraflow": False, "cogview4": True, "hidream": True}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Time and run the tiny models as the brief does: one CPU thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(f"tests.gpu_worker.families.{request.param}")


@pytest.fixture(scope="module")
def built(family: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp(family.__name__.rsplit(".", 1)[-1])
    family.build(path)
    return path


@pytest.fixture(scope="module")
def pipe(built: pathlib.Path) -> DiffusionPipeline:
    loaded = DiffusionPipeline.from_pretrained(built)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _expected_size(family: ModuleType, width: int, height: int) -> tuple[int, int]:
    """Return the size the family really produces (HiDream rescales to a fixed area)."""
    output_size: Callable[[int, int], tuple[int, int]] | None = getattr(family, "output_size", None)
    return output_size(width, height) if output_size else (width, height)


def _generate(
    family: ModuleType, pipe: DiffusionPipeline, seeds: tuple[int, ...], **extra: Any
) -> tuple[list[Image.Image], int]:
    """Generate one image per seed; return the images and how often the callback ran."""
    calls = 0

    def count_steps(
        _pipe: DiffusionPipeline, _step: int, _t: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return kwargs

    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "guidance_scale": 4.0,
        "width": WIDTH,
        "height": HEIGHT,
        "num_inference_steps": STEPS,
        "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        "output_type": "pil",
        "callback_on_step_end": count_steps,
        **family.CALL_KWARGS,
        **extra,
    }
    return pipe(**kwargs).images, calls


def test_module_exports(family: ModuleType) -> None:
    assert isinstance(family.PIPELINE, str)
    assert isinstance(family.CALL_KWARGS, dict)
    assert isinstance(family.NOTES, str) and family.NOTES
    assert callable(family.build)


def test_saved_dir_is_small(built: pathlib.Path) -> None:
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024


def test_build_is_byte_identical(
    family: ModuleType, built: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    family.build(tmp_path)
    first = {p.relative_to(built): p.read_bytes() for p in built.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert first == second


def test_loads_as_declared_pipeline(family: ModuleType, pipe: DiffusionPipeline) -> None:
    assert type(pipe).__name__ == family.PIPELINE
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert modules
    for name, module in modules.items():
        assert not any(m.training for m in module.modules()), f"{name} is in training mode"


def test_tokenizers_as_built(family: ModuleType, pipe: DiffusionPipeline) -> None:
    tokenizers = {
        k: v for k, v in pipe.components.items() if isinstance(v, PreTrainedTokenizerBase)
    }
    assert set(tokenizers) == set(family.TOKENIZER_SPECS)
    for name, (length, max_length) in family.TOKENIZER_SPECS.items():
        assert len(tokenizers[name]) == length, name
        assert tokenizers[name].model_max_length == max_length, name


def test_generation_is_seeded(family: ModuleType, pipe: DiffusionPipeline) -> None:
    images, calls = _generate(family, pipe, (5, 6))
    assert calls == STEPS
    assert len(images) == 2
    assert all(image.size == _expected_size(family, WIDTH, HEIGHT) for image in images)
    assert images[0].tobytes() != images[1].tobytes()

    again, _ = _generate(family, pipe, (5, 6))
    assert [i.tobytes() for i in again] == [i.tobytes() for i in images]

    other, _ = _generate(family, pipe, (7,))
    assert other[0].tobytes() not in {i.tobytes() for i in images}


def test_interrupt_in_callback(family: ModuleType, pipe: DiffusionPipeline) -> None:
    """Record whether pipe._interrupt stops the loop; images come back either way."""
    steps = 4
    calls = 0

    def interrupt(
        p: DiffusionPipeline, _step: int, _t: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        p._interrupt = True
        return kwargs

    images = pipe(
        prompt=PROMPT,
        guidance_scale=1.0,
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pil",
        callback_on_step_end=interrupt,
        **family.CALL_KWARGS,
    ).images
    assert len(images) == 1
    family_name = family.__name__.rsplit(".", 1)[-1]
    assert calls == (1 if INTERRUPT_STOPS[family_name] else steps)


@pytest.mark.parametrize("family", ["hidream"], indirect=True)
def test_hidream_size_override(family: ModuleType, pipe: DiffusionPipeline) -> None:
    """HiDream ignores the requested size unless default_sample_size is set to match it."""
    assert _expected_size(family, WIDTH, HEIGHT) != (WIDTH, HEIGHT)
    pipe.default_sample_size = math.ceil(math.sqrt(WIDTH * HEIGHT) / pipe.vae_scale_factor)
    try:
        images, _ = _generate(family, pipe, (5,), guidance_scale=1.0)
    finally:
        pipe.default_sample_size = 128
    assert images[0].size == (WIDTH, HEIGHT)
