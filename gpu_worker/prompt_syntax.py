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

import math
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

    A prompt without weighting syntax is one fragment of weight 1: exactly its text. Linear
    in the prompt's length however its brackets nest: groups are recorded as ranges and their
    weights swept in once.
    """
    text: list[str] = []  # the prompt's characters, syntax taken out
    groups: list[tuple[int, int, float]] = []  # (start, end, weight) over ``text``
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open group starts
    at = 0
    while at < len(prompt):
        char, pair = prompt[at], prompt[at:at + 2]
        explicit = _EXPLICIT.match(prompt, at) if char == ":" and opened["("] else None
        if pair in _ESCAPES:
            text.append(_ESCAPES[pair])
            at += 2
            continue
        if explicit:
            groups.append((opened["("].pop(), len(text), float(explicit.group(1))))
            at = explicit.end()
            continue
        if char in opened:
            opened[char].append(len(text))
        elif char == ")" and opened["("]:
            groups.append((opened["("].pop(), len(text), UP))
        elif char == "]" and opened["["]:
            groups.append((opened["["].pop(), len(text), 1 / UP))
        else:
            text.append(char)
        at += 1
    groups += [(start, len(text), UP) for start in opened["("]]  # left open: to the end
    groups += [(start, len(text), 1 / UP) for start in opened["["]]
    return _merged(text, _weights(len(text), groups))


def _weights(length: int, groups: list[tuple[int, int, float]]) -> list[float]:
    """Each character's weight: the product of the groups around it.

    The running product is kept as a mantissa and a binary exponent (math.frexp), so that
    thousands of nested groups neither overflow to inf nor underflow to 0 on the way: a
    product that left a float's range could not be divided back when its groups close, and
    would leak into the words after them."""
    starts: dict[int, list[float]] = {}
    ends: dict[int, list[float]] = {}
    for start, end, weight in groups:
        starts.setdefault(start, []).append(weight)
        ends.setdefault(end, []).append(weight)
    weights: list[float] = []
    mantissa, exponent, zeros = 0.5, 1, 0  # 1.0; a zero weight is counted, not divided by
    infinite = 0  # weights of hundreds of digits read as inf: counted too
    for at in range(length):
        changes = ([(weight, -1) for weight in ends.get(at, ())]
                   + [(weight, 1) for weight in starts.get(at, ())]
                   if at in ends or at in starts else ())
        for weight, sign in changes:
            if weight == 0:
                zeros += sign
            elif math.isinf(weight):
                infinite += sign
            else:
                part, shift = math.frexp(weight)
                mantissa, more = math.frexp(mantissa * part if sign > 0 else mantissa / part)
                exponent += more + sign * shift
        if zeros:
            weights.append(0.0)
        elif infinite:
            weights.append(math.inf)
        else:
            try:
                product = math.ldexp(mantissa, exponent)  # 0.0 when too small to tell
            except OverflowError:
                product = math.inf
            # Rounded, so that a group closed is exactly gone (1.1 x 1.3 / 1.1 is not 1.3).
            weights.append(round(product, 9))
    return weights


def _merged(text: list[str], weights: list[float]) -> list[Fragment]:
    fragments: list[Fragment] = []
    run: list[str] = []  # the characters of the fragment being gathered
    run_weight = 1.0
    for char, weight in zip(text, weights, strict=True):
        if not char.strip():  # a space weighs nothing: it joins the words before it
            weight = run_weight
        if run and weight != run_weight:
            fragments.append(Fragment("".join(run), run_weight))
            run = []
        run.append(char)
        run_weight = weight
    if run or not fragments:
        fragments.append(Fragment("".join(run), run_weight))
    return fragments


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
