"""Request parsing, model fitting and response shaping (http_frontend.schema)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker import models
from http_frontend import schema
from http_frontend.errors import APIError
from tests.openapi_spec import validate

TINY = models.lookup("tiny")  # 256x256 default, multiples of 8, <= 1024*1024 px, <= 50 steps
SDXL = models.lookup("sdxl")
FLUX = models.lookup("flux-schnell")


def body(**fields):
    return {"prompt": "a lighthouse at dusk", **fields}


def fit(spec=TINY, **fields) -> schema.FittedRequest:
    return schema.fit_to_model(schema.parse_request(body(**fields)), spec)


def assert_bad(call, param):
    with pytest.raises(APIError) as info:
        call()
    error = info.value
    assert error.status == 400
    assert error.param == param
    assert error.type == "invalid_request_error"
    assert error.message
    validate(error.body(), "ErrorResponse")
    return error


# ------------------------------------------------------------------------------ parse_request

BAD_FIELDS = [
    # prompt
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n"}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x" * (schema.MAX_PROMPT_CHARS + 1)}, "prompt"),
    # n
    (body(n=0), "n"),
    (body(n=11), "n"),
    (body(n=-1), "n"),
    (body(n="3"), "n"),
    (body(n=True), "n"),
    (body(n=2.0), "n"),
    # size
    (body(size="abc"), "size"),
    (body(size="0x0"), "size"),
    (body(size="0x256"), "size"),
    (body(size="256x"), "size"),
    (body(size="-8x8"), "size"),
    (body(size="256 x 256"), "size"),
    (body(size=""), "size"),
    (body(size=256), "size"),
    (body(size="1" * 40), "size"),
    # formats
    (body(output_format="gif"), "output_format"),
    (body(output_format="PNG"), "output_format"),
    (body(response_format="base64"), "response_format"),
    (body(output_compression=101), "output_compression"),
    (body(output_compression=-1), "output_compression"),
    (body(output_compression="50"), "output_compression"),
    (body(output_compression=50.5), "output_compression"),
    # the spec's enumerated fields
    (body(quality="ultra"), "quality"),
    (body(quality=1), "quality"),
    (body(background="black"), "background"),
    (body(moderation="high"), "moderation"),
    (body(moderation="none"), "moderation"),
    (body(style="cartoon"), "style"),
    (body(stream="yes"), "stream"),
    (body(stream=1), "stream"),
    (body(partial_images=4), "partial_images"),
    (body(partial_images=-1), "partial_images"),
    # steps
    (body(steps=0), "steps"),
    (body(steps=-1), "steps"),
    (body(steps=1001), "steps"),
    (body(steps="10"), "steps"),
    (body(steps=2.5), "steps"),
    # guidance
    (body(guidance=-1), "guidance"),
    (body(guidance="x"), "guidance"),
    (body(guidance=101), "guidance"),
    (body(guidance=True), "guidance"),
    (body(guidance=math.nan), "guidance"),
    (body(guidance=math.inf), "guidance"),
    # seed
    (body(seed=-1), "seed"),
    (body(seed="x"), "seed"),
    (body(seed=1.5), "seed"),
    (body(seed=1.0), "seed"),
    (body(seed=True), "seed"),
    (body(seed=2**63), "seed"),
    # width / height
    (body(width=0), "width"),
    (body(width=-8), "width"),
    (body(width="512"), "width"),
    (body(width=512.0), "width"),
    (body(width=16385), "width"),
    (body(height=0), "height"),
    (body(height="512"), "height"),
    (body(height=False), "height"),
    # free text and identity
    (body(negative_prompt=5), "negative_prompt"),
    (body(negative_prompt="x" * (schema.MAX_PROMPT_CHARS + 1)), "negative_prompt"),
    (body(user=5), "user"),
    (body(user="u" * 257), "user"),
    (body(model=5), "model"),
    (body(model=""), "model"),
    # timeout
    (body(timeout=0), "timeout"),
    (body(timeout=-5), "timeout"),
    (body(timeout="10"), "timeout"),
    (body(timeout=math.nan), "timeout"),
    (body(timeout=math.inf), "timeout"),
    # step_cache
    (body(step_cache="false"), "step_cache"),
    (body(step_cache=0), "step_cache"),
    (body(step_cache=[]), "step_cache"),
]


@pytest.mark.parametrize(("request_body", "param"), BAD_FIELDS,
                         ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_FIELDS)])
def test_each_bad_field_is_a_400_naming_it(request_body, param):
    assert_bad(lambda: schema.parse_request(request_body), param)


@pytest.mark.parametrize("request_body", [[], ["prompt"], "prompt", 3, None, True])
def test_a_body_that_is_not_an_object_is_a_400(request_body):
    error = assert_bad(lambda: schema.parse_request(request_body), None)
    assert "object" in error.message


def test_codes_say_what_kind_of_mistake():
    def code(request_body):
        with pytest.raises(APIError) as info:
            schema.parse_request(request_body)
        return info.value.code

    assert code({}) == "missing_required_parameter"
    assert code(body(n="3")) == "invalid_type"
    assert code(body(n=11)) == "invalid_value"
    assert code(body(prompt="x" * (schema.MAX_PROMPT_CHARS + 1))) == "string_above_max_length"


def test_response_format_is_none_when_not_sent():
    # The service fills in the server's default (--default-response-format).
    assert schema.parse_request(body()).response_format is None
    assert schema.parse_request(body(response_format="url")).response_format == "url"


def test_the_longest_prompt_is_accepted():
    req = schema.parse_request(body(prompt="x" * schema.MAX_PROMPT_CHARS))
    assert len(req.prompt) == schema.MAX_PROMPT_CHARS


def test_range_edges_are_accepted():
    req = schema.parse_request(body(n=10, output_compression=0, steps=1, guidance=0, seed=0,
                                    partial_images=3, timeout=0.5))
    assert (req.n, req.output_compression, req.steps, req.guidance, req.seed) == (10, 0, 1, 0.0, 0)
    req = schema.parse_request(body(n=1, output_compression=100, guidance=100,
                                    seed=schema.MAX_SEED))
    assert req.seed == schema.MAX_SEED
    assert isinstance(req.guidance, float)


def test_null_means_the_default_as_in_the_spec():
    req = schema.parse_request(body(n=None, size=None, quality=None, output_format=None,
                                    model=None, stream=None, partial_images=None))
    assert (req.n, req.size, req.quality, req.output_format, req.model, req.stream) == \
        (1, "auto", "auto", "png", None, False)


@pytest.mark.parametrize(("field", "values"), [
    ("quality", schema._ENUMS["quality"]),
    ("background", schema._ENUMS["background"]),
    ("moderation", schema._ENUMS["moderation"]),
    ("style", schema._ENUMS["style"]),
    ("output_format", schema.OUTPUT_FORMATS),
])
def test_every_spec_enum_value_is_accepted(field, values):
    for value in values:
        req = schema.parse_request(body(**{field: value}))
        assert getattr(req, field) == value


def test_spec_fields_are_accepted():
    req = schema.parse_request(body(model="tiny", quality="high", background="opaque",
                                    moderation="low", style="natural", stream=False,
                                    partial_images=2, user="user-1234", response_format="b64_json",
                                    output_format="webp", output_compression=80))
    assert (req.quality, req.background, req.moderation, req.style) == \
        ("high", "opaque", "low", "natural")
    assert (req.partial_images, req.user, req.output_format, req.output_compression) == \
        (2, "user-1234", "webp", 80)


def test_every_accepted_request_also_matches_the_spec_request_schema():
    sent = body(model="tiny", n=2, quality="low", size="1024x1024", output_format="jpeg",
                output_compression=50, moderation="auto", background="auto", style="vivid",
                user="u", partial_images=0, stream=False)
    validate(sent, "CreateImageRequest")
    schema.parse_request(sent)


def test_unknown_fields_are_ignored():
    assert schema.parse_request(body(frobnicate=1)).prompt == "a lighthouse at dusk"


# ------------------------------------------------------------------------------ fit_to_model

def test_defaults_come_from_the_model():
    fitted = fit(TINY)
    assert (fitted.width, fitted.height) == TINY.default_size == (256, 256)
    assert fitted.steps == TINY.default_steps
    assert fitted.guidance == TINY.default_guidance
    assert fitted.warnings == ()

    turbo = models.lookup("sdxl-turbo")
    fitted = fit(turbo, size="auto")
    assert (fitted.width, fitted.height) == turbo.default_size == (512, 512)
    assert (fitted.steps, fitted.guidance) == (turbo.default_steps, turbo.default_guidance)


def test_explicit_values_win_over_model_defaults():
    fitted = fit(TINY, size="512x128", steps=7, guidance=0)
    assert (fitted.width, fitted.height, fitted.steps, fitted.guidance) == (512, 128, 7, 0.0)


@pytest.mark.parametrize(("fields", "size"), [
    ({"width": 512, "height": 128}, (512, 128)),
    ({"width": 512}, (512, 256)),  # the other side from the model's default size
    ({"height": 64}, (256, 64)),
    ({"size": "128x64", "width": 128}, (128, 64)),  # agreeing with size is fine
    ({"size": "128x64", "width": 128, "height": 64}, (128, 64)),
])
def test_width_and_height_extension(fields, size):
    fitted = fit(TINY, **fields)
    assert (fitted.width, fitted.height) == size


@pytest.mark.parametrize("fields", [
    {"size": "256x256", "width": 512},
    {"size": "256x256", "height": 128},
    {"size": "256x256", "width": 256, "height": 128},
])
def test_size_and_width_height_that_disagree_are_a_400(fields):
    error = assert_bad(lambda: fit(TINY, **fields), "size")
    assert "disagree" in error.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"size": "13x13"}, "size"),  # tiny needs multiples of 8
    ({"size": "256x260"}, "size"),
    ({"width": 13}, "width"),
    ({"height": 12}, "height"),
    ({"size": "2048x2048"}, "size"),  # above tiny's 1024*1024 pixels
    ({"width": 4096, "height": 512}, "width"),
    ({"steps": TINY.max_steps + 1}, "steps"),
])
def test_model_limits_are_400s_never_clamped(fields, param):
    error = assert_bad(lambda: fit(TINY, **fields), param)
    assert "tiny" in error.message


def test_model_limit_edges_are_accepted():
    fitted = fit(TINY, size="1024x1024", steps=TINY.max_steps)
    assert (fitted.width, fitted.height, fitted.steps) == (1024, 1024, TINY.max_steps)
    smallest = fit(TINY, size="8x8")
    assert (smallest.width, smallest.height) == (8, 8)


def test_too_few_pixels_is_a_400():
    assert_bad(lambda: fit(SDXL, size="32x32"), "size")


def test_step_cache_is_on_unless_a_request_turns_it_off():
    assert fit(TINY).request.step_cache is True
    assert fit(TINY, step_cache=None).request.step_cache is True
    assert fit(TINY, step_cache=False).request.step_cache is False


def test_stream_and_partial_images_are_taken():
    fitted = fit(TINY, stream=True, partial_images=2)
    assert fitted.request.stream is True
    assert fitted.request.partial_images == 2
    assert fitted.warnings == ()


def test_negative_prompt_on_a_model_without_one_is_a_warning():
    fitted = fit(FLUX, negative_prompt="blurry")
    assert any("negative prompt" in w for w in fitted.warnings)
    assert fit(SDXL, negative_prompt="blurry").warnings == ()
    assert fit(FLUX).warnings == ()


# ------------------------------------------------------------------------------ images_response

def respond(fitted, n=1):
    images = [{"b64_json": "aGk=", "seed": 7 + i, "width": fitted.width, "height": fitted.height}
              for i in range(n)]
    out = schema.images_response(fitted, created=1_700_000_000, model="tiny", images=images)
    validate(out, "ImagesResponse")
    return out


def test_response_carries_spec_fields_and_extensions():
    fitted = fit(SDXL, size="1024x1024", quality="high", background="opaque",
                 output_format="webp", steps=20, guidance=4.5)
    out = respond(fitted, n=2)
    assert out["created"] == 1_700_000_000
    assert len(out["data"]) == 2
    assert (out["size"], out["quality"], out["background"], out["output_format"]) == \
        ("1024x1024", "high", "opaque", "webp")
    assert (out["model"], out["width"], out["height"], out["steps"], out["guidance"]) == \
        ("tiny", 1024, 1024, 20, 4.5)
    assert "warnings" not in out


@pytest.mark.parametrize("size", ["1024x1024", "1024x1536", "1536x1024"])
def test_spec_sizes_appear_as_size(size):
    assert respond(fit(SDXL, size=size))["size"] == size


@pytest.mark.parametrize("size", ["256x256", "512x512", "1024x512", "1792x1024"])
def test_other_sizes_only_appear_as_width_and_height(size):
    out = respond(fit(SDXL if size != "256x256" else TINY, size=size))
    assert "size" not in out
    assert f"{out['width']}x{out['height']}" == size


@pytest.mark.parametrize("quality", ["auto", "hd", "standard"])
def test_qualities_outside_the_response_enum_are_left_out(quality):
    assert "quality" not in respond(fit(TINY, quality=quality))


@pytest.mark.parametrize("quality", ["low", "medium", "high"])
def test_qualities_in_the_response_enum_are_echoed(quality):
    assert respond(fit(TINY, quality=quality))["quality"] == quality


def test_background_auto_is_left_out_and_the_others_echoed():
    assert "background" not in respond(fit(TINY))
    assert respond(fit(TINY, background="transparent"))["background"] == "transparent"


@pytest.mark.parametrize("fmt", schema.OUTPUT_FORMATS)
def test_output_format_is_echoed(fmt):
    assert respond(fit(TINY, output_format=fmt))["output_format"] == fmt


def test_warnings_are_returned():
    out = respond(fit(FLUX, negative_prompt="blurry"))
    assert len(out["warnings"]) == 1


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                       children, max_size=4),
    max_leaves=20,
)
_FIELDS = ["prompt", "model", "n", "size", "quality", "response_format", "output_format",
           "output_compression", "stream", "partial_images", "moderation", "background", "style",
           "user", "width", "height", "steps", "guidance", "seed", "negative_prompt", "timeout"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON, st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=8)))
def test_any_json_body_is_a_request_or_a_400_naming_a_real_field(body) -> None:
    """The request decoder never raises anything but a 400, and a 400 names a known field."""
    spec = models.REGISTRY["tiny"]
    try:
        request = schema.parse_request(body)
        schema.fit_to_model(request, spec)
    except APIError as exc:
        assert exc.status == 400
        assert exc.param is None or exc.param in _FIELDS


def test_a_model_with_fixed_sizes_takes_only_those() -> None:
    spec = models.REGISTRY["hunyuan-dit"]
    fitted = schema.fit_to_model(schema.parse_request({"prompt": "x", "size": "1280x768"}), spec)
    assert (fitted.width, fitted.height) == (1280, 768)
    with pytest.raises(APIError) as bad:
        schema.fit_to_model(schema.parse_request({"prompt": "x", "size": "1024x1280"}), spec)
    assert bad.value.param == "size"
    assert "1280x768" in bad.value.message


# ------------------------------------------------------------------------------ hostile text

# Every field parse_request reads as a string, with a value it accepts.
_STRING_FIELDS = {
    "prompt": "a lighthouse", "negative_prompt": "blurry", "user": "user-1", "model": "tiny",
    "size": "64x64", "quality": "high", "response_format": "b64_json", "output_format": "png",
    "moderation": "low", "background": "opaque", "style": "vivid",
}
# Text as JSON can carry it: any code point, lone surrogates (category Cs) included, which
# st.text() leaves out by default.
_ANY_TEXT = st.text(st.characters(categories=["Cs"]) | st.characters(codec=None), max_size=12)


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_STRING_FIELDS)), _ANY_TEXT, max_size=6))
def test_string_fields_are_parsed_as_unicode_or_refused_naming_the_field(fields) -> None:
    sent = {"prompt": "a lighthouse", **fields}
    try:
        request = schema.parse_request(sent)
    except APIError as exc:
        assert exc.status == 400
        assert exc.param in sent
        if not _encodes(sent[exc.param]):
            assert "Unicode" in exc.message
        validate(exc.body(), "ErrorResponse")
        return
    for name in _STRING_FIELDS:
        value = getattr(request, name)
        assert value is None or _encodes(value)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_STRING_FIELDS)), st.characters(categories=["Cs"]),
       st.integers(min_value=0, max_value=20))
def test_a_lone_surrogate_in_any_string_field_is_a_400_naming_it(field, surrogate, where):
    valid = _STRING_FIELDS[field]
    where = min(where, len(valid))
    sent = body(**{**_STRING_FIELDS, field: valid[:where] + surrogate + valid[where:]})
    error = assert_bad(lambda: schema.parse_request(sent), field)
    assert error.code == "invalid_value"
    assert "not valid Unicode" in error.message
    error.body()["error"]["message"].encode("utf-8")  # the answer itself encodes


@pytest.mark.parametrize("size", [
    "\uff16\uff14x\uff16\uff14",  # fullwidth digits
    "\u0666\u0664x\u0666\u0664",  # Arabic-Indic digits
    "64x64\n", " 64x64", "64x64 ", "64X64", "+64x64", "64x-64", "16385x8", "8x16385",
    "99999x99999", "000000064x64",
])
def test_size_takes_only_ascii_digits_within_the_side_limit(size):
    assert_bad(lambda: schema.parse_request(body(size=size)), "size")


def test_the_largest_side_is_accepted():
    assert schema.parse_size(f"{schema.MAX_SIDE}x8") == (schema.MAX_SIDE, 8)
    assert schema.parse_size("00064x64") == (64, 64)


@pytest.mark.parametrize(("seed", "n"), [(schema.MAX_SEED, 2), (schema.MAX_SEED - 8, 10),
                                         (schema.MAX_SEED - 1, 3)])
def test_every_seed_of_the_request_must_be_in_range(seed, n):
    error = assert_bad(lambda: schema.parse_request(body(seed=seed, n=n)), "seed")
    assert str(schema.MAX_SEED - n + 1) in error.message


@pytest.mark.parametrize("n", [1, 2, 10])
def test_the_highest_seed_for_each_n_is_accepted(n):
    request = schema.parse_request(body(seed=schema.MAX_SEED - n + 1, n=n))
    assert request.seed + request.n - 1 == schema.MAX_SEED


@pytest.mark.parametrize("field", sorted(_STRING_FIELDS))
def test_a_nul_character_in_any_string_field_is_a_400_naming_it(field) -> None:
    # Job records keep strings as text, which PostgreSQL refuses to hold a NUL in.
    valid = _STRING_FIELDS[field]
    error = assert_bad(lambda: schema.parse_request(
        body(**{**_STRING_FIELDS, field: valid[:2] + "\x00" + valid[2:]})), field)
    assert "NUL" in error.message and "position 2" in error.message


# ------------------------------------------------------------------------ prompt weighting

@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("spec", [TINY, SDXL], ids=["tiny", "sdxl"])
def test_weights_a_model_reads_are_checked_before_queueing(spec, field):
    error = assert_bad(lambda: fit(spec, **{field: "a (lighthouse:12) at dusk"}), field)
    assert "lighthouse" in error.message and "from 0 to 10" in error.message
    too_many = ", ".join(f"[w{i}]" for i in range(17))
    assert "at most 16" in assert_bad(lambda: fit(spec, **{field: too_many}), field).message
    assert fit(spec, **{field: "a (lighthouse:1.4) [at dusk]"}).request


def test_a_model_that_reads_no_weights_takes_brackets_as_text():
    assert not FLUX.prompt_weighting
    assert fit(FLUX, prompt="a (lighthouse:12) at dusk").request.prompt \
        == "a (lighthouse:12) at dusk"
