"""--compile: regional by default, the warm-up compiles the shapes it can name, and every later
compile is logged with the shape that caused it.

torch.compile's "eager" backend captures and guards graphs exactly as inductor does, so what
compiles when is the same; inductor's C++ code generation would take minutes per graph on
these CPUs (bench/gpu.py runs inductor on a GPU).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.protocol import JobSpec
from gpu_worker import compiling, models
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.tiny import build_tiny_pipeline
from tests.gpu_worker.families import flux


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux") / "model"
    flux.build(path)
    return path


def job(size: int = 64, seeds: tuple[int, ...] = (1,), height: int | None = None) -> JobSpec:
    return JobSpec(id="j", model="m", prompt="a fox", width=size, height=height or size,
                   steps=2, seeds=seeds, guidance=3.5)


def compiled(path: Path, **options) -> PipelineRunner:
    torch._dynamo.reset()  # each runner's compiles counted from nothing
    return PipelineRunner(models.resolve(str(path)),
                          LoadOptions(threads=1, compile=True, compile_backend="eager",
                                      **options))


def pixels(runner: PipelineRunner, spec: JobSpec) -> np.ndarray:
    return np.asarray(runner.generate(spec)[0])


@pytest.fixture(scope="module")
def warmed(flux_dir: Path) -> tuple[PipelineRunner, list[str]]:
    """A compiled runner after its warm-up, with what the warm-up logged."""
    runner = compiled(flux_dir, warm_up_sizes=((64, 48),))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("gpu_worker")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        runner.warm_up()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return runner, records


def test_regional_compiles_the_repeated_blocks_only(warmed) -> None:
    runner, _ = warmed
    transformer = runner.pipe.transformer
    blocks = [m for m in transformer.modules()
              if type(m).__name__ in transformer._repeated_blocks]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert transformer._compiled_call_impl is None  # not the whole model


def test_the_warm_up_compiles_its_size_at_batch_one_and_two_and_says_so(warmed) -> None:
    runner, records = warmed
    compiles = [line for line in records if line.startswith("compiled ")]
    assert len(compiles) == 2  # batch sizes 1 and 2
    assert "for 64x48, 1 image(s)" in compiles[0] and "for 64x48, 2 image(s)" in compiles[1]
    assert any("warm-up ran 64x48 at batch sizes 1 and 2" in line for line in records)
    assert runner.compile_log.compiles == 2


def test_a_warmed_shape_and_a_larger_batch_run_without_compiling(warmed, caplog) -> None:
    runner, _ = warmed
    before = compiling.graphs_compiled()
    runner.generate(job(size=64, height=48))
    runner.generate(job(size=64, height=48, seeds=(1, 2, 3, 4)))  # batch went dynamic at 2
    assert compiling.graphs_compiled() == before


def test_a_size_the_warm_up_did_not_run_compiles_once_and_is_logged(warmed, caplog) -> None:
    runner, _ = warmed
    with caplog.at_level(logging.INFO, logger="gpu_worker.compiling"):
        runner.generate(job(size=96))
        runner.generate(job(size=96, seeds=(5,)))
        # dynamo made the sizes dynamic at the second one it saw: a third needs nothing new
        runner.generate(job(size=80))
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled")]
    assert len(compiles) == 1 and "for 96x96, 1 image(s), 2 steps, generate" in compiles[0]


def test_compiled_images_are_the_eager_ones(flux_dir: Path, warmed) -> None:
    runner, _ = warmed
    eager = PipelineRunner(models.resolve(str(flux_dir)), LoadOptions(threads=1))
    assert np.array_equal(pixels(runner, job(seeds=(9,))), pixels(eager, job(seeds=(9,))))


def test_a_step_cache_runs_compiled_and_gives_its_eager_images(flux_dir: Path) -> None:
    setting = "first-block:threshold=5"
    eager = PipelineRunner(models.resolve(str(flux_dir)),
                           LoadOptions(threads=1, step_cache=setting))
    runner = compiled(flux_dir, step_cache=setting)
    spec = JobSpec(id="j", model="m", prompt="a fox", width=64, height=64, steps=6,
                   seeds=(1,), guidance=3.5)
    assert np.array_equal(pixels(runner, spec), pixels(eager, spec))


def test_full_scope_compiles_the_whole_denoiser(tmp_path: Path) -> None:
    import diffusers

    build_tiny_pipeline().save_pretrained(tmp_path / "sd")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "sd")
    # Compiling is lazy: this wraps the module, and a regional runner above runs the code.
    assert compiling.compile_denoiser(pipe, "full", "eager") == "full"
    assert pipe.unet._compiled_call_impl is not None
    assert all(m._compiled_call_impl is None for m in pipe.unet.modules() if m is not pipe.unet)


def test_an_unknown_scope_is_refused() -> None:
    with pytest.raises(ValueError, match="one of regional, full"):
        compiling.compile_denoiser(object(), "everything")
