"""The prompt weighting people type in Automatic1111, SwarmUI and SD.Next, read as text.

``(words)`` weighs them 1.1, ``[words]`` 1/1.1, ``(words:1.3)`` 1.3; groups nest and
multiply (``((words))`` is 1.21). ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the
characters themselves. As in Automatic1111, round and square groups are counted apart, a
closing bracket with nothing open is text, and a group left open runs to the end. Nothing
is an error but a weight out of range or too many words weighed down (each costs the text
encoder a pass of its own: see gpu_worker/prompt_embeds.py).

Plain data, no torch: the frontend checks prompts with it before queueing, and the worker
parses them with it before encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UP = 1.1  # what ( ) multiplies by, and [ ] divides by
MAX_WEIGHT = 10.0
MAX_DOWNWEIGHTED = 16  # parts weighed below 1 in one prompt

# An explicit weight closing a round group: ":1.3)" (spaces allowed around the number).
_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")
_ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float


class PromptSyntaxError(ValueError):
    """A prompt whose weights cannot be used: its message is for the client."""


def parse(prompt: str) -> list[Fragment]:
    """The prompt as text fragments with weights, neighbours of equal weight merged.

    A prompt without weighting syntax is one fragment of weight 1: exactly its text.
    """
    pieces: list[tuple[str, float]] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open group's text starts
    at = 0
    while at < len(prompt):
        char, pair = prompt[at], prompt[at:at + 2]
        explicit = _EXPLICIT.match(prompt, at) if char == ":" and opened["("] else None
        if pair in _ESCAPES:
            pieces.append((_ESCAPES[pair], 1.0))
            at += 2
            continue
        if explicit:
            _multiply(pieces, opened["("].pop(), float(explicit.group(1)))
            at = explicit.end()
            continue
        if char in opened:
            opened[char].append(len(pieces))
        elif char == ")" and opened["("]:
            _multiply(pieces, opened["("].pop(), UP)
        elif char == "]" and opened["["]:
            _multiply(pieces, opened["["].pop(), 1 / UP)
        else:
            pieces.append((char, 1.0))
        at += 1
    for start in opened["("]:  # left open: to the end
        _multiply(pieces, start, UP)
    for start in opened["["]:
        _multiply(pieces, start, 1 / UP)
    return _merged(pieces)


def _multiply(pieces: list[tuple[str, float]], start: int, weight: float) -> None:
    pieces[start:] = [(text, old * weight) for text, old in pieces[start:]]


def _merged(pieces: list[tuple[str, float]]) -> list[Fragment]:
    fragments: list[Fragment] = []
    for text, weight in pieces:
        if not text.strip():  # a space weighs nothing: it joins the words before it
            weight = fragments[-1].weight if fragments else 1.0
        if fragments and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("", 1.0)]


def check(prompt: str) -> list[Fragment]:
    """``parse``, refusing what cannot be encoded: a weight out of [0, MAX_WEIGHT], or more
    than MAX_DOWNWEIGHTED parts weighed below 1."""
    fragments = parse(prompt)
    for fragment in fragments:
        if not 0.0 <= fragment.weight <= MAX_WEIGHT:
            raise PromptSyntaxError(
                f"the weight of {fragment.text.strip()[:40]!r} comes to {fragment.weight:g}; "
                f"weights run from 0 to {MAX_WEIGHT:g}")
    down = sum(1 for f in fragments if f.weight < 1.0)
    if down > MAX_DOWNWEIGHTED:
        raise PromptSyntaxError(f"{down} parts are weighed below 1; at most "
                                f"{MAX_DOWNWEIGHTED} can be")
    return fragments


def is_weighted(fragments: list[Fragment]) -> bool:
    return any(f.weight != 1.0 for f in fragments)


def plain_text(fragments: list[Fragment]) -> str:
    """The prompt's words without the syntax (what a pooled CLIP summary reads)."""
    return "".join(f.text for f in fragments)
