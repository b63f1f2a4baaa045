"""What workers announce about a model's limits, checked, and how it narrows the registry's.

Workers announce each model's defaults and limits (``model_info`` in READY, relayed in
STATUS_REPLY): a worker knows the pipeline it loaded. But a worker may be wrong, stale or
hostile, so each announced field is checked (a bad one is ignored, with a rate-limited log
line) and no announcement ever widens a limit: for a model the registry knows, each limit is
the narrower of the registry's and every announcing worker's; for one it does not, the
narrowest the workers announce, over generic defaults. A job may go to any worker serving its
model, so the narrowest is the one every worker can honour. ``model_resolver`` is the one
caller: it decides what a name means and falls back on generic defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from gpu_worker import models
from gpu_worker.models import ModelSpec
from http_frontend.broker_client import ClusterStatus
from http_frontend.schema import MAX_SIDE

log = logging.getLogger(__name__)

MAX_STEPS = 1000  # what any request may ask for (schema), so no announcement needs more
MAX_ALLOWED_SIZES = 64
MAX_TEXT = 1024
WARN_EVERY = 60.0  # seconds between log lines about one worker's bad announcement


def _int_in(low: int, high: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer in {low}..{high}")
        return value
    return check


def _size(value: Any) -> tuple[int, int]:
    if not isinstance(value, str) or len(value) > 16:
        raise ValueError("must be a size like '1024x1024'")
    width, sep, height = value.partition("x")
    if not (sep and width.isascii() and width.isdigit() and height.isascii()
            and height.isdigit()):
        raise ValueError("must be a size like '1024x1024'")
    size = int(width), int(height)
    if not all(0 < side <= MAX_SIDE for side in size):
        raise ValueError(f"sides must be 1..{MAX_SIDE}")
    return size


def _sizes(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or len(value) > MAX_ALLOWED_SIZES:
        raise ValueError(f"must be a list of at most {MAX_ALLOWED_SIZES} sizes")
    return tuple(_size(item) for item in value)


def _guidance(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= 100:
        raise ValueError("must be null or a number in 0..100")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"must be text of at most {MAX_TEXT} characters")
    return value


# Each field the frontend takes from an announcement, and how it is checked. Anything else a
# worker announces (dtype, variant, ...) concerns the worker alone and is not read.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "default_size": _size,
    "size_multiple": _int_in(1, 1024),
    "min_pixels": _int_in(1, MAX_SIDE * MAX_SIDE),
    "max_pixels": _int_in(1, MAX_SIDE * MAX_SIDE),
    "allowed_sizes": _sizes,
    "default_steps": _int_in(1, MAX_STEPS),
    "max_steps": _int_in(1, MAX_STEPS),
    "default_guidance": _guidance,
    "negative_prompt": _bool,
    "edit_pipeline": _text,
    "inpaint_pipeline": _text,
    "edit_by_reference": _bool,
    "max_inputs": _int_in(1, 16),
    "strength_floors": _bool,
}
_DESCRIPTIVE: dict[str, Callable[[Any], Any]] = {
    "family": _text, "pipeline": _text, "repo": _text, "description": _text,
}
_DEFAULTS = ("default_size", "default_steps", "default_guidance")


class _RateLimitedWarnings:
    """One log line per key (worker, model) every ``every`` seconds at most."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, key: tuple[str, str], message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.every:
                return
            if len(self._last) > 10_000:  # workers come and go: forget old keys
                self._last.clear()
            self._last[key] = now
        log.warning(message, *args)


_warn = _RateLimitedWarnings(WARN_EVERY)


