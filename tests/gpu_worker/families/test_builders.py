"""Tests for the tiny family pipeline builders, one test id per family.

Each family module builds a tiny random-weight pipeline; here each is built once, loaded the
way a worker loads it, and run on the CPU. What differs between families (sizes, callbacks,
whether ``pipe._interrupt`` stops the loop, how guidance is switched) is in the tables below;
what a family declares about itself (PIPELINE, CALL_KWARGS, NOTES, TOKENIZERS) is in its module.
"""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import json
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

from tests.gpu_worker.families._tokenizers import CHATGLM_VOCAB_SIZE

FAMILIES = (
    "flux", "chroma", "flux2_klein", "sd3",  # flow-matching MMDiTs
    "sdxl", "kolors", "stable_cascade",  # UNets
    "pixart_sigma", "sana", "sana_sprint", "hunyuan_dit",  # DiTs with T5/Gemma/BERT
    "lumina_next", "lumina2", "qwen_image", "z_image",  # LLM text encoders
    "auraflow", "cogview4", "hidream",
)
WIDTH, HEIGHT = 96, 64
# Stable Cascade is exact only at multiples of 128 (see its NOTES); 96x64 crashes in its decoder.
SIZES = {"stable_cascade": (256, 128)}
STEPS = 2
# Byte-level and byte-fallback tokenizers must take non-ASCII; T5 and BERT map it to unk.
PROMPT = "a red fox in the snow, héllo 雪地里的红狐狸"
MAX_SAVED_BYTES = 10 * 1024 * 1024

