"""Weighted and long prompts for SD and SDXL (gpu_worker/prompt_embeds.py), on the tiny
random-weight pipelines: plain prompts keep diffusers' own images bit for bit, weights and
the words past 77 tokens change them, and a job's embeddings never depend on its batch."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.prompt_embeds import MAX_TOKENS
from gpu_worker.prompt_syntax import MAX_DOWNWEIGHTED, PromptSyntaxError
from tests.gpu_worker.families import sd as sd_family
from tests.gpu_worker.families import sdxl as sdxl_family

LONG = " ".join(["a red lighthouse on a rocky shore at dusk"] * 12)  # ~110 CLIP tokens


def runner_for(build, tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    path: Path = tmp_path_factory.mktemp("model") / "model"
    build(path)
    made = PipelineRunner(models.resolve(str(path)), LoadOptions(threads=1))
    assert made.spec.prompt_weighting and made.prompt_encoder is not None
    return made


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    return runner_for(sd_family.build, tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    return runner_for(sdxl_family.build, tmp_path_factory)


@pytest.fixture(params=["sd", "sdxl"])
def runner(request: pytest.FixtureRequest) -> PipelineRunner:
    return request.getfixturevalue(request.param)


def job(prompt: str, negative: str | None = None, *, job_id: str = "j", seed: int = 1,
        n: int = 1) -> JobSpec:
    return JobSpec(id=job_id, model="m", prompt=prompt, negative_prompt=negative, width=64,
                   height=64, steps=2, seeds=tuple(range(seed, seed + n)), guidance=5.0)


def pixels(runner: PipelineRunner, prompt: str, negative: str | None = None) -> np.ndarray:
    return np.asarray(runner.generate(job(prompt, negative))[0])


def diffusers_own(runner: PipelineRunner, prompt: str, negative: str | None) -> np.ndarray:
    """The image diffusers makes from the same text, without our encoder."""
    generator = torch.Generator("cpu").manual_seed(1)
    image = runner.pipe(prompt=prompt, negative_prompt=negative, width=64, height=64,
                        num_inference_steps=2, guidance_scale=5.0, generator=[generator]).images[0]
    return np.asarray(image)


@pytest.mark.parametrize("negative", [None, "blurry, dark"])
def test_plain_prompts_make_diffusers_own_images(runner: PipelineRunner,
                                                 negative: str | None) -> None:
    """Bit for bit: SDXL with no negative prompt included (its zeros), so the images of
    prompts without weights are what they were before weighting existed."""
    prompt = "a lighthouse at dusk, oil on canvas"
    assert np.array_equal(pixels(runner, prompt, negative),
                          diffusers_own(runner, prompt, negative))


def test_weights_change_the_image(runner: PipelineRunner) -> None:
    plain = pixels(runner, "a lighthouse at dusk")
    up = pixels(runner, "a (lighthouse:1.6) at dusk")
    down = pixels(runner, "a [lighthouse] at dusk")
    assert not np.array_equal(plain, up) and not np.array_equal(plain, down)
    assert not np.array_equal(up, down)
    assert np.array_equal(up, pixels(runner, "a (lighthouse:1.6) at dusk"))  # and repeat
    assert np.array_equal(plain, pixels(runner, "a (lighthouse:1) at dusk"))  # 1 is no weight


def test_escaped_brackets_are_the_characters(runner: PipelineRunner) -> None:
    assert np.array_equal(pixels(runner, r"a \(red\) lighthouse"),
                          diffusers_own(runner, "a (red) lighthouse", None))


def test_the_words_past_77_tokens_are_read(runner: PipelineRunner) -> None:
    assert not np.array_equal(pixels(runner, LONG), pixels(runner, LONG + " under snow"))
    assert runner.prompt_warnings(job(LONG)) == []
    # A long negative prompt with a short prompt: both are padded to the same length.
    assert not np.array_equal(pixels(runner, "a lighthouse", LONG),
                              pixels(runner, "a lighthouse", LONG + " under snow"))


def test_a_jobs_embeddings_do_not_depend_on_its_batch(runner: PipelineRunner) -> None:
    """Its own length, its own negative: SDXL's zeros for a job without a negative prompt
    stay zeros beside one with a negative (diffusers would encode "" for the whole call)."""
    encoder = runner.prompt_encoder
    assert encoder is not None
    alone = job("a (lighthouse:1.3)", job_id="alone", n=2)
    beside = job("a ship", "fog", job_id="beside")
    for batch in ([alone], [alone, beside], [beside, alone]):
        groups = encoder.groups(batch, guided=True)
        assert len(groups) == 1
        made = encoder.call_kwargs(batch, [j.negative_prompt for j in batch], guided=True)
        rows = slice(0, 2) if batch[0] is alone else slice(1, 3)
        mine = {name: tensor[rows] for name, tensor in made.items()}
        if batch == [alone]:
            first = mine
        else:
            assert mine.keys() == first.keys()
            assert all(torch.equal(mine[name], first[name]) for name in mine)
    if encoder.xl:
        assert not torch.any(first["negative_prompt_embeds"])


def test_prompts_of_different_lengths_run_in_groups_and_answer_in_order(
        runner: PipelineRunner) -> None:
    jobs = [job("a lighthouse", job_id="a"), job(LONG, job_id="b", seed=2),
            job("a ship", job_id="c", seed=3, n=2)]
    encoder = runner.prompt_encoder
    assert encoder is not None
    groups = encoder.groups(jobs, guided=True)
    assert [[j.id for j in group] for group in groups] == [["a", "c"], ["b"]]
    progress: list[tuple[int, int]] = []
    batched = runner.generate_batch(
        jobs, lambda done, total, previews: progress.append((done, total)) or True)
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # two calls of two steps
    for made, one in zip(batched, jobs, strict=True):
        solo = runner.generate(one)
        assert len(made) == one.n
        for image, alone in zip(made, solo, strict=True):  # batching may move a last bit
            diff = np.abs(np.asarray(image, int) - np.asarray(alone, int))
            assert diff.max() <= 2, one.id


def test_too_many_downweighted_parts_fail_the_job(sd: PipelineRunner) -> None:
    prompt = ", ".join(f"[word{i}]" for i in range(MAX_DOWNWEIGHTED + 1))
    with pytest.raises(PromptSyntaxError):
        sd.generate(job(prompt))


def test_a_prompt_is_read_up_to_its_limit_and_the_rest_is_said_to_be_ignored(
        sd: PipelineRunner) -> None:
    """Chunks cost the text encoder a pass each and the denoiser attends to every token:
    past MAX_TOKENS the rest is cut, and the answer says so."""
    huge = " ".join(["a red lighthouse on a rocky shore at dusk"] * 80)  # ~800 tokens
    encoder = sd.prompt_encoder
    assert encoder is not None and encoder.tokens(huge) > MAX_TOKENS
    assert np.array_equal(pixels(sd, huge), pixels(sd, huge + " under deep snow"))
    [warning] = sd.prompt_warnings(job(huge))
    assert f"reads the first {MAX_TOKENS}" in warning and "the prompt is" in warning
    [[only]] = encoder.groups([job(huge)], guided=True)
    made = encoder.call_kwargs([only], [None], guided=True)
    assert made["prompt_embeds"].shape[1] <= 77 * (MAX_TOKENS // 75 + 1)
