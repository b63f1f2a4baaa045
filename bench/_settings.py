"""The worker's speed settings as bench/gpu.py and bench/quality.py run them.

A setting is what a worker's flags would give: ``plain`` (none of them), ``step-cache=TEXT``
(``--step-cache TEXT``), ``quantize=CHOICE`` (``--quantize``), ``compile`` or
``compile=full`` (``--compile``, ``--compile-scope``); ``+`` combines them
(``quantize=fp8+compile``). ``all`` stands for plain, each step cache of STEP_CACHES, each
quantisation and regional compile.

Each setting gets a fresh denoiser from the same seed (_real_size.build with ``reuse``): a
setting changes its denoiser in place (torchao swaps its layers, diffusers hooks its blocks,
dynamo wraps it), so runs never leak into each other, and every setting runs the same weights.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# The step caches "all" runs: the examples of gpu_worker/step_cache.py's syntax, each method
# once. Thresholds are not tuned: on random weights no value would mean anything.
STEP_CACHES = ("first-block:threshold=0.08", "taylorseer:interval=3", "mag")
PLAIN = "plain"
ALL = "all"


@dataclass(frozen=True)
class Setting:
    label: str  # as given: the row's name
    step_cache: str = "none"
    quantize: str = "none"
    compile_scope: str = ""  # "" (not compiled), "regional" or "full"

    @property
    def dense(self) -> bool:
        """Whether the run does all the model's dense arithmetic in the model's dtype, so that
        FLOPs counted on the plain model over its time are what it did: not with a step cache
        (steps skipped) or quantisation (int8 / float8 matmuls, not bf16)."""
        return self.step_cache == "none" and self.quantize == "none"


class SettingError(ValueError):
    """A setting's text that does not read."""


def parse(text: str) -> Setting:
    """One setting from its text (see the module's docstring)."""
    fields: dict[str, str] = {}
    for part in text.split("+"):
        key, _, value = part.strip().partition("=")
        if key == PLAIN and not value:
            continue
        if key == "compile":
            value = value or "regional"
            key = "compile_scope"
        elif key == "step-cache":
            key = "step_cache"
        elif key != "quantize":
            raise SettingError(f"setting {text!r}: {part!r} is not plain, step-cache=METHOD..., "
                               f"quantize=CHOICE or compile[=regional|full]")
        if not value:
            raise SettingError(f"setting {text!r}: {key} needs a value")
        fields[key] = value
    return Setting(label=text.strip(), **fields)


def expand(texts: list[str], compile_each: bool = False) -> list[Setting]:
    """The settings asked for, in order, ``all`` expanded, each once. ``compile_each``: every
    setting compiled too (gpu.py's --compile)."""
    labels: list[str] = []
    for text in texts or [ALL]:
        every = [PLAIN, *(f"step-cache={cache}" for cache in STEP_CACHES),
                 *(f"quantize={choice}" for choice in _quantize_choices()), "compile"]
        for label in every if text.strip() == ALL else [text.strip()]:
            if compile_each and "compile" not in label:
                label = "compile" if label == PLAIN else f"{label}+compile"
            if label not in labels:
                labels.append(label)
    return [parse(label) for label in labels]


def _quantize_choices() -> tuple[str, ...]:
    from gpu_worker import quantize

    return tuple(choice for choice in quantize.CHOICES if choice != quantize.NONE)


def why_not(setting: Setting, device: str) -> str:
    """Why ``device`` cannot run ``setting`` ("" if it can), asked before building anything:
    quantize.check, as the worker asks it at start."""
    from gpu_worker import quantize

    try:
        quantize.check(setting.quantize, device)
    except quantize.QuantizeError as exc:
        return str(exc)
    return ""


