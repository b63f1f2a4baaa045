"""Hostile and unusual prompts against the weighting parser (gpu_worker/prompt_syntax.py) and
the compel encoder (gpu_worker/prompt_embeds.py), on the tiny random-weight SD and SDXL
pipelines at 64x64, 2 steps."""

from __future__ import annotations

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"


import numpy as np
import pytest
from PIL import Image

from broker.protocol import JobSpec
from gpu_worker import prompt_syntax
from gpu_worker.editing import EditInputs
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.prompt_embeds import MAX_TOKENS, _capped, _token_count
from gpu_worker.prompt_syntax import Fragment, PromptSyntaxError
from tests.gpu_worker.lora_fixtures import lora_folder
from tests.gpu_worker.test_prompt_embeds import runner, sd, sdxl

__all__ = ["runner", "sd", "sdxl"]  # the tiny SD and SDXL runners, as fixtures here too

LONG = " ".join(["a red lighthouse on a rocky shore at dusk"] * 12)  # past 77 CLIP tokens


def job(prompt: str, negative: str | None = None, *, job_id: str = "j", seed: int = 1,
        n: int = 1, guidance: float | None = 5.0, previews: int = 0, **edit: object
        ) -> JobSpec:
    return JobSpec(id=job_id, model="m", prompt=prompt, negative_prompt=negative, width=64,
                   height=64, steps=2, seeds=tuple(range(seed, seed + n)), guidance=guidance,
                   previews=previews, **edit)  # type: ignore[arg-type]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------ the parser


def zero_point(digits: int) -> str:
    """0.000...01 written out: a weight far below what a float multiplies without loss."""
    return "0." + "0" * digits + "1"


@pytest.mark.parametrize("prompt", [
    "[" * 8000 + "a" + "]" * 8000 + " c",  # 16,003 characters: within MAX_PROMPT_CHARS
    "[" * 7500 + "a" + "]" * 7500 + " c",
    f"((a (b:{zero_point(199)})):{zero_point(199)}) c",
])
def test_words_outside_every_group_weigh_one_however_deep_the_groups(prompt: str) -> None:
    """A product of weights that leaves a float's range (under or over) must not leak past
    the groups that made it: the words after them weigh 1."""
    fragments = prompt_syntax.check(prompt)
    assert fragments[-1] == Fragment("c", 1.0)
    assert fragments[0].weight == 0.0  # inside: 1.1**-8000 and the like, as near 0 as can be


def test_a_deep_group_that_overflows_is_refused_for_its_own_words() -> None:
    prompt = "(" * 8000 + "a" + ")" * 8000 + " c"
    with pytest.raises(PromptSyntaxError, match="'a'"):
        prompt_syntax.check(prompt)


