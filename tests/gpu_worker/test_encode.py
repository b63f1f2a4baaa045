"""What encoded images say about themselves: the generation parameters in Automatic1111's
format and as JSON, the marking as AI-generated, both read back with Pillow; nothing that the
request and seed do not determine, and no prompt when the operator turns that off."""

from __future__ import annotations

import argparse
import io
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from gpu_worker.__main__ import add_worker_arguments, config_from_args
from gpu_worker.encode import (
    AI_GENERATED,
    FORMATS,
    JSON_KEY,
    PARAMETERS_KEY,
    XMP_NAMESPACE,
    Generation,
    ImageMetadata,
    encode_image,
)
from gpu_worker.worker import Worker, WorkerConfig
from tests.broker.fakes import make_spec

IMAGE = Image.new("RGB", (64, 64), (200, 120, 40))
SOURCE_TYPE = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}DigitalSourceType"
GENERATION = f"{{{XMP_NAMESPACE}}}generation"
FIELDS = {"prompt", "negative_prompt", "model", "width", "height", "steps", "guidance", "seed",
          "output_format"}
SECRET = "my secret prompt"


def metadata(seed: int = 7, **job: Any) -> ImageMetadata:
    fields: dict[str, Any] = {"prompt": "a lighthouse", "negative_prompt": "blurry",
                              "guidance": 5.0, "steps": 4, "seeds": (7, 8), **job}
    return ImageMetadata(Generation.of(make_spec(**fields), seed))


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment, decoded as Automatic1111 (piexif) decodes it."""
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if comment is None:
        return None
    assert comment[:8] == b"UNICODE\0"
    return bytes(comment[8:]).decode("utf-16-be")


def xmp(image: Image.Image) -> ET.Element:
    raw = image.info["xmp"]
    return ET.fromstring(raw.encode() if isinstance(raw, str) else raw)


def xmp_value(image: Image.Image, tag: str) -> str | None:
    found = xmp(image).find(f".//{tag}")
    return None if found is None else found.text


def written(image: Image.Image) -> tuple[str | None, dict[str, Any] | None]:
    """The parameters text and the JSON fields an image carries, from wherever its format
    keeps them."""
    if image.format == "PNG":
        text, fields = image.info.get(PARAMETERS_KEY), image.info.get(JSON_KEY)
    else:
        text, fields = user_comment(image), xmp_value(image, GENERATION)
    return text, None if fields is None else json.loads(fields)


def test_png_carries_automatic1111_parameters_json_and_the_ai_marking() -> None:
    image = opened(encode_image(IMAGE, "png", metadata=metadata()))
    assert image.info[PARAMETERS_KEY] == (
        "a lighthouse\nNegative prompt: blurry\n"
        "Steps: 4, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: tiny")
    assert json.loads(image.info[JSON_KEY]) == {
        "prompt": "a lighthouse", "negative_prompt": "blurry", "model": "tiny", "width": 64,
        "height": 64, "steps": 4, "guidance": 5.0, "seed": 7, "output_format": "png"}
    assert xmp_value(image, SOURCE_TYPE) == AI_GENERATED
    assert xmp_value(image, GENERATION) is None  # PNG has its own JSON chunk


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_the_parameters_in_exif_and_the_json_in_xmp(fmt: str) -> None:
    image = opened(encode_image(IMAGE, fmt, 90, metadata=metadata(output_format=fmt)))
    png = opened(encode_image(IMAGE, "png", metadata=metadata()))
    assert user_comment(image) == png.info[PARAMETERS_KEY]
    assert json.loads(xmp_value(image, GENERATION) or "") == {
        **json.loads(png.info[JSON_KEY]), "output_format": fmt}
    assert xmp_value(image, SOURCE_TYPE) == AI_GENERATED
    # As piexif writes it: big-endian TIFF, UserComment of type UNDEFINED.
    assert image.getexif().endian == ">"
    assert b"\x92\x86\x00\x07" in image.info["exif"]


def test_fields_the_request_left_out_are_left_out() -> None:
    gen = metadata(negative_prompt=None, guidance=None, model="C:/models/x, v2").generation
    assert gen is not None
    assert gen.parameters() == (
        'a lighthouse\nSteps: 4, Seed: 7, Size: 64x64, Model: "C:/models/x, v2"')
    assert json.loads(gen.to_json())["negative_prompt"] is None
    assert set(json.loads(gen.to_json())) == FIELDS


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_job_and_seed_give_identical_bytes_and_seeds_differ_only_in_the_seed(
        fmt: str) -> None:
    first, again = (encode_image(IMAGE, fmt, metadata=metadata(7)) for _ in range(2))
    assert first == again
    seven, eight = written(opened(first)), written(opened(encode_image(IMAGE, fmt,
                                                                       metadata=metadata(8))))
    assert seven[0] is not None and eight[0] is not None
    assert eight[0] == seven[0].replace("Seed: 7,", "Seed: 8,") != seven[0]
    assert seven[1] is not None and eight[1] == {**seven[1], "seed": 8}


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_image_metadata_no_prompt_is_left_but_the_marking_stays(fmt: str) -> None:
    data = encode_image(IMAGE, fmt, metadata=ImageMetadata(None))
    for form in ("utf-8", "utf-16-be", "utf-16-le"):
        assert SECRET.encode(form) not in data
    image = opened(data)
    assert written(image) == (None, None)
    assert "exif" not in image.info
    assert xmp_value(image, SOURCE_TYPE) == AI_GENERATED
    with_prompt = encode_image(IMAGE, fmt, metadata=metadata(prompt=SECRET))
    assert SECRET.encode() in with_prompt or SECRET.encode("utf-16-be") in with_prompt


@pytest.mark.parametrize("fmt", FORMATS)
def test_previews_carry_nothing(fmt: str) -> None:
    image = opened(encode_image(IMAGE, fmt))
    assert not {"xmp", "exif", PARAMETERS_KEY, JSON_KEY} & set(image.info)


HOSTILE = ['café \u2603\nline two', 'say "hi", then: leave\r\n\ttab', "</dcluster:generation>&<",
           "\U0001f680 \ufffe\uffff \x7f\x85", "\x01\x1f control"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prompt", HOSTILE)
def test_hostile_prompts_round_trip(fmt: str, prompt: str) -> None:
    meta = metadata(prompt=prompt, negative_prompt=prompt)
    assert meta.generation is not None
    text, fields = written(opened(encode_image(IMAGE, fmt, metadata=meta)))
    assert text == meta.generation.parameters()
    assert fields is not None and fields["prompt"] == fields["negative_prompt"] == prompt


def test_lone_surrogates_become_replacement_characters() -> None:
    meta = metadata(prompt="a\ud800b \ud83d\ude80")  # a lone one, and a pair in two halves
    assert meta.generation is not None and meta.generation.prompt == "a\ufffdb \U0001f680"
    for fmt in FORMATS:
        assert written(opened(encode_image(IMAGE, fmt, metadata=meta)))[1] is not None


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(exclude_categories=()), max_size=200),  # surrogates included
       st.sampled_from(FORMATS))
def test_any_prompt_encodes_and_reads_back(prompt: str, fmt: str) -> None:
    meta = metadata(prompt=prompt)
    assert meta.generation is not None
    text, fields = written(opened(encode_image(IMAGE, fmt, metadata=meta)))
    assert text == text_of(meta)
    assert fields is not None and fields["prompt"] == meta.generation.prompt


def text_of(meta: ImageMetadata) -> str:
    assert meta.generation is not None
    return meta.generation.parameters()


def test_a_32000_character_prompt_keeps_every_copy() -> None:
    prompt = "a lighthouse, " * 2285 + "sea"
    assert len(prompt) == 31993
    meta = metadata(prompt=prompt)
    for fmt in FORMATS:
        text, fields = written(opened(encode_image(IMAGE, fmt, metadata=meta)))
        assert text == text_of(meta) and fields is not None and fields["prompt"] == prompt


def test_a_jpeg_segment_too_long_is_left_out_whole_and_the_marking_stays() -> None:
    # 32000 snowmen in each prompt: 128 KB of UTF-16 for EXIF, 192 KB of UTF-8 for XMP.
    meta = metadata(prompt="\u2603" * 32000, negative_prompt="\u2603" * 32000)
    jpeg = opened(encode_image(IMAGE, "jpeg", metadata=meta))
    assert written(jpeg) == (None, None)
    assert xmp_value(jpeg, SOURCE_TYPE) == AI_GENERATED
    for fmt in ("png", "webp"):  # no such limit: everything stays
        text, fields = written(opened(encode_image(IMAGE, fmt, metadata=meta)))
        assert text == text_of(meta) and fields is not None


def test_a_jpeg_keeps_the_xmp_copy_when_only_the_exif_one_is_too_long() -> None:
    meta = metadata(prompt="a" * 32000, negative_prompt="b" * 2000)  # 68 KB in UTF-16
    text, fields = written(opened(encode_image(IMAGE, "jpeg", metadata=meta)))
    assert text is None and fields is not None and fields["prompt"] == "a" * 32000


def worker_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return parser.parse_args(["--device", "cpu", *argv])


@pytest.mark.parametrize(("argv", "with_prompt"), [((), True), (("--no-image-metadata",), False)])
def test_the_worker_flag_decides_what_results_carry(argv: tuple[str, ...],
                                                    with_prompt: bool) -> None:
    config = config_from_args(worker_flags(*argv))
    assert config.image_metadata is with_prompt
    worker = Worker(WorkerConfig(image_metadata=config.image_metadata, warm_up=False))
    meta = worker._metadata(make_spec(prompt=SECRET, seeds=(3, 4)), 4)
    assert meta == ImageMetadata(Generation.of(make_spec(prompt=SECRET), 4) if with_prompt
                                 else None, model=make_spec().model)