@dataclass(frozen=True)
class Build:
    """How a script builds and places its models (its command line, and the model's dtype)."""
    device: str
    dtype: Any
    depth: int | None = None
    tiny: bool = False
    threads: int | None = None
    compile_backend: str = "inductor"

    @classmethod
    def of(cls, args: Any, spec: Any) -> Build:
        from gpu_worker.pipeline import dtype_for

        return cls(args.device, dtype_for(spec, args.device), args.depth, args.tiny,
                   args.threads, args.compile_backend)

    @property
    def scale(self) -> str:
        if self.tiny:
            return "a miniature (--tiny)"
        return f"depth {self.depth}" if self.depth else "real size"


def load_options(setting: Setting, build: Build) -> Any:
    """The worker's LoadOptions for ``setting``."""
    from gpu_worker.pipeline import LoadOptions

    return LoadOptions(device=build.device, threads=build.threads,
                       step_cache=setting.step_cache, quantize=setting.quantize,
                       compile=bool(setting.compile_scope),
                       compile_scope=setting.compile_scope or "regional",
                       compile_backend=build.compile_backend)


def shared_components(model: Any, build: Build) -> dict[str, Any]:
    """Every component but the denoiser, built once for all the settings of a model."""
    import _real_size

    return _real_size.components(model, build.device, build.dtype, build.depth,
                                 tiny=build.tiny, leave_out=(model.denoiser,))


def make_runner(model: Any, setting: Setting, shared: dict[str, Any], build: Build) -> Any:
    """A PipelineRunner for ``setting``: a fresh denoiser, the ``shared`` other components.
    Raises the worker's own errors (StepCacheError, QuantizeError: ValueErrors) where the
    model cannot take the setting."""
    import _real_size

    from gpu_worker import models
    from gpu_worker.pipeline import PipelineRunner

    pipe = _real_size.build(model, build.device, build.dtype, build.depth, tiny=build.tiny,
                            reuse=shared)
    return PipelineRunner(models.resolve(model.name), load_options(setting, build), pipe=pipe)


def try_runner(model: Any, setting: Setting, shared: dict[str, Any],
               build: Build) -> tuple[Any, str]:
    """``make_runner``, or None and why not: the worker's own refusal (step cache,
    quantisation), or no memory for this setting's denoiser."""
    import torch

    try:
        return make_runner(model, setting, shared, build), ""
    except ValueError as exc:
        return None, str(exc)
    except torch.OutOfMemoryError:
        pass
    gc.collect()  # outside the except block: the failed build is no longer referenced
    torch.cuda.empty_cache()
    return None, f"{setting.label}: out of memory building its denoiser"


def stack_line(device: str) -> str:
    """The software the figures depend on, and the device."""
    import diffusers
    import torch

    try:
        import torchao

        ao = torchao.__version__
    except ImportError:
        ao = "not installed"
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") \
        else "none"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda or '-'}), diffusers "
            f"{diffusers.__version__}, torchao {ao}; device {device}: {gpu}")


@contextmanager
def released(device: str) -> Iterator[None]:
    """Free what a setting's run left (its denoiser, dynamo's compiled code) before the next
    one builds: two real-size FLUX transformers do not fit most GPUs."""
    try:
        yield
    finally:
        import torch
        import torch._dynamo

        torch._dynamo.reset()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def add_arguments(parser: Any) -> None:
    """The options both scripts take to choose and build their settings."""
    parser.add_argument("--setting", action="append", default=None, metavar="SETTING",
                        help="a setting to run (repeatable): plain, step-cache=METHOD[:K=V,...],"
                             " quantize=CHOICE, compile[=regional|full], combined with '+'; "
                             f"default all: plain, each of {', '.join(STEP_CACHES)}, each "
                             "quantisation the device can run, compile (regional)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for compiled settings (eager: wiring "
                             "only, no code generation; what the tests use)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--depth", type=int, default=None,
                        help="cut every stack of layers to this many (smoke runs; the "
                             "figures are then not real-size)")
    parser.add_argument("--tiny", action="store_true",
                        help="miniature widths and depths of the same classes (CPU smoke runs "
                             "and tests; the figures are then not real-size)")