def apply_announcements(spec: ModelSpec | None, status: ClusterStatus | None, name: str
                        ) -> ModelSpec | None:
    """``spec`` (the registry's, if any) as every worker's announcement for ``name`` narrows
    it; for a model the registry does not know, the narrowest announced. None: no spec and no
    usable announcement."""
    for worker_id, fields in _announcements(status, name):
        if spec is None:
            # Not in the registry: its pipeline's family knows its quirks (two stages, sizing
            # by area), the announcement its limits.
            base = models.for_pipeline(name, fields.get("pipeline", ""))
            # Narrowed by its own fields too: what it does not announce, it cannot do.
            candidate = narrow(dataclasses.replace(base, **fields), fields)
        else:
            candidate = narrow(spec, fields)
        if _coherent(candidate):
            spec = candidate
        else:
            _warn((worker_id, name), "worker %s announced limits for %s that contradict each "
                                     "other or the registry; ignored", worker_id, name)
    return spec


def narrow(spec: ModelSpec, fields: dict[str, Any]) -> ModelSpec:
    """``spec`` with each limit the narrower of its own and ``fields``'; defaults from
    ``fields`` where they fit the narrowed limits."""
    limits: dict[str, Any] = {}
    if "size_multiple" in fields:
        limits["size_multiple"] = math.lcm(spec.size_multiple, fields["size_multiple"])
    if "min_pixels" in fields:
        limits["min_pixels"] = max(spec.min_pixels, fields["min_pixels"])
    if "max_pixels" in fields:
        limits["max_pixels"] = min(spec.max_pixels, fields["max_pixels"])
    if "max_steps" in fields:
        limits["max_steps"] = min(spec.max_steps, fields["max_steps"])
    if "negative_prompt" in fields:
        limits["negative_prompt"] = spec.negative_prompt and fields["negative_prompt"]
    # An edit mode only where every worker says it has it: a worker that does not know of
    # editing (an older one) would make an image from the prompt alone.
    for mode in ("edit_pipeline", "inpaint_pipeline"):
        limits[mode] = getattr(spec, mode) if fields.get(mode) else ""
    if "max_inputs" in fields:
        limits["max_inputs"] = min(spec.max_inputs, fields["max_inputs"])
    for quirk in ("edit_by_reference", "strength_floors"):
        if quirk in fields:
            limits[quirk] = fields[quirk]
    if fields.get("allowed_sizes"):
        theirs = fields["allowed_sizes"]
        limits["allowed_sizes"] = tuple(s for s in spec.allowed_sizes if s in theirs) \
            if spec.allowed_sizes else theirs
    narrowed = dataclasses.replace(spec, **limits)
    for name in _DEFAULTS:
        if name in fields:
            with_default = dataclasses.replace(narrowed, **{name: fields[name]})
            if _coherent(with_default):
                narrowed = with_default
    return narrowed


def _coherent(spec: ModelSpec) -> bool:
    """Whether a request that names nothing but a prompt fits ``spec``."""
    width, height = spec.default_size
    return (spec.min_pixels <= spec.max_pixels
            and spec.default_steps <= spec.max_steps
            and (not spec.allowed_sizes or spec.default_size in spec.allowed_sizes)
            and width % spec.size_multiple == 0 and height % spec.size_multiple == 0
            and spec.min_pixels <= width * height <= spec.max_pixels)


def _announcements(status: ClusterStatus | None, name: str
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(worker id, the checked fields) for each worker that announced limits for ``name``."""
    if status is None:
        return
    for worker in status.workers:
        if not isinstance(worker, dict):
            continue
        info = worker.get("model_info")
        announced = info.get(name) if isinstance(info, dict) else None
        if not isinstance(announced, dict):
            continue
        worker_id = str(worker.get("worker_id"))[:128]
        yield worker_id, _checked(worker_id, name, announced)


def _checked(worker_id: str, model: str, announced: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    bad: list[str] = []
    for name, check in (_CHECKS | _DESCRIPTIVE).items():
        if name not in announced:
            continue
        try:
            fields[name] = check(announced[name])
        except ValueError as exc:
            bad.append(f"{name} {exc}")
    if bad:
        _warn((worker_id, model), "worker %s announced unusable limits for %s, ignored: %s",
              worker_id, model, "; ".join(bad))
    return fields
