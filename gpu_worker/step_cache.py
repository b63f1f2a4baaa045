"""Step caching: skip part of the denoiser on steps whose work would barely change the result.

diffusers 0.42 ships these as hooks on a transformer denoiser (``CacheMixin.enable_cache``):

- ``first-block`` (First Block Cache): run the first block; if its output moved less than
  ``threshold`` since the last full step, reuse the last step's residual of the other blocks.
- ``taylorseer``: compute fully every ``interval`` steps (after ``warmup`` full ones) and
  predict the steps between with a Taylor series of order ``order``.
- ``mag`` (MagCache): skip while the accumulated magnitude error stays under ``threshold``,
  at most ``max-skip`` steps in a row, never in the first ``retention`` share of the steps. It
  needs the checkpoint's calibrated magnitude ratios; diffusers ships FLUX.1's only.

A worker's setting is a flag (``--step-cache METHOD[:KEY=VALUE,...]``); a request can turn it
off (``"step_cache": false``), and jobs that differ in that never share a batch (the batch
key has it). Whether a setting costs quality is a property of real weights: see
docs/performance.md, which is why no family turns one on by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from broker.protocol import JobSpec

log = logging.getLogger(__name__)

NONE = "none"
AUTO = "auto"  # the registry's default for the model's family (gpu_worker/models.py)

# method -> {option: (diffusers config field, type, lowest, highest)}
OPTIONS: dict[str, dict[str, tuple[str, type, float, float]]] = {
    "first-block": {"threshold": ("threshold", float, 1e-6, 10.0)},
    "taylorseer": {"interval": ("cache_interval", int, 1, 100),
                   "warmup": ("disable_cache_before_step", int, 0, 1000),
                   "order": ("max_order", int, 1, 4)},
    "mag": {"threshold": ("threshold", float, 1e-6, 10.0),
            "max-skip": ("max_skip_steps", int, 1, 100),
            "retention": ("retention_ratio", float, 0.0, 1.0)},
}
METHODS = tuple(OPTIONS)


class StepCacheError(ValueError):
    """A step cache setting that cannot be used (bad text, or not on this model)."""


@dataclass(frozen=True)
class StepCacheSetting:
    """A method and its options, as ``METHOD[:KEY=VALUE,...]`` reads; method "" is none."""

    method: str = ""
    options: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> StepCacheSetting:
        text = text.strip()
        method, _, rest = text.partition(":")
        if method in ("", NONE):
            if rest:
                raise StepCacheError(f"step cache {text!r}: 'none' takes no options")
            return cls()
        if method not in OPTIONS:
            raise StepCacheError(f"unknown step cache {method!r}: one of "
                                 f"{', '.join((NONE, *METHODS))}")
        options: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, value = item.partition("=")
            options[key.strip()] = _option(method, key.strip(), value.strip() if equals else "")
        return cls(method, tuple(sorted(options.items())))

    def __str__(self) -> str:
        if not self.method:
            return NONE
        shown = ",".join(f"{key}={_number(value)}" for key, value in self.options)
        return f"{self.method}:{shown}" if shown else self.method

    def config(self, *, steps: int, mag_ratios: Any = None) -> Any:
        """The diffusers config for a call of ``steps`` steps."""
        import diffusers

        fields = {OPTIONS[self.method][key][0]: value for key, value in self.options}
        if self.method == "first-block":
            return diffusers.FirstBlockCacheConfig(**fields)
        if self.method == "taylorseer":
            return diffusers.TaylorSeerCacheConfig(**fields)
        return diffusers.MagCacheConfig(mag_ratios=mag_ratios, num_inference_steps=steps,
                                        **fields)


def _option(method: str, key: str, value: str) -> float:
    known = OPTIONS[method]
    if key not in known:
        raise StepCacheError(f"step cache {method!r} has no option {key!r}; it has "
                             f"{', '.join(known) or 'none'}")
    _, kind, lowest, highest = known[key]
    try:
        number = float(kind(value))
    except ValueError:
        raise StepCacheError(f"step cache {method}: {key} must be "
                             f"{'an integer' if kind is int else 'a number'}, "
                             f"not {value!r}") from None
    if not lowest <= number <= highest:  # NaN fails this too
        raise StepCacheError(f"step cache {method}: {key} must be between {_number(lowest)} "
                             f"and {_number(highest)}, not {value}")
    return number


def _number(value: float) -> str:
    return f"{value:g}"


def mag_ratios_for(pipeline: str) -> Any:
    """The calibrated MagCache ratios diffusers ships for this pipeline class, or None."""
    if pipeline not in ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"):
        return None
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return FLUX_MAG_RATIOS


class StepCache:
    """The step cache of one pipeline's denoiser: on for each call whose jobs allow it.

    Hooks keep state across the steps of a call; diffusers clears it only when a call ends
    normally, so a job interrupted mid-call would leave its state to the next one. Every call
    here starts from clean state (``prepare``)."""

    def __init__(self, pipe: Any, setting: StepCacheSetting) -> None:
        self.setting = setting
        self._denoiser: Any = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        self._mag_ratios = mag_ratios_for(type(pipe).__name__)
        self._on_for_steps: int | None = None  # the steps its config was made for; None: off
        if setting.method:
            self._check(type(pipe).__name__)

    def _check(self, pipeline: str) -> None:
        from diffusers.models.cache_utils import CacheMixin

        name = type(self._denoiser).__name__
        if not isinstance(self._denoiser, CacheMixin):
            raise StepCacheError(f"--step-cache {self.setting}: {pipeline}'s denoiser ({name}) "
                                 f"has no step caching in diffusers; use --step-cache none")
        if self.setting.method == "mag" and self._mag_ratios is None:
            raise StepCacheError(f"--step-cache mag needs magnitude ratios calibrated for the "
                                 f"checkpoint; diffusers ships FLUX.1's only, and {pipeline} "
                                 f"is not FLUX.1")
        try:  # the blocks must be ones diffusers' hooks know how to skip
            self._switch(steps=4)
        except Exception as exc:
            raise StepCacheError(f"--step-cache {self.setting} cannot be applied to {name}: "
                                 f"{exc}") from exc

    @property
    def enabled(self) -> bool:
        return bool(self.setting.method)

    def prepare(self, job: JobSpec) -> None:
        """Before a pipeline call for ``job``'s batch: the cache on or off as its jobs ask
        (the batch key makes them agree), with no state left from an earlier call."""
        if not self.enabled:
            return
        if not job.step_cache:
            self._off()
            return
        steps = job.steps
        if self._on_for_steps is None or (self.setting.method == "mag"
                                          and self._on_for_steps != steps):
            self._switch(steps)  # MagCache's ratios are spread over the call's steps
        else:
            self._denoiser._reset_stateful_cache()

    def _switch(self, steps: int) -> None:
        self._off()
        self._denoiser.enable_cache(self.setting.config(steps=steps,
                                                        mag_ratios=self._mag_ratios))
        self._on_for_steps = steps

    def _off(self) -> None:
        if self._on_for_steps is not None:
            self._denoiser.disable_cache()
            self._on_for_steps = None
