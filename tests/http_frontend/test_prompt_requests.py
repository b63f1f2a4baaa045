"""Hostile prompts at the frontend's weight check (http_frontend/schema.py, _check_weights):
what a model that reads weights refuses, and what it must not."""

from __future__ import annotations

import pytest

from gpu_worker import models
from http_frontend import schema
from http_frontend.errors import APIError

SDXL = models.lookup("sdxl")


def fit(**fields: object) -> schema.FittedRequest:
    return schema.fit_to_model(schema.parse_request({"prompt": "a ship", **fields}), SDXL)


def refused(param: str, **fields: object) -> APIError:
    with pytest.raises(APIError) as info:
        fit(**fields)
    assert info.value.status == 400 and info.value.param == param
    return info.value


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", [
    "[" * 8000 + "a lighthouse" + "]" * 8000 + " at dusk",  # 16,000 brackets, under 32,000
    "((a (b:0." + "0" * 199 + "1)):0." + "0" * 199 + "1) at dusk",
    "(" * 7000 + "[" * 7000 + "a" + "]" * 7000 + ")" * 7000 + " at dusk",
])
def test_deep_groups_do_not_weigh_the_words_after_them(field: str, text: str) -> None:
    """Nesting far past a float's range inside the groups: accepted, not refused with a
    weight for 'at dusk', which no bracket holds."""
    assert fit(**{field: text}).request


def test_a_deep_group_above_ten_is_refused_for_its_own_words() -> None:
    error = refused("prompt", prompt="(" * 8000 + "a lighthouse" + ")" * 8000 + " at dusk")
    assert "'a lighthouse'" in error.message and "from 0 to 10" in error.message


@pytest.mark.parametrize("text", ["(a:" + "9" * 400 + ")", "(a:-1)", "(a:-0.5) b", "(a:10.01)",
                                  "((a:5):2.1)"])
def test_absurd_weights_are_refused(text: str) -> None:
    assert "from 0 to 10" in refused("prompt", prompt=text).message


@pytest.mark.parametrize("text", ["(a:.)", "(a:1e3)", "a\\", "(a:+10)", "(a:-0)", "\x01 (\u200b)",
                                  ":)" * 100, "\\" * 1001])
def test_what_is_text_or_in_range_is_taken(text: str) -> None:
    assert fit(prompt=text).request.prompt == text


def test_a_lone_surrogate_is_refused_before_the_weights_are_read() -> None:
    assert "lone surrogate" in refused("prompt", prompt="a (\ud800:1.2)").message
    assert "lone surrogate" in refused("negative_prompt", negative_prompt="\udfff").message
