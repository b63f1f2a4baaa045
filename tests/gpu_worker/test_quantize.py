"""--quantize: the denoiser's layers become torchao's, the images stay the model's, LoRA still
applies, and what a device cannot run is refused before loading."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.protocol import JobSpec
from gpu_worker import models, quantize
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.quantize import QuantizeError
from tests.gpu_worker.families import flux
from tests.gpu_worker.lora_fixtures import make_lora

CPU_CHOICES = ("int8-weight-only", "int8", "fp8-weight-only")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux") / "model"
    flux.build(path)
    return path


@pytest.fixture(scope="module")
def adapters(flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(flux_dir)
    folder = tmp_path_factory.mktemp("loras")
    # Strong, so that its change to the image stands far above the quantisation's rounding.
    make_lora(pipe, folder, seed=1, strength=3.0, weight_name="ink.safetensors")
    return folder


def job(*loras: tuple[str, float], seed: int = 1) -> JobSpec:
    return JobSpec(id="j", model="m", prompt="a fox", width=64, height=64, steps=3,
                   seeds=(seed,), guidance=3.5, loras=tuple(loras))


def runner_for(path: Path, choice: str, lora_dir: Path | None = None) -> PipelineRunner:
    runner = PipelineRunner(models.resolve(str(path)),
                            LoadOptions(threads=1, quantize=choice, lora_dir=lora_dir))
    runner.loras.announcement()  # the folder read, as a worker does before READY
    return runner


def pixels(runner: PipelineRunner, spec: JobSpec) -> np.ndarray:
    return np.asarray(runner.generate(spec)[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def plain(flux_dir: Path, adapters: Path) -> dict[str, np.ndarray]:
    runner = runner_for(flux_dir, "none", adapters)
    return {"base": pixels(runner, job()), "ink": pixels(runner, job(("ink", 1.0)))}


def linear_weights(runner: PipelineRunner) -> list[torch.Tensor]:
    return [module.weight for module in runner.pipe.transformer.modules()
            if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("choice", CPU_CHOICES)
def test_the_denoiser_is_quantised_and_makes_the_models_image(
        flux_dir: Path, adapters: Path, plain: dict, choice: str) -> None:
    runner = runner_for(flux_dir, choice, adapters)
    weights = linear_weights(runner)
    assert weights and all(type(w) is not torch.nn.Parameter for w in weights), \
        "every linear layer's weight is a torchao tensor"
    assert all(type(m.weight) is torch.nn.Parameter for m in runner.pipe.vae.modules()
               if isinstance(m, torch.nn.Conv2d)), "only the denoiser is quantised"
    base = pixels(runner, job())
    assert not np.array_equal(base, plain["base"])  # rounding shows
    assert psnr(base, plain["base"]) > 25  # but it is the model's image
    assert np.array_equal(pixels(runner, job()), base)  # and repeats exactly


@pytest.mark.parametrize("choice", CPU_CHOICES)
def test_lora_applies_on_quantised_layers_as_on_plain_ones(
        flux_dir: Path, adapters: Path, plain: dict, choice: str) -> None:
    runner = runner_for(flux_dir, choice, adapters)
    base = pixels(runner, job())
    ink = pixels(runner, job(("ink", 1.0)))
    # The adapter changes the quantised model's image as it changes the plain model's.
    change, plain_change = (ink - base).ravel(), (plain["ink"] - plain["base"]).ravel()
    assert np.abs(plain_change).mean() > 5
    cosine = change @ plain_change / (np.linalg.norm(change) * np.linalg.norm(plain_change))
    assert cosine > 0.9
    assert np.array_equal(pixels(runner, job()), base)  # and leaves the base exactly


def test_fp8_is_refused_on_a_cpu_naming_what_runs_there() -> None:
    with pytest.raises(QuantizeError, match=r"compute capability 8\.9 or newer.*int8"):
        quantize.check("fp8", "cpu")


def test_fp8_with_lora_is_refused_whatever_the_device() -> None:
    with pytest.raises(QuantizeError, match="LoRA adapters yet"):
        quantize.check("fp8", "cuda:0", loras=True)


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(QuantizeError, match="one of none, fp8"):
        quantize.check("int3", "cpu")


def test_none_leaves_the_model_alone(flux_dir: Path, plain: dict) -> None:
    runner = runner_for(flux_dir, "none")
    assert all(type(w) is torch.nn.Parameter for w in linear_weights(runner))
    assert np.array_equal(pixels(runner, job()), plain["base"])