@pytest.mark.parametrize(("prompt", "expected"), [
    ("(x:.)", [("x:.", 1.1)]),  # no number: text, and the group is a plain one
    ("(x:1.)", [("x", 1.0)]),
    ("(x:+1.5)", [("x", 1.5)]),
    ("(x:-0)", [("x", 0.0)]),
    ("(x:1e3)", [("x:1e3", 1.1)]),  # no exponents
    ("(x:1 . 5)", [("x:1 . 5", 1.1)]),
    ("a\\", [("a\\", 1.0)]),  # a trailing backslash is itself
    ("a \\\\(b)", [("a \\", 1.0), ("b", 1.1)]),  # an escaped backslash, then a group
    ("(a:1.5):1.2)", [("a", 1.5), (":1.2)", 1.0)]),
    ("(a (b:0.5):2)", [("a ", 2.0), ("b", 1.0)]),
    ("\x01(\u200b:1.5)", [("\x01", 1.0), ("\u200b", 1.5)]),
])
def test_colon_and_escape_tricks(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert [(f.text, f.weight) for f in prompt_syntax.check(prompt)] == expected


def test_a_weight_of_hundreds_of_digits_is_refused_not_a_crash() -> None:
    with pytest.raises(PromptSyntaxError, match="from 0 to 10"):
        prompt_syntax.check("(a:" + "9" * 400 + ") b")


# ------------------------------------------------------------------ the encoder


@pytest.mark.parametrize("prompt", [
    "a [\u200b] b",  # a part that tokenizes to nothing, weighed down
    "a (\x01\x02:1.5) b",  # and weighed up
    "(b:0)",  # the whole prompt at weight 0
    "[b]", "()", "(:1.5)", "\x01", "a\\",
])
def test_prompts_that_tokenize_to_little_or_nothing_still_make_an_image(
        runner: PipelineRunner, prompt: str) -> None:
    [image] = runner.generate(job(prompt))
    assert image.size == (64, 64)


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_without_guidance_a_long_negative_does_not_break_the_batch(
        runner: PipelineRunner, guidance: float) -> None:
    """Guidance <= 1 reads no negative prompt: a job's unread long negative must not put it
    in a group whose length its embeddings do not have. Both jobs make the images they make
    alone (batching may move a last bit)."""
    jobs = [job(LONG, job_id="a", guidance=guidance),
            job("a ship", LONG, job_id="b", seed=2, guidance=guidance)]
    batched = runner.generate_batch(jobs)
    for made, one in zip(batched, jobs, strict=True):
        [alone] = runner.generate(one)
        assert np.abs(pixels(made[0]) - pixels(alone)).max() <= 2, one.id
    # And the long negative changes nothing without guidance.
    [without] = runner.generate(job("a ship", seed=2, guidance=guidance))
    assert np.array_equal(pixels(batched[1][0]), pixels(without))


def test_an_empty_negative_prompt_is_no_negative_prompt_on_sdxl(sdxl: PipelineRunner) -> None:
    """SDXL's unconditional embeddings are zeros with no negative prompt; "" is no negative
    prompt (the frontend treats it so, as did the worker before compel): the same bytes."""
    [none] = sdxl.generate(job("a ship", None))
    [empty] = sdxl.generate(job("a ship", ""))
    assert np.array_equal(pixels(none), pixels(empty))


@pytest.mark.parametrize("text", ["龍" * 700, "a " + "é" * 700, "a a " + "🐉" * 700])
def test_a_cut_prompt_takes_no_more_than_max_tokens(sd: PipelineRunner, text: str) -> None:
    """The cut falls inside a word of many tokens: the words kept, read again, must still
    be within MAX_TOKENS."""
    encoder = sd.prompt_encoder
    assert encoder is not None
    compel = encoder._compels()[0]
    kept = _capped(compel, prompt_syntax.parse(text))
    assert 0 < encoder.tokens(prompt_syntax.plain_text(kept)) <= MAX_TOKENS
    # Compel's chunks break where they can: at most one chunk more than MAX_TOKENS fills.
    assert _token_count(compel, kept) <= 77 * (MAX_TOKENS // 75 + 1)


def test_a_weighted_long_prompt_on_a_chunk_boundary(runner: PipelineRunner) -> None:
    """A part weighed down that straddles the 75th token, and prompts of exactly 75, 76 and
    150 tokens: each an image, and the weight still counts."""
    encoder = runner.prompt_encoder
    assert encoder is not None
    words = "a red lighthouse on a rocky shore at dusk " * 20
    ids = encoder._compels()[0].conditioning_provider.get_token_ids(
        [words], include_start_and_end_markers=False)[0]
    decode = encoder._compels()[0].conditioning_provider.tokenizer.decode
    for count in (75, 76, 150):
        text = decode(ids[:count])
        assert runner.generate(job(text))
    head, tail = decode(ids[:70]), decode(ids[70:90])
    plain = pixels(runner.generate(job(f"{head} {tail}"))[0])
    weighed = pixels(runner.generate(job(f"{head} [{tail}]"))[0])
    assert not np.array_equal(plain, weighed)


def test_sdxl_jobs_with_and_without_negatives_and_different_lengths_in_one_batch(
        sdxl: PipelineRunner) -> None:
    jobs = [job("a (ship:1.3)", job_id="a", n=2), job("a ship", "fog", job_id="b", seed=3),
            job(LONG, job_id="c", seed=4), job("[a ship]", LONG, job_id="d", seed=5)]
    batched = sdxl.generate_batch(jobs)
    assert [len(images) for images in batched] == [2, 1, 1, 1]
    for made, one in zip(batched, jobs, strict=True):
        for image, alone in zip(made, sdxl.generate(one), strict=True):
            assert np.abs(pixels(image) - pixels(alone)).max() <= 2, one.id


def test_previews_of_a_batch_split_by_length_go_to_their_images(sd: PipelineRunner) -> None:
    """Three jobs, n 2, 1 and 2, the middle one long: two calls. Each preview list holds a
    preview at exactly the places of the images its call made."""
    jobs = [job("a ship", job_id="a", n=2, previews=2), job(LONG, job_id="b", seed=3,
                                                           previews=2),
            job("a fox", job_id="c", seed=4, n=2, previews=2)]
    seen: list[list[int]] = []

    def on_step(done: int, total: int, previews: list[Image.Image | None]) -> bool:
        if previews:
            seen.append([i for i, p in enumerate(previews) if p is not None])
        return True

    batched = sd.generate_batch(jobs, on_step)
    assert [len(images) for images in batched] == [2, 1, 2]
    assert seen and all(places in ([0, 1, 3, 4], [2]) for places in seen)
    assert [0, 1, 3, 4] in seen and [2] in seen


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_edits_with_weighted_prompts_of_different_lengths_keep_their_own_inputs(
        sd: PipelineRunner, mask: bool) -> None:
    edit = {"inputs": 1, "mask": mask, "strength": 0.75}
    jobs = [job("a (fox:1.4)", job_id="a", n=2, **edit),
            job(LONG, "[blurry]", job_id="b", seed=3, **edit)]
    white = Image.new("L", (64, 64), 255)
    inputs = {one.id: EditInputs.decode(one, [png(picture(k))] + ([png(white)] if mask else []))
              for k, one in enumerate(jobs)}
    batched = sd.generate_batch(jobs, None, inputs)
    for made, one in zip(batched, jobs, strict=True):
        solo = sd.generate_batch([one], None, {one.id: inputs[one.id]})[0]
        assert len(made) == one.n
        for image, alone in zip(made, solo, strict=True):
            assert np.abs(pixels(image) - pixels(alone)).max() <= 2, one.id


def test_same_weighted_request_same_bytes(runner: PipelineRunner) -> None:
    prompt = "a ((lighthouse)) [at dusk], (oil on canvas:1.3) " + LONG
    first = [image.tobytes() for image in runner.generate(job(prompt, "[blurry]", n=2))]
    again = [image.tobytes() for image in runner.generate(job(prompt, "[blurry]", n=2))]
    assert first == again and first[0] != first[1]


def test_a_prompt_the_frontend_would_refuse_fails_as_the_requests_fault(
        sd: PipelineRunner) -> None:
    """A lying or old frontend: weights out of range reach the worker, in the prompt or the
    negative, alone or behind a group of other lengths. PromptSyntaxError (the worker's
    invalid request), never another exception."""
    for jobs in ([job("(a:11)")], [job("a", "(b:-1)")],
                 [job("a ship", job_id="ok"), job(LONG + " (a:1e400)" + " (b:99)", job_id="bad")]):
        with pytest.raises(PromptSyntaxError):
            sd.generate_batch(jobs)


def test_adapters_with_weighted_prompts(sd: PipelineRunner,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """A LoRA adapter and a long weighted prompt in one batch of two lengths: each image is
    the one made alone, the adapter changes it, and the same request makes the same bytes
    after the adapter came off and on again."""
    folder = lora_folder(sd.pipe, tmp_path_factory.mktemp("adapters"), {"ink": 5})
    adapted = PipelineRunner(sd.spec, LoadOptions(threads=1, lora_dir=folder), pipe=sd.pipe)
    adapted.loras.announcement()  # the folder is read as a worker reads it
    try:
        ink = (("ink", 0.8),)
        jobs = [job("a (fox:1.4) [in fog]", job_id="a", n=2, loras=ink),
                job(LONG + " [blurry]", job_id="b", seed=3, loras=ink)]
        first = [[image.tobytes() for image in images]
                 for images in adapted.generate_batch(jobs)]
        without = adapted.generate(job("a (fox:1.4) [in fog]", n=2))
        assert without[0].tobytes() != first[0][0]
        again = [[image.tobytes() for image in images]
                 for images in adapted.generate_batch(jobs)]
        assert first == again
    finally:
        adapted.loras.apply(())


def test_a_job_without_guidance_gets_the_models_default_with_its_negative(
        sd: PipelineRunner) -> None:
    assert sd.generate(job(LONG, guidance=None))
    with_fog = pixels(sd.generate(job("a ship", "fog", guidance=None))[0])
    assert not np.array_equal(with_fog, pixels(sd.generate(job("a ship", guidance=None))[0]))
