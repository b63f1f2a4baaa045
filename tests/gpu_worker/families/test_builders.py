"""Tests for the group A tiny pipeline builders: FLUX.1, Chroma, FLUX.2 klein, SD3."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import json
import pathlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from tests.gpu_worker.families import _tokenizers_a as tok

CLIP = (tok.CLIP_VOCAB_SIZE, tok.CLIP_MAX_LENGTH)
T5 = (tok.T5_VOCAB_SIZE, tok.T5_MAX_LENGTH)
QWEN = (tok.QWEN_VOCAB_SIZE, tok.QWEN_MAX_LENGTH)

# (len(tokenizer), tokenizer.model_max_length) for every tokenizer component.
TOKENIZERS: dict[str, dict[str, tuple[int, int]]] = {
    "flux": {"tokenizer": CLIP, "tokenizer_2": T5},
    "chroma": {"tokenizer": T5},
    "flux2_klein": {"tokenizer": QWEN},
    "sd3": {"tokenizer": CLIP, "tokenizer_2": CLIP, "tokenizer_3": T5},
}
FAMILIES = list(TOKENIZERS)

WIDTH, HEIGHT = 96, 64
STEPS = 2
MAX_SAVED_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one CPU thread, as the timing budget assumes, and restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(f"tests.gpu_worker.families.{request.param}")


@pytest.fixture(scope="module")
def built(family: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Build the family's tiny pipeline once per family."""
    path = tmp_path_factory.mktemp(family_name(family)) / "model"
    family.build(path)
    return path


@pytest.fixture(scope="module")
def pipe(built: pathlib.Path) -> DiffusionPipeline:
    """Load the tiny pipeline the way a worker does."""
    loaded = DiffusionPipeline.from_pretrained(built)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def family_name(family: ModuleType) -> str:
    return family.__name__.rsplit(".", 1)[-1]


def generate(
    pipe: DiffusionPipeline, family: ModuleType, seeds: tuple[int, ...], **kwargs: Any
) -> list[Image.Image]:
    """Generate one image per seed at WIDTH x HEIGHT and STEPS steps."""
    kwargs.setdefault("callback_on_step_end", lambda *_: {})
    kwargs.setdefault("prompt", "a red fox in the snow")
    result = pipe(
        # prompt goes by keyword: Flux2KleinPipeline's first positional parameter is `image`.
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        num_images_per_prompt=len(seeds),
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=kwargs.pop("num_inference_steps", STEPS),
        output_type="pil",
        **family.CALL_KWARGS,
        **kwargs,
    )
    return list(result.images)


def file_bytes(root: pathlib.Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_declares_family_interface(family: ModuleType) -> None:
    assert isinstance(family.PIPELINE, str)
    assert isinstance(family.CALL_KWARGS, dict)
    assert isinstance(family.NOTES, str) and family.NOTES


def test_loads_as_declared_pipeline(
    family: ModuleType, built: pathlib.Path, pipe: DiffusionPipeline
) -> None:
    index = json.loads((built / "model_index.json").read_text())
    assert index["_class_name"] == family.PIPELINE
    assert type(pipe).__name__ == family.PIPELINE


def test_saved_dir_is_small(built: pathlib.Path) -> None:
    assert sum(len(data) for data in file_bytes(built).values()) < MAX_SAVED_BYTES


def test_build_is_byte_identical(
    family: ModuleType, built: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    family.build(tmp_path / "again")
    assert file_bytes(tmp_path / "again") == file_bytes(built)


def test_every_module_in_eval_mode(pipe: DiffusionPipeline) -> None:
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert modules
    for name, module in modules.items():
        assert not any(m.training for m in module.modules()), name


def test_tokenizers(family: ModuleType, pipe: DiffusionPipeline) -> None:
    for name, (length, max_length) in TOKENIZERS[family_name(family)].items():
        tokenizer = pipe.components[name]
        assert (len(tokenizer), tokenizer.model_max_length) == (length, max_length), name


def test_generates_deterministically(family: ModuleType, pipe: DiffusionPipeline) -> None:
    steps: list[int] = []

    def count(_pipe: DiffusionPipeline, step: int, _t: Any, _kw: dict) -> dict:
        steps.append(step)
        return {}

    images = generate(pipe, family, (5, 6), callback_on_step_end=count)
    assert [image.size for image in images] == [(WIDTH, HEIGHT)] * 2
    assert steps == list(range(STEPS))
    again = generate(pipe, family, (5, 6))
    assert [i.tobytes() for i in again] == [i.tobytes() for i in images]
    other = generate(pipe, family, (7, 8))
    assert {i.tobytes() for i in other}.isdisjoint(i.tobytes() for i in images)


def test_interrupt_skips_remaining_steps(family: ModuleType, pipe: DiffusionPipeline) -> None:
    steps: list[int] = []

    def interrupt(p: DiffusionPipeline, step: int, _t: Any, _kw: dict) -> dict:
        steps.append(step)
        p._interrupt = True
        return {}

    images = generate(pipe, family, (5,), callback_on_step_end=interrupt, num_inference_steps=3)
    assert steps == [0]
    # The loop only skips steps: the VAE still decodes the partly denoised latents.
    assert [image.size for image in images] == [(WIDTH, HEIGHT)]


def test_prompt_reaches_the_image(family: ModuleType, pipe: DiffusionPipeline) -> None:
    # Catches tokenizer/text-encoder wiring that silently encodes every prompt the same.
    fox = generate(pipe, family, (5,))[0]
    car = generate(pipe, family, (5,), prompt="a blue car")[0]
    assert fox.tobytes() != car.tobytes()
