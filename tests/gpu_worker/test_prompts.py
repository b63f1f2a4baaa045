"""Prompts a CLIP-only model cannot read whole come back with a warning, end to end: the
runner's count, the worker's RESULT, the frontend's response."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

from broker import protocol
from broker.protocol import JobSpec, MsgType
from gpu_worker import models
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.prompts import truncation_warnings
from gpu_worker.tiny import build_tiny_pipeline

LONG = " ".join(["a red lighthouse on a rocky shore at dusk"] * 12)  # ~110 CLIP tokens


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = tmp_path_factory.mktemp("sd") / "model"
    build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runner(sd_path: Path) -> PipelineRunner:
    """A CLIP-only model that reads no weights (as Stable Cascade): it cuts prompts short."""
    spec = models.resolve(str(sd_path)).with_defaults(prompt_weighting=False)
    made = PipelineRunner(spec, LoadOptions(threads=1))
    assert made.prompt_encoder is None
    return made


def test_sd_reads_the_whole_prompt_and_says_nothing(sd_path: Path) -> None:
    weighing = PipelineRunner(models.resolve(str(sd_path)), LoadOptions(threads=1))
    assert weighing.spec.prompt_weighting
    assert weighing.prompt_warnings(job(LONG)) == []


def job(prompt: str, negative: str | None = None) -> JobSpec:
    return JobSpec(id="j", model="m", prompt=prompt, width=64, height=64, steps=2, seeds=(1,),
                   negative_prompt=negative)


def test_a_prompt_past_clip_says_how_much_was_read(runner: PipelineRunner) -> None:
    [warning] = runner.prompt_warnings(job(LONG))
    assert "reads the first 75 (CLIP)" in warning and "the prompt is" in warning
    assert runner.prompt_warnings(job("a lighthouse")) == []


def test_the_negative_prompt_is_counted_too(runner: PipelineRunner) -> None:
    warnings = runner.prompt_warnings(job("a lighthouse", negative=LONG))
    assert len(warnings) == 1 and "the negative prompt is" in warnings[0]


def test_a_model_with_a_long_encoder_is_not_warned_about(runner: PipelineRunner) -> None:
    assert truncation_warnings(runner.pipe, job(LONG), model="m", long_encoder=True) == []


def test_the_warning_travels_in_the_result_and_is_checked_there() -> None:
    image = protocol.ImageInfo(seed=1, width=8, height=8, format="png")
    frames = protocol.result("j", [image], [b"png"], warnings=["cut short"])
    assert protocol.decode(frames)["warnings"] == ["cut short"]
    too_many = protocol.encode(MsgType.RESULT, {"job_id": "j", "images": [image],
                                                "warnings": ["w"] * 9}, [b"png"])
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(too_many)
