"""A worker group (--gpus-per-worker): one image split across processes with context
parallelism, on CPU processes and the gloo backend here (NCCL on GPUs, same code)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.parallel import Group, GroupPlan, ParallelError, check_mode, group_devices
from gpu_worker.pipeline import Interrupted, LoadOptions, PipelineRunner
from gpu_worker.tiny import build_tiny_pipeline
from tests.gpu_worker.families import flux


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux") / "model"
    flux.build(path)
    return path


def job(seeds: tuple[int, ...] = (1,), **overrides) -> JobSpec:
    fields = dict(id="j", model="m", prompt="a fox", width=64, height=64, steps=4,
                  seeds=seeds, guidance=3.5)
    fields.update(overrides)
    return JobSpec(**fields)


@pytest.fixture(scope="module")
def grouped(flux_dir: Path):
    spec = models.resolve(str(flux_dir))
    options = LoadOptions(threads=1)
    group = Group.lead(GroupPlan(group_devices("cpu", 2), "ulysses"), spec, options)
    runner = PipelineRunner(spec, options, group=group)
    yield runner
    group.close()


@pytest.fixture(scope="module")
def alone(flux_dir: Path) -> PipelineRunner:
    return PipelineRunner(models.resolve(str(flux_dir)), LoadOptions(threads=1))


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def test_a_group_makes_the_image_one_device_makes(grouped, alone) -> None:
    split, whole = pixels(grouped.generate(job())), pixels(alone.generate(job()))
    # The attention is summed in another order across ranks: float rounding, at most a level.
    assert len(split) == 1 and np.abs(split[0] - whole[0]).max() <= 1


def test_a_batch_of_jobs_runs_as_one_call_on_the_group(grouped, alone) -> None:
    jobs = [job(seeds=(3, 4), id="a"), job(seeds=(5,), id="b", prompt="a hen")]
    split = grouped.generate_batch(jobs)
    whole = alone.generate_batch(jobs)
    assert [len(images) for images in split] == [2, 1]
    for ours, theirs in zip(split, whole, strict=True):
        for a, b in zip(pixels(ours), pixels(theirs), strict=True):
            assert np.abs(a - b).max() <= 1


def test_a_cancel_stops_every_rank_and_the_group_serves_on(grouped, alone) -> None:
    steps_seen = []

    def stop_at_two(done: int, total: int, previews) -> bool:
        steps_seen.append(done)
        return done < 2

    with pytest.raises(Interrupted):
        grouped.generate(job(seeds=(8,)), stop_at_two)
    assert steps_seen == [1, 2]
    # Had a follower gone on to step 3, this call's collectives would not pair up.
    after = pixels(grouped.generate(job(seeds=(9,))))
    assert np.abs(after[0] - pixels(alone.generate(job(seeds=(9,))))[0]).max() <= 1


def test_previews_come_from_the_leader(grouped) -> None:
    previews = []
    grouped.generate(job(previews=2),
                     lambda done, total, images: previews.extend(images) or True)
    assert len(previews) == 2 and all(p is not None for p in previews)


def test_group_devices_count_up_from_the_first() -> None:
    assert group_devices("cuda:2", 3) == ("cuda:2", "cuda:3", "cuda:4")
    assert group_devices("cuda", 2) == ("cuda:0", "cuda:1")
    assert group_devices("cpu", 2) == ("cpu", "cpu")
    with pytest.raises(ParallelError):
        group_devices("cuda:0", 0)


def test_ring_attention_is_refused_off_cuda() -> None:
    with pytest.raises(ParallelError, match="ring needs CUDA"):
        check_mode(GroupPlan(("cpu", "cpu"), "ring"))
    with pytest.raises(ParallelError, match="one of ulysses, ring"):
        check_mode(GroupPlan(("cpu", "cpu"), "tensor"))


def test_a_model_without_a_parallel_plan_is_refused(tmp_path: Path) -> None:
    import diffusers

    build_tiny_pipeline().save_pretrained(tmp_path / "sd")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "sd")
    with pytest.raises(ParallelError, match="UNet2DConditionModel has no context-parallel"):
        Group(GroupPlan(("cpu", "cpu"), "ulysses"), 0, []).parallelise(pipe)


def test_ulysses_needs_the_heads_to_divide_by_the_group(flux_dir: Path) -> None:
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(flux_dir)  # 2 attention heads
    with pytest.raises(ParallelError, match="must divide 2"):
        Group(GroupPlan(("cpu",) * 3, "ulysses"), 0, []).parallelise(pipe)


def test_a_step_cache_is_refused_in_a_group(flux_dir: Path) -> None:
    spec = models.resolve(str(flux_dir))
    group = Group(GroupPlan(("cpu", "cpu"), "ulysses"), 0, [])
    group.parallelise = lambda pipe: None  # the refusal comes before any rank is needed
    options = dataclasses.replace(LoadOptions(threads=1), step_cache="first-block")
    with pytest.raises(ParallelError, match="decide apart which steps to skip"):
        PipelineRunner(spec, options, group=group)
