"""Automatic1111's prompt weighting, read as its users expect it (and as its own parser
reads it, for the cases its wiki documents)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_worker.prompt_syntax import (
    MAX_DOWNWEIGHTED,
    Fragment,
    PromptSyntaxError,
    check,
    is_weighted,
    parse,
    plain_text,
)


def weights(prompt: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 4)) for f in parse(prompt)]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (red) car", [("a ", 1.0), ("red ", 1.1), ("car", 1.0)]),  # spaces go with the words before
    ("a ((red)) car", [("a ", 1.0), ("red ", 1.21), ("car", 1.0)]),
    ("a [red] car", [("a ", 1.0), ("red ", 0.9091), ("car", 1.0)]),
    ("a (red:1.5) car", [("a ", 1.0), ("red ", 1.5), ("car", 1.0)]),
    ("a (red: 0.5 ) car", [("a ", 1.0), ("red ", 0.5), ("car", 1.0)]),
    ("a (red car:.5)", [("a ", 1.0), ("red car", 0.5)]),
    ("(a (b:2) c)", [("a ", 1.1), ("b ", 2.2), ("c", 1.1)]),
    ("[blurry ugly deformed], sharp", [("blurry ugly deformed", 0.9091), (", sharp", 1.0)]),
])
def test_the_documented_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert weights(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    (r"a \(red\) car", [("a (red) car", 1.0)]),  # escaped brackets are the characters
    (r"\[x\] \\ y", [(r"[x] \ y", 1.0)]),
    ("a red) car]", [("a red) car]", 1.0)]),  # a closer with nothing open is text
    ("a (red car", [("a ", 1.0), ("red car", 1.1)]),  # left open: to the end
    ("style: anime", [("style: anime", 1.0)]),  # a colon outside a group is text
    ("(x:abc)", [("x:abc", 1.1)]),  # not a number: text, and the group is a plain (x)
    ("(a [b) c]", [("a ", 1.1), ("b ", 1.0), ("c", 0.9091)]),  # round and square apart
    ("( ) x", [("  x", 1.0)]),  # a weighed space weighs nothing
    ("", [("", 1.0)]),
])
def test_what_is_not_quite_syntax(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert weights(prompt) == expected


def test_a_plain_prompt_is_one_unweighted_fragment_of_exactly_its_text() -> None:
    prompt = "a lighthouse, at dusk: oil on canvas <3 + 50% mist"
    assert parse(prompt) == [Fragment(prompt, 1.0)]
    assert not is_weighted(parse(prompt)) and is_weighted(parse("(a)"))
    assert plain_text(parse("a (red:1.4) [car]")) == "a red car"


@pytest.mark.parametrize("prompt", ["(x:11)", "(x:-1)", "(" * 30 + "x", "(x:10.5)", "((x:9.5))"])
def test_weights_out_of_range_are_refused(prompt: str) -> None:
    with pytest.raises(PromptSyntaxError, match="weights run from 0 to 10"):
        check(prompt)


def test_too_many_downweighted_parts_are_refused() -> None:
    fine = ", ".join(f"[w{i}]" for i in range(MAX_DOWNWEIGHTED))
    assert len(check(fine)) == 2 * MAX_DOWNWEIGHTED - 1
    with pytest.raises(PromptSyntaxError, match=f"at most {MAX_DOWNWEIGHTED}"):
        check(fine + ", [one more]")


@given(st.text(alphabet="ab ()[]:.\\0123456789", max_size=60))
def test_any_text_parses_and_keeps_its_words(prompt: str) -> None:
    fragments = parse(prompt)
    assert fragments and all(f.weight >= 0 for f in fragments)
    kept = plain_text(fragments)
    assert kept.count("a") == prompt.count("a") and kept.count("b") == prompt.count("b")