# Pipelines that only have the legacy per-step `callback=` hook.
LEGACY_CALLBACK = {"pixart_sigma"}
# Whether `pipe._interrupt = True` in callback_on_step_end skips the remaining steps.
INTERRUPT_STOPS = {
    "flux": True, "chroma": True, "flux2_klein": True, "sd3": True,
    "lumina_next": False, "lumina2": False, "qwen_image": True, "z_image": True,
    "auraflow": False, "cogview4": True, "hidream": True,
}
# Guidance on and off in each family's own terms (Qwen-Image: true_cfg_scale; Z-Image: > 0).
CFG_ON_OFF = {
    "lumina_next": ({"guidance_scale": 4.0}, {"guidance_scale": 1.0}),
    "lumina2": ({"guidance_scale": 4.0}, {"guidance_scale": 1.0}),
    "qwen_image": ({"true_cfg_scale": 4.0}, {"true_cfg_scale": 1.0}),
    "z_image": ({"guidance_scale": 5.0}, {"guidance_scale": 0.0}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one CPU thread, as the timings in the builders' docs assume, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def family(name: str) -> ModuleType:
    return importlib.import_module(f"tests.gpu_worker.families.{name}")


@pytest.fixture(scope="module")
def built(family: ModuleType, name: str,
          tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Build the family's tiny pipeline once per family."""
    path = tmp_path_factory.mktemp(name) / "model"
    family.build(path)
    return path


@pytest.fixture(scope="module")
def pipe(built: pathlib.Path) -> DiffusionPipeline:
    """Load the tiny pipeline the way a worker does."""
    loaded = DiffusionPipeline.from_pretrained(built)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def requested_size(name: str) -> tuple[int, int]:
    return SIZES.get(name, (WIDTH, HEIGHT))


def expected_size(family: ModuleType, width: int, height: int) -> tuple[int, int]:
    """Return the size the family really produces (HiDream rescales to a fixed area)."""
    output_size: Callable[[int, int], tuple[int, int]] | None = getattr(family, "output_size", None)
    return output_size(width, height) if output_size else (width, height)


def progress_kwargs(name: str, record: Callable[[int], None]) -> dict[str, Any]:
    """The per-step hook, in the form the family's pipeline takes."""
    if name in LEGACY_CALLBACK:
        return {"callback": lambda step, t, latents: record(step), "callback_steps": 1}

    def on_step_end(_pipe: DiffusionPipeline, step: int, _t: Any,
                    tensors: dict[str, Any]) -> dict[str, Any]:
        record(step)
        return tensors

    hooks: dict[str, Any] = {"callback_on_step_end": on_step_end}
    if name == "stable_cascade":
        # callback_on_step_end sees decoder steps only; the prior has its own callback.
        hooks["prior_callback_on_step_end"] = on_step_end
    return hooks


def generate(pipe: DiffusionPipeline, family: ModuleType, name: str, seeds: tuple[int, ...],
             **extra: Any) -> tuple[list[Image.Image], list[int]]:
    """Generate one image per seed in one call; return the images and the steps seen."""
    steps: list[int] = []
    width, height = requested_size(name)
    kwargs: dict[str, Any] = {
        # prompt goes by keyword: Flux2KleinPipeline's first positional parameter is `image`.
        "prompt": PROMPT,
        "width": width,
        "height": height,
        "num_inference_steps": STEPS,
        "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        "output_type": "pil",
        **progress_kwargs(name, steps.append),
        **family.CALL_KWARGS,
        **extra,
    }
    return pipe(**kwargs).images, steps


def file_bytes(root: pathlib.Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_declares_family_interface(family: ModuleType) -> None:
    assert isinstance(family.PIPELINE, str)
    assert isinstance(family.CALL_KWARGS, dict)
    assert isinstance(family.NOTES, str) and family.NOTES
    assert callable(family.build)


def test_saved_dir_is_small(built: pathlib.Path) -> None:
    assert sum(len(data) for data in file_bytes(built).values()) < MAX_SAVED_BYTES


def test_build_is_byte_identical(
    family: ModuleType, built: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    family.build(tmp_path / "again")
    assert file_bytes(tmp_path / "again") == file_bytes(built)


def test_loads_as_declared_pipeline_in_eval_mode(
    family: ModuleType, built: pathlib.Path, pipe: DiffusionPipeline
) -> None:
    index = json.loads((built / "model_index.json").read_text())
    assert index["_class_name"] == family.PIPELINE
    assert type(pipe).__name__ == family.PIPELINE
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert modules
    for component, module in modules.items():
        assert not any(m.training for m in module.modules()), f"{component} is in training mode"


def test_tokenizers(family: ModuleType, name: str, pipe: DiffusionPipeline) -> None:
    tokenizers = {
        k: v for k, v in pipe.components.items() if isinstance(v, PreTrainedTokenizerBase)
    }
    assert set(tokenizers) == set(family.TOKENIZERS)
    for component, (length, max_length) in family.TOKENIZERS.items():
        tokenizer = tokenizers[component]
        assert (len(tokenizer), tokenizer.model_max_length) == (length, max_length), component
    if name == "kolors":  # len() merges three ids that ChatGLM all names ""
        assert pipe.tokenizer.vocab_size == CHATGLM_VOCAB_SIZE


def test_generates_deterministically(
    family: ModuleType, name: str, pipe: DiffusionPipeline
) -> None:
    images, steps = generate(pipe, family, name, (5, 6))
    prior_steps = STEPS if name == "stable_cascade" else 0
    assert len(steps) == STEPS + prior_steps
    assert [im.size for im in images] == [expected_size(family, *requested_size(name))] * 2
    assert images[0].tobytes() != images[1].tobytes()

    again, _ = generate(pipe, family, name, (5, 6))
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]

    # Image 1 keeps its seed: batching keeps each image's noise apart.
    other, _ = generate(pipe, family, name, (7, 6))
    assert other[0].tobytes() != images[0].tobytes()
    assert other[1].tobytes() == images[1].tobytes()


def test_prompt_reaches_the_image(family: ModuleType, name: str, pipe: DiffusionPipeline) -> None:
    # Catches tokenizer/text-encoder wiring that silently encodes every prompt the same.
    fox = generate(pipe, family, name, (5,))[0][0]
    car = generate(pipe, family, name, (5,), prompt="a blue car")[0][0]
    assert fox.tobytes() != car.tobytes()


@pytest.mark.parametrize("name", sorted(INTERRUPT_STOPS), indirect=True)
def test_interrupt_in_callback(family: ModuleType, name: str, pipe: DiffusionPipeline) -> None:
    """Record whether pipe._interrupt stops the loop; images come back either way."""
    steps: list[int] = []

    def interrupt(p: DiffusionPipeline, step: int, _t: Any, tensors: dict) -> dict:
        steps.append(step)
        p._interrupt = True
        return tensors

    images, _ = generate(pipe, family, name, (5,), callback_on_step_end=interrupt,
                         num_inference_steps=3)
    assert steps == ([0] if INTERRUPT_STOPS[name] else [0, 1, 2])
    # An interrupted loop only skips steps: the VAE still decodes the partly denoised latents.
    assert [image.size for image in images] == [expected_size(family, WIDTH, HEIGHT)]


@pytest.mark.parametrize("name", sorted(CFG_ON_OFF), indirect=True)
def test_negative_prompt_only_matters_with_cfg(
    family: ModuleType, name: str, pipe: DiffusionPipeline
) -> None:
    def first(negative: str, cfg: dict[str, float]) -> bytes:
        return generate(pipe, family, name, (5,), negative_prompt=negative, **cfg)[0][0].tobytes()

    on, off = CFG_ON_OFF[name]
    assert first("blurry", on) != first("grainy", on)
    assert first("blurry", off) == first("grainy", off)


@pytest.mark.parametrize("name", ["stable_cascade"], indirect=True)
def test_stable_cascade_rejects_sizes_off_its_grid(pipe: DiffusionPipeline) -> None:
    """96x64 gives 21 decoder latent rows, which the decoder's PixelUnshuffle(4) cannot split."""
    with pytest.raises(RuntimeError, match="pixel_unshuffle"):
        pipe(PROMPT, width=96, height=64, num_inference_steps=1, prior_num_inference_steps=1)


@pytest.mark.parametrize("name", ["hidream"], indirect=True)
def test_hidream_size_override(family: ModuleType, name: str, pipe: DiffusionPipeline) -> None:
    """HiDream ignores the requested size unless default_sample_size is set to match it."""
    assert expected_size(family, WIDTH, HEIGHT) != (WIDTH, HEIGHT)
    pipe.default_sample_size = math.ceil(math.sqrt(WIDTH * HEIGHT) / pipe.vae_scale_factor)
    try:
        images, _ = generate(pipe, family, name, (5,), guidance_scale=1.0)
    finally:
        pipe.default_sample_size = 128
    assert images[0].size == (WIDTH, HEIGHT)
