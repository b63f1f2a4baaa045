"""Tests for the built-in random-weight ``tiny`` pipeline."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import pathlib
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from gpu_worker import tiny
from gpu_worker.tiny import TINY_VERSION, ensure_tiny_pipeline

EXPECTED_VOCAB_SIZE = 514
EXPECTED_MAX_LENGTH = 77
WIDTH, HEIGHT = 256, 192


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Build the tiny pipeline once for the module."""
    return ensure_tiny_pipeline(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def pipe(tiny_dir: pathlib.Path) -> DiffusionPipeline:
    """Load the tiny pipeline through the normal diffusers path."""
    loaded = DiffusionPipeline.from_pretrained(tiny_dir)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def generate(pipe: DiffusionPipeline, seed: int, **kwargs: object) -> Image.Image:
    """Generate one small image with a seeded CPU generator."""
    result = pipe(
        "a red fox in the snow",
        generator=torch.Generator("cpu").manual_seed(seed),
        num_inference_steps=2,
        width=WIDTH,
        height=HEIGHT,
        output_type="pil",
        **kwargs,
    )
    return result.images[0]


def test_builds_versioned_dir(tmp_path: pathlib.Path) -> None:
    path = ensure_tiny_pipeline(tmp_path)
    assert path == tmp_path / f"tiny-v{TINY_VERSION}"
    assert (path / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5 * 1024 * 1024


def test_second_call_does_not_rebuild(tmp_path: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_tiny_pipeline(tmp_path)
    mtime = (path / "model_index.json").stat().st_mtime_ns

    def fail() -> None:
        raise AssertionError("rebuilt an existing pipeline")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", fail)
    assert ensure_tiny_pipeline(tmp_path) == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime


def test_uses_dc_cache_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_CACHE_DIR", str(tmp_path))
    assert ensure_tiny_pipeline() == tmp_path / f"tiny-v{TINY_VERSION}"


def test_losing_a_build_race_keeps_the_winner(
    tmp_path: pathlib.Path, tiny_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / f"tiny-v{TINY_VERSION}"
    real_build = tiny.build_tiny_pipeline

    def build_while_another_process_wins() -> object:
        shutil.copytree(tiny_dir, target)
        return real_build()

    monkeypatch.setattr(tiny, "build_tiny_pipeline", build_while_another_process_wins)
    assert ensure_tiny_pipeline(tmp_path) == target
    # copytree preserves mtimes, so an unchanged mtime means the winner's files were kept.
    winner_mtime = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert (target / "model_index.json").stat().st_mtime_ns == winner_mtime
    # The loser's temp dir is gone and only the winner remains.
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_loads_as_stable_diffusion(pipe: DiffusionPipeline) -> None:
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.safety_checker is None


def test_tokenizer_matches_text_encoder(pipe: DiffusionPipeline) -> None:
    assert len(pipe.tokenizer) == EXPECTED_VOCAB_SIZE
    assert pipe.tokenizer.model_max_length == EXPECTED_MAX_LENGTH
    assert pipe.text_encoder.config.vocab_size == EXPECTED_VOCAB_SIZE
    assert pipe.text_encoder.config.max_position_embeddings == EXPECTED_MAX_LENGTH


def test_tokenizer_handles_unknown_and_long_text(pipe: DiffusionPipeline) -> None:
    tok = pipe.tokenizer
    ids = tok("Zürich 日本 qwxzzy 42!! don't", truncation=True).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    long_ids = tok(" ".join(["supercalifragilistic"] * 100), truncation=True).input_ids
    assert len(long_ids) == EXPECTED_MAX_LENGTH


def test_modules_in_eval_mode(pipe: DiffusionPipeline) -> None:
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert {type(m).__name__ for m in modules} == {
        "AutoencoderKL", "CLIPTextModel", "UNet2DConditionModel"}
    for module in modules:
        assert all(not sub.training for sub in module.modules())


def test_generates_image_of_requested_size(pipe: DiffusionPipeline) -> None:
    image = generate(pipe, 7)
    assert isinstance(image, Image.Image)
    assert image.size == (WIDTH, HEIGHT)


def test_seed_controls_output(pipe: DiffusionPipeline) -> None:
    first = generate(pipe, 7).tobytes()
    assert generate(pipe, 7).tobytes() == first
    assert generate(pipe, 8).tobytes() != first


def test_batched_generators_match_single_runs(pipe: DiffusionPipeline) -> None:
    single = generate(pipe, 7)
    images = pipe(
        "a red fox in the snow",
        generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 8)],
        num_images_per_prompt=2,
        num_inference_steps=2,
        width=WIDTH,
        height=HEIGHT,
        output_type="pil",
    ).images
    assert len(images) == 2
    assert all(img.size == (WIDTH, HEIGHT) for img in images)
    # Batched kernels may round differently from batch size 1, so allow one 8-bit level.
    diff = np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(single, dtype=np.int16))
    assert diff.max() <= 1
    assert images[0].tobytes() != images[1].tobytes()


def test_negative_prompt_and_guidance(pipe: DiffusionPipeline) -> None:
    plain = generate(pipe, 7, guidance_scale=1.0)
    guided = generate(pipe, 7, negative_prompt="blurry, low quality", guidance_scale=5.0)
    assert guided.size == (WIDTH, HEIGHT)
    assert guided.tobytes() != plain.tobytes()
