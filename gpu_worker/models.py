"""The model registry: short aliases, their Hugging Face repos, and each family's defaults.

Plain data that imports no torch, so the HTTP frontend validates requests against a model's
limits and tells an unknown model (404) from a known one that no worker serves (503).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

TINY = "tiny"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model's identity, defaults and limits."""

    name: str  # what requests and /v1/models call it: an alias, repo id or directory
    repo: str  # what from_pretrained loads ("" for the built-in tiny model)
    family: str
    default_size: tuple[int, int] = (1024, 1024)
    size_multiple: int = 16
    min_pixels: int = 64 * 64
    max_pixels: int = 2048 * 2048
    default_steps: int = 30
    max_steps: int = 150
    default_guidance: float | None = 5.0
    negative_prompt: bool = True  # whether the pipeline takes a negative prompt (real CFG)
    dtype: str = "bfloat16"  # on CUDA; CPU always runs float32
    max_sequence_length: int | None = None
    description: str = ""

    def limits(self) -> dict[str, Any]:
        """The defaults and limits as /v1/models and READY show them."""
        data = dataclasses.asdict(self)
        data["default_size"] = f"{self.default_size[0]}x{self.default_size[1]}"
        return data

    @classmethod
    def from_limits(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild a spec a worker announced; unknown keys are ignored, bad ones rejected."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        size = values.get("default_size")
        if isinstance(size, str):
            width, _, height = size.partition("x")
            values["default_size"] = (int(width), int(height))
        return cls(**values)


def _sdxl_like(name: str, repo: str, description: str, **overrides: Any) -> ModelSpec:
    base: dict[str, Any] = dict(family="sdxl", default_size=(1024, 1024), size_multiple=8,
                                default_steps=30, default_guidance=6.0, dtype="float16")
    base.update(overrides)
    return ModelSpec(name=name, repo=repo, description=description, **base)


_ENTRIES: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=TINY, repo="", family="tiny", default_size=(256, 256), size_multiple=8,
        min_pixels=8 * 8, max_pixels=1024 * 1024, default_steps=4, max_steps=50,
        default_guidance=5.0, dtype="float32",
        description="built-in miniature pipeline with random weights: it makes noise, for "
                    "tests and machines without a GPU",
    ),
    ModelSpec(
        name="flux-schnell", repo="black-forest-labs/FLUX.1-schnell", family="flux",
        default_steps=4, max_steps=50, default_guidance=0.0, negative_prompt=False,
        max_sequence_length=256, description="FLUX.1 [schnell], 4-step distilled",
    ),
    ModelSpec(
        name="flux-dev", repo="black-forest-labs/FLUX.1-dev", family="flux",
        default_steps=28, default_guidance=3.5, negative_prompt=False,
        max_sequence_length=512, description="FLUX.1 [dev], guidance-distilled",
    ),
    _sdxl_like("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "Stable Diffusion XL base"),
    _sdxl_like("sdxl-turbo", "stabilityai/sdxl-turbo", "SDXL Turbo, 1-4 steps",
               default_size=(512, 512), default_steps=1, default_guidance=0.0,
               negative_prompt=False, max_steps=10),
    ModelSpec(
        name="sd-1.5", repo="stable-diffusion-v1-5/stable-diffusion-v1-5", family="sd",
        default_size=(512, 512), size_multiple=8, max_pixels=1024 * 1024,
        default_steps=30, default_guidance=7.5, dtype="float16",
        description="Stable Diffusion 1.5",
    ),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _ENTRIES}
_BY_REPO: dict[str, ModelSpec] = {spec.repo: spec for spec in _ENTRIES if spec.repo}


def lookup(name: str) -> ModelSpec | None:
    """The registry entry for an alias or a registered repo id, if any."""
    return REGISTRY.get(name) or _BY_REPO.get(name)


def canonical_name(name: str) -> str:
    """The name a model is served and routed under: its alias when it has one."""
    spec = lookup(name)
    return spec.name if spec is not None else name


def generic(name: str, **overrides: Any) -> ModelSpec:
    """Defaults for a repo id or directory the registry does not know."""
    return ModelSpec(name=name, repo=name, family="generic", **overrides)


def resolve(name: str) -> ModelSpec:
    """The spec to serve ``name`` with: its registry entry, or generic defaults."""
    return lookup(name) or generic(name)


def default_model(cuda: bool) -> str:
    return "flux-schnell" if cuda else TINY
