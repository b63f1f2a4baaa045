"""OpenAI's CreateImageRequest and ImagesResponse, with our diffusion extensions.

Parsing happens in two steps: ``parse_request`` checks every field's type and range, then
``fit_to_model`` fills defaults and checks the model's own limits. Each failure is a 400
naming the offending ``param``; nothing is clamped or snapped silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

from gpu_worker import prompt_syntax
from gpu_worker.models import ModelSpec
from http_frontend import loras
from http_frontend.errors import invalid

MAX_PROMPT_CHARS = 32_000
MAX_N = 10
MAX_SEED = 2**63 - 1  # the last image's seed (seed + n - 1) must fit too
MAX_SIDE = 16384  # pixels on a side, for `size`, `width` and `height` alike
OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")
# Enumerated fields of the spec we accept and either map or ignore.
_ENUMS: dict[str, tuple[str, ...]] = {
    "quality": ("standard", "hd", "low", "medium", "high", "auto"),
    "moderation": ("low", "auto"),
    "background": ("transparent", "opaque", "auto"),
    "style": ("vivid", "natural"),
}
# The ImagesResponse enums: a value outside them goes in an extension key instead.
RESPONSE_SIZES = ("1024x1024", "1024x1536", "1536x1024")
RESPONSE_QUALITIES = ("low", "medium", "high")
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits only: \d takes any script's


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """A validated generation request. OpenAI's fields first, then our extensions."""

    prompt: str
    model: str | None = None
    n: int = 1
    quality: str = "auto"
    response_format: str | None = None  # None: the server's default (--default-response-format)
    output_format: str = "png"
    output_compression: int | None = None
    stream: bool = False
    partial_images: int = 0
    size: str = "auto"
    moderation: str = "auto"
    background: str = "auto"
    style: str | None = None
    user: str | None = None
    # Extensions for diffusion.
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    timeout: float | None = None  # seconds; at most the server's --timeout
    strength: float | None = None  # edits only: 0..1, how far from the input image
    # LoRA adapters, (name, scale) sorted by name: `loras` and the prompt's <lora:...> tags.
    loras: tuple[tuple[str, float], ...] = ()
    step_cache: bool = True  # false: without the worker's step cache, for exact images


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(body: dict[str, Any], name: str, *, max_len: int = 256) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(name, f"'{name}' must be a string", "invalid_type")
    if len(value) > max_len:
        raise invalid(name, f"'{name}' is longer than {max_len} characters",
                      "string_above_max_length")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800": a lone surrogate, no character
        raise invalid(name, f"'{name}' is not valid Unicode text: it holds a lone surrogate "
                            f"at position {exc.start}") from None
    if "\x00" in value:  # JSON's "\u0000": no text needs it, and PostgreSQL's text refuses it
        raise invalid(name, f"'{name}' holds a NUL character (\\u0000) at position "
                            f"{value.index(chr(0))}")
    return value


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(name, f"'{name}' must be an integer", "invalid_type")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _choice(body: dict[str, Any], name: str, choices: tuple[str, ...]) -> str | None:
    value = _string(body, name)
    if value is not None and value not in choices:
        raise invalid(name, f"'{name}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def parse_size(value: str) -> tuple[int, int] | None:
    """'WIDTHxHEIGHT' -> (width, height); 'auto' -> None."""
    if value == "auto":
        return None
    match = _SIZE.fullmatch(value)
    if not match:
        raise invalid("size",
                      f"'size' must be 'auto' or WIDTHxHEIGHT like 1024x1024; got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise invalid("size", f"'size' needs a width and height between 1 and {MAX_SIDE}; "
                              f"got {value!r}")
    return width, height


def parse_request(body: Any) -> ImageRequest:
    """Check the type and range of every field a client sent."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_json")
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt", "'prompt' is required", "missing_required_parameter")
    prompt = _string(body, "prompt", max_len=MAX_PROMPT_CHARS)
    if not prompt or not prompt.strip():
        raise invalid("prompt", "'prompt' must not be empty")
    prompt, lora_uses = loras.from_request(body, prompt)
    if not prompt.strip():
        raise invalid("prompt", "'prompt' must say more than its <lora:...> tags")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", "'stream' must be true or false", "invalid_type")
    step_cache = body.get("step_cache")
    if step_cache is not None and not isinstance(step_cache, bool):
        raise invalid("step_cache", "'step_cache' must be true or false", "invalid_type")
    guidance = body.get("guidance")
    if guidance is not None and (not _is_number(guidance) or not 0 <= guidance <= 100):
        raise invalid("guidance", "'guidance' must be a number between 0 and 100")
    strength = body.get("strength")
    if strength is not None and (not _is_number(strength) or not 0 < strength <= 1):
        raise invalid("strength", "'strength' must be a number above 0 and at most 1: how "
                                  "far from the input image an edit may go")
    timeout = body.get("timeout")
    if timeout is not None and (not _is_number(timeout) or not math.isfinite(timeout)
                                or timeout <= 0):
        raise invalid("timeout", "'timeout' must be a positive number of seconds")
    size = _string(body, "size", max_len=32)
    size = "auto" if size is None else size  # "" is a bad size, not a request for the default
    parse_size(size)
    model = _string(body, "model")
    if model is not None and not model.strip():
        raise invalid("model", "'model' must not be empty")
    values: dict[str, Any] = {
        "prompt": prompt,
        "model": model,
        "n": _integer(body, "n", 1, MAX_N),
        "quality": _choice(body, "quality", _ENUMS["quality"]),
        "response_format": _choice(body, "response_format", RESPONSE_FORMATS),
        "output_format": _choice(body, "output_format", OUTPUT_FORMATS),
        "output_compression": _integer(body, "output_compression", 0, 100),
        "stream": stream,
        "partial_images": _integer(body, "partial_images", 0, 3),
        "size": size,
        "moderation": _choice(body, "moderation", _ENUMS["moderation"]),
        "background": _choice(body, "background", _ENUMS["background"]),
        "style": _choice(body, "style", _ENUMS["style"]),
        "user": _string(body, "user"),
        "width": _integer(body, "width", 1, MAX_SIDE),
        "height": _integer(body, "height", 1, MAX_SIDE),
        "steps": _integer(body, "steps", 1, 1000),
        "guidance": float(guidance) if guidance is not None else None,
        "seed": _integer(body, "seed", 0, MAX_SEED),
        "negative_prompt": _string(body, "negative_prompt", max_len=MAX_PROMPT_CHARS),
        "timeout": float(timeout) if timeout is not None else None,
        "strength": float(strength) if strength is not None else None,
        "loras": lora_uses,
        "step_cache": step_cache,
    }
    request = ImageRequest(**{k: v for k, v in values.items() if v is not None})
    if request.seed is not None and request.seed + request.n - 1 > MAX_SEED:
        raise invalid("seed", f"image i gets seed + i, and every seed must be at most "
                              f"2**63-1: with n={request.n}, 'seed' may be at most "
                              f"{MAX_SEED - request.n + 1}")
    return request


@dataclass(frozen=True)
class FittedRequest:
    """A request with every default filled from its model."""

    request: ImageRequest
    width: int
    height: int
    steps: int
    guidance: float | None
    warnings: tuple[str, ...] = ()


def _requested_size(req: ImageRequest, spec: ModelSpec) -> tuple[int, int]:
    parsed = parse_size(req.size)
    if parsed is not None and (req.width or parsed[0], req.height or parsed[1]) != parsed:
        raise invalid("size", "'size' and 'width'/'height' disagree; send one of them")
    width, height = parsed or spec.default_size
    return req.width or width, req.height or height


def fit_to_model(req: ImageRequest, spec: ModelSpec) -> FittedRequest:
    """Fill defaults from the model and check its limits."""
    width, height = _requested_size(req, spec)
    param = "size" if req.width is None and req.height is None else (
        "width" if req.width is not None else "height")
    if spec.allowed_sizes and (width, height) not in spec.allowed_sizes:
        sizes = ", ".join(f"{w}x{h}" for w, h in spec.allowed_sizes)
        raise invalid(param, f"{spec.name} takes only these sizes: {sizes}; got "
                             f"{width}x{height}")
    multiple = spec.size_multiple
    if width % multiple or height % multiple:
        raise invalid(param, f"{spec.name} needs width and height that are multiples of "
                             f"{multiple}; got {width}x{height}")
    pixels = width * height
    if not spec.min_pixels <= pixels <= spec.max_pixels:
        raise invalid(param, f"{spec.name} takes between {spec.min_pixels} and "
                             f"{spec.max_pixels} pixels; {width}x{height} is {pixels}")
    steps = req.steps if req.steps is not None else spec.default_steps
    if steps > spec.max_steps:
        raise invalid("steps", f"{spec.name} takes at most {spec.max_steps} steps; got {steps}")
    if spec.prompt_weighting:
        _check_weights(req)
    warnings: list[str] = []
    if req.negative_prompt and not spec.negative_prompt:
        warnings.append(f"{spec.name} does not use a negative prompt; it was ignored")
    guidance = req.guidance if req.guidance is not None else spec.default_guidance
    return FittedRequest(req, width, height, steps, guidance, tuple(warnings))


def _check_weights(req: ImageRequest) -> None:
    """The (word:1.3) weights of a model that reads them, checked before queueing."""
    for param, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if text:
            try:
                prompt_syntax.check(text)
            except prompt_syntax.PromptSyntaxError as exc:
                raise invalid(param, f"'{param}': {exc}") from None


def images_response(fitted: FittedRequest, *, created: int, model: str,
                    images: list[dict[str, Any]]) -> dict[str, Any]:
    """An ImagesResponse: spec fields carry only values its enums allow, the rest are extras."""
    req = fitted.request
    size = f"{fitted.width}x{fitted.height}"
    body: dict[str, Any] = {"created": created, "data": images,
                            "output_format": req.output_format}
    if size in RESPONSE_SIZES:
        body["size"] = size
    if req.quality in RESPONSE_QUALITIES:
        body["quality"] = req.quality
    if req.background in ("transparent", "opaque"):
        body["background"] = req.background
    # Extensions.
    body.update({"model": model, "width": fitted.width, "height": fitted.height,
                 "steps": fitted.steps, "guidance": fitted.guidance})
    if fitted.warnings:
        body["warnings"] = list(fitted.warnings)
    return body
