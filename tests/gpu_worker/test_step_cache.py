"""Step caching (--step-cache): each method runs, repeats, turns off per request, and is
refused where it cannot run."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.pipeline import Interrupted, LoadOptions, PipelineRunner
from gpu_worker.step_cache import StepCacheError, StepCacheSetting
from gpu_worker.tiny import build_tiny_pipeline
from tests.gpu_worker.families import flux, qwen_image

STEPS = 8
# Thresholds far above the tiny models' step-to-step changes, so that steps are skipped.
SETTINGS = ("first-block:threshold=5", "taylorseer:interval=3,warmup=1",
            "mag:threshold=5,retention=0.1")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux") / "model"
    flux.build(path)
    return path


def job(**overrides) -> JobSpec:
    fields = dict(id="j", model="m", prompt="a fox", width=64, height=64, steps=STEPS,
                  seeds=(1,), guidance=3.5)
    fields.update(overrides)
    return JobSpec(**fields)


def runner_for(path: Path, step_cache: str) -> PipelineRunner:
    return PipelineRunner(models.resolve(str(path)),
                          LoadOptions(threads=1, step_cache=step_cache))


def pixels(runner: PipelineRunner, spec: JobSpec) -> np.ndarray:
    return np.asarray(runner.generate(spec)[0], dtype=np.float64)


@pytest.fixture(scope="module")
def uncached(flux_dir: Path) -> np.ndarray:
    return pixels(runner_for(flux_dir, "none"), job())


# ---------------------------------------------------------------- the setting's text


@pytest.mark.parametrize("text, method, options", [
    ("none", "", ()),
    ("", "", ()),
    ("first-block", "first-block", ()),
    ("first-block:threshold=0.08", "first-block", (("threshold", 0.08),)),
    (" taylorseer:order=2, interval=4 ", "taylorseer", (("interval", 4.0), ("order", 2.0))),
    ("mag:max-skip=2,retention=0.3", "mag", (("max-skip", 2.0), ("retention", 0.3))),
])
def test_a_setting_reads_as_written(text: str, method: str, options: tuple) -> None:
    setting = StepCacheSetting.parse(text)
    assert (setting.method, setting.options) == (method, options)
    assert StepCacheSetting.parse(str(setting)) == setting  # what a worker announces reads back


@pytest.mark.parametrize("text, says", [
    ("fastest", "unknown step cache 'fastest'"),
    ("first-block:interval=3", "no option 'interval'"),
    ("first-block:threshold", "threshold must be a number"),
    ("first-block:threshold=nan", "between"),
    ("first-block:threshold=-1", "between"),
    ("taylorseer:interval=2.5", "interval must be an integer"),
    ("taylorseer:interval=0", "between 1 and 100"),
    ("mag:retention=1.5", "between 0 and 1"),
    ("none:threshold=1", "takes no options"),
])
def test_a_bad_setting_is_refused_with_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(StepCacheError, match=says):
        StepCacheSetting.parse(text)


# ---------------------------------------------------------------- on a model


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_method_runs_changes_the_steps_and_repeats_exactly(
        flux_dir: Path, uncached: np.ndarray, setting: str) -> None:
    runner = runner_for(flux_dir, setting)
    cached = pixels(runner, job())
    assert cached.shape == uncached.shape
    assert not np.array_equal(cached, uncached)  # steps were skipped: the image moved
    assert psnr(cached, uncached) > 10  # but it is the same image, not noise
    assert np.array_equal(pixels(runner, job()), cached)  # no state leaks into the next call
    assert runner.spec.step_cache == str(StepCacheSetting.parse(setting))  # announced


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_request_that_turns_it_off_gets_the_uncached_images_exactly(
        flux_dir: Path, uncached: np.ndarray, setting: str) -> None:
    runner = runner_for(flux_dir, setting)
    cached = pixels(runner, job())
    assert np.array_equal(pixels(runner, job(step_cache=False)), uncached)
    assert np.array_equal(pixels(runner, job()), cached)  # and on again after it


def test_a_job_interrupted_mid_call_leaves_no_state_to_the_next(flux_dir: Path) -> None:
    runner = runner_for(flux_dir, "first-block:threshold=5")
    first = pixels(runner, job())
    with pytest.raises(Interrupted):
        runner.generate(job(seeds=(7,), width=96), lambda done, total, _: done < 3)
    assert np.array_equal(pixels(runner, job()), first)


def test_magcache_follows_each_batch_s_step_count(flux_dir: Path) -> None:
    runner = runner_for(flux_dir, "mag:threshold=5,retention=0.1")
    eight = pixels(runner, job())
    four = pixels(runner, job(steps=4))
    assert not np.array_equal(four, eight)
    assert np.array_equal(pixels(runner, job()), eight)


def test_the_cache_and_the_job_key_batch_apart() -> None:
    assert job().batch_key() != job(step_cache=False).batch_key()


def test_auto_is_the_registry_default_which_is_off_for_every_family(flux_dir: Path) -> None:
    assert all(spec.step_cache == "" for spec in models.FAMILIES.values())
    assert all(spec.step_cache == "" for spec in models.REGISTRY.values())
    assert runner_for(flux_dir, "auto").step_cache.enabled is False


def test_a_unet_model_is_refused_at_start(tmp_path: Path) -> None:
    build_tiny_pipeline().save_pretrained(tmp_path / "sd")
    with pytest.raises(StepCacheError, match="has no step caching in diffusers"):
        runner_for(tmp_path / "sd", "first-block")


def test_magcache_is_refused_where_diffusers_has_no_ratios(tmp_path: Path) -> None:
    qwen_image.build(tmp_path / "qwen")
    with pytest.raises(StepCacheError, match=r"FLUX\.1's only"):
        runner_for(tmp_path / "qwen", "mag")
    runner = runner_for(tmp_path / "qwen", "first-block:threshold=5")  # another family runs
    assert runner.generate(job(guidance=None))[0].size == (64, 64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
