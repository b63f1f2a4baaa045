"""The model registry: short aliases, their Hugging Face repos, and each family's defaults.

Plain data that imports no torch, so the HTTP frontend validates requests against a model's
limits and tells an unknown model (404) from a known one that no worker serves (503).

A family's quirks live in its entry of ``FAMILIES`` (keyed by the diffusers pipeline class that
``model_index.json`` names); an alias is a family plus the checkpoint's own defaults. A local
directory or a repo id the registry does not know gets its family's entry from the pipeline
class it loads as, else generic defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY = "tiny"
BINNED_SIZES = (256, 512, 1024, 2048, 4096)  # sample sizes resolution-binning tables exist for


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model's identity, defaults, limits and the quirks of its pipeline family."""

    name: str  # what requests and /v1/models call it: an alias, repo id or directory
    repo: str  # what from_pretrained loads ("" for the built-in tiny model)
    family: str
    pipeline: str = ""  # the diffusers class model_index.json names
    # Load through this diffusers class rather than DiffusionPipeline: a repo that holds one
    # stage and names the other in its card (Stable Cascade's decoder names its prior).
    load_as: str | None = None
    default_size: tuple[int, int] = (1024, 1024)
    size_multiple: int = 16
    min_pixels: int = 64 * 64
    max_pixels: int = 2048 * 2048
    allowed_sizes: tuple[tuple[int, int], ...] = ()  # non-empty: only these sizes
    default_steps: int = 30
    max_steps: int = 150
    default_guidance: float | None = 5.0
    negative_prompt: bool = True  # whether the pipeline takes a negative prompt (real CFG)
    guidance_param: str = "guidance_scale"  # the __call__ argument our `guidance` feeds
    # Sent when the client gave no negative prompt: Qwen-Image runs CFG only with one.
    default_negative_prompt: str | None = None
    dtype: str = "bfloat16"  # on CUDA; CPU always runs float32
    variant: str | None = None  # weight files variant to load, e.g. "fp16"
    max_sequence_length: int | None = None
    # Reads Automatic1111's (word:1.3) weights and prompts past 77 CLIP tokens (SD, SDXL:
    # gpu_worker/prompt_embeds.py); elsewhere brackets are text.
    prompt_weighting: bool = False
    # Step caching a worker uses with --step-cache auto (gpu_worker/step_cache.py syntax; ""
    # is none). A worker announces the one it runs. No family turns one on: each costs some
    # quality, measured only on real weights (docs/performance.md, "Step caching").
    step_cache: str = ""
    resolution_binning: bool = False  # the family snaps sizes to trained aspect buckets
    legacy_callback: bool = False  # progress through callback=/callback_steps, not _on_step_end
    decoder_steps: int = 0  # two-stage pipelines: the second stage's fixed step count
    # The pipeline reads width/height as an aspect ratio at the area of its default_sample_size
    # (HiDream); the runner sets that area per request, up to the trained one.
    sized_by_area: bool = False
    extra_components: tuple[tuple[str, str, str], ...] = ()  # (kwarg, repo, transformers class)
    description: str = ""
    # Editing (gpu_worker/editing.py): the diffusers classes made from the loaded pipeline's
    # own components with from_pipe; "" where the family has none.
    edit_pipeline: str = ""  # img2img
    inpaint_pipeline: str = ""
    edit_by_reference: bool = False  # the pipeline takes input images as references itself,
    # with no strength (FLUX.2 Klein): several images, and the whole schedule runs
    max_inputs: int = 1  # input images one edit may take
    strength_floors: bool = False  # runs int(steps x strength) steps (SD, SDXL, Kolors)

    @property
    def modes(self) -> tuple[str, ...]:
        """What it can do: ``generate`` always, ``edit`` and ``inpaint`` where it has them."""
        return ("generate",) + (("edit",) if self.edit_pipeline else ()) \
            + (("inpaint",) if self.inpaint_pipeline else ())

    def steps_run(self, steps: int, strength: float | None) -> int:
        """The denoising steps an edit at ``strength`` runs of ``steps`` (all of them for a
        generation): img2img starts part-way down the schedule. 0 means it would run none."""
        if strength is None:  # a generation, or Klein's references: the whole schedule
            return steps
        if self.strength_floors:
            return min(int(steps * strength), steps)
        # The flow-matching pipelines: steps - int(steps - steps x strength), at least 1 above 0.
        return steps - int(max(steps - steps * strength, 0.0))

    def describe(self) -> dict[str, Any]:
        """Every field as plain data, sizes as "WxH": what READY announces and /v1/models shows."""
        data = dataclasses.asdict(self)
        data["default_size"] = _size_str(self.default_size)
        data["allowed_sizes"] = [_size_str(s) for s in self.allowed_sizes]
        data["extra_components"] = [list(c) for c in self.extra_components]
        return data

    @classmethod
    def from_description(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild a spec from ``describe()``'s data; unknown keys are ignored, bad ones fail."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("default_size"), str):
            values["default_size"] = _parse_size(values["default_size"])
        values["allowed_sizes"] = tuple(_parse_size(s) for s in values.get("allowed_sizes", ()))
        values["extra_components"] = tuple(tuple(c) for c in values.get("extra_components", ()))
        return cls(**values)

    def with_defaults(self, **overrides: Any) -> ModelSpec:
        return dataclasses.replace(self, **overrides)


def _size_str(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


# --------------------------------------------------------------------------------------------
# Families: what every checkpoint of a pipeline class shares. Keyed by pipeline class name.

_HUNYUAN_SIZES = ((1024, 1024), (1280, 1280), (1024, 768), (1152, 864), (1280, 960),
                  (768, 1024), (864, 1152), (960, 1280), (1280, 768), (768, 1280))


def _family(family: str, pipeline: str, **fields: Any) -> ModelSpec:
    return ModelSpec(name="", repo="", family=family, pipeline=pipeline, **fields)


FAMILIES: dict[str, ModelSpec] = {f.pipeline: f for f in (
    _family("sd", "StableDiffusionPipeline", default_size=(512, 512), size_multiple=8,
            max_pixels=1024 * 1024, default_steps=30, default_guidance=7.5, dtype="float16",
            prompt_weighting=True,
            edit_pipeline="StableDiffusionImg2ImgPipeline",
            inpaint_pipeline="StableDiffusionInpaintPipeline", strength_floors=True),
    _family("sdxl", "StableDiffusionXLPipeline", size_multiple=8, default_steps=30,
            default_guidance=6.0, dtype="float16", prompt_weighting=True,
            edit_pipeline="StableDiffusionXLImg2ImgPipeline",
            inpaint_pipeline="StableDiffusionXLInpaintPipeline", strength_floors=True),
    _family("sd3", "StableDiffusion3Pipeline", default_steps=28, default_guidance=3.5,
            max_sequence_length=256, edit_pipeline="StableDiffusion3Img2ImgPipeline",
            inpaint_pipeline="StableDiffusion3InpaintPipeline"),
    _family("flux", "FluxPipeline", default_steps=28, default_guidance=3.5,
            negative_prompt=False, max_sequence_length=512,
            edit_pipeline="FluxImg2ImgPipeline", inpaint_pipeline="FluxInpaintPipeline"),
    # Klein edits with its own pipeline: the input images are in-context references.
    _family("flux2-klein", "Flux2KleinPipeline", default_steps=4, default_guidance=1.0,
            negative_prompt=False, edit_pipeline="Flux2KleinPipeline",
            inpaint_pipeline="Flux2KleinInpaintPipeline", edit_by_reference=True,
            max_inputs=4),
    _family("chroma", "ChromaPipeline", default_steps=40, default_guidance=3.0,
            max_sequence_length=512, edit_pipeline="ChromaImg2ImgPipeline",
            inpaint_pipeline="ChromaInpaintPipeline"),
    _family("pixart-sigma", "PixArtSigmaPipeline", default_steps=20, default_guidance=4.5,
            max_sequence_length=300, resolution_binning=True, legacy_callback=True,
            dtype="float16"),
    _family("sana", "SanaPipeline", size_multiple=32, default_steps=20, default_guidance=4.5,
            max_sequence_length=300, resolution_binning=True),
    _family("sana-sprint", "SanaSprintPipeline", size_multiple=32, default_steps=2,
            max_steps=20, default_guidance=4.5, negative_prompt=False,
            max_sequence_length=300, resolution_binning=True,
            edit_pipeline="SanaSprintImg2ImgPipeline"),
    _family("hunyuan-dit", "HunyuanDiTPipeline", default_steps=50, default_guidance=5.0,
            allowed_sizes=_HUNYUAN_SIZES, dtype="float16"),
    _family("lumina-next", "LuminaPipeline", default_steps=30, default_guidance=4.0,
            max_sequence_length=256),
    _family("lumina-2", "Lumina2Pipeline", default_steps=50, default_guidance=4.0,
            max_sequence_length=256),
    _family("qwen-image", "QwenImagePipeline", default_size=(1328, 1328), default_steps=50,
            default_guidance=4.0, guidance_param="true_cfg_scale", max_sequence_length=512,
            default_negative_prompt=" ",
            max_pixels=2048 * 2048, edit_pipeline="QwenImageImg2ImgPipeline",
            inpaint_pipeline="QwenImageInpaintPipeline"),
    _family("z-image", "ZImagePipeline", default_steps=9, default_guidance=0.0,
            negative_prompt=False, max_sequence_length=512,
            edit_pipeline="ZImageImg2ImgPipeline", inpaint_pipeline="ZImageInpaintPipeline"),
    _family("kolors", "KolorsPipeline", size_multiple=8, default_steps=25,
            default_guidance=5.0, dtype="float16", max_sequence_length=256,
            edit_pipeline="KolorsImg2ImgPipeline", strength_floors=True),
    _family("auraflow", "AuraFlowPipeline", default_steps=50, default_guidance=3.5,
            max_sequence_length=256),
    _family("cogview4", "CogView4Pipeline", size_multiple=32, default_steps=50,
            default_guidance=3.5, max_sequence_length=1024),
    _family("hidream", "HiDreamImagePipeline", default_steps=50, default_guidance=5.0,
            max_sequence_length=128, sized_by_area=True, max_pixels=1024 * 1024),
    _family("stable-cascade", "StableCascadeCombinedPipeline", size_multiple=128,
            default_steps=20, default_guidance=4.0, guidance_param="prior_guidance_scale",
            decoder_steps=10),
)}

GENERIC = _family("generic", "")


def _alias(name: str, repo: str, pipeline: str, description: str, **overrides: Any) -> ModelSpec:
    return FAMILIES[pipeline].with_defaults(name=name, repo=repo, description=description,
                                            **overrides)


_SDXL, _FLUX, _SD3 = "StableDiffusionXLPipeline", "FluxPipeline", "StableDiffusion3Pipeline"

_ENTRIES: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=TINY, repo="", family="tiny", pipeline="StableDiffusionPipeline",
        default_size=(256, 256), size_multiple=8, min_pixels=8 * 8, max_pixels=1024 * 1024,
        default_steps=4, max_steps=50, default_guidance=5.0, dtype="float32",
        prompt_weighting=True, edit_pipeline="StableDiffusionImg2ImgPipeline",
        inpaint_pipeline="StableDiffusionInpaintPipeline", strength_floors=True,
        description="built-in miniature pipeline with random weights: it makes noise, for "
                    "tests and machines without a GPU",
    ),
    # FLUX
    _alias("flux-schnell", "black-forest-labs/FLUX.1-schnell", _FLUX,
           "FLUX.1 [schnell], 4-step distilled", default_steps=4, max_steps=50,
           default_guidance=0.0, max_sequence_length=256),
    _alias("flux-dev", "black-forest-labs/FLUX.1-dev", _FLUX,
           "FLUX.1 [dev], guidance-distilled"),
    _alias("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", "Flux2KleinPipeline",
           "FLUX.2 [klein] 4B, step-distilled"),
    _alias("chroma", "lodestones/Chroma1-HD", "ChromaPipeline", "Chroma1-HD, real CFG"),
    # SDXL and fine-tunes
    _alias("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", _SDXL,
           "Stable Diffusion XL base 1.0", variant="fp16"),
    _alias("sdxl-turbo", "stabilityai/sdxl-turbo", _SDXL, "SDXL Turbo, 1-4 steps",
           default_size=(512, 512), default_steps=1, max_steps=10, default_guidance=0.0,
           negative_prompt=False, variant="fp16"),
    _alias("playground-v2.5", "playgroundai/playground-v2.5-1024px-aesthetic", _SDXL,
           "Playground v2.5, aesthetic 1024px", default_steps=50, default_guidance=3.0,
           variant="fp16"),
    _alias("juggernaut-xl", "RunDiffusion/Juggernaut-XL-v9", _SDXL,
           "Juggernaut XL v9, photoreal SDXL fine-tune", default_guidance=4.5),
    _alias("realvisxl", "SG161222/RealVisXL_V5.0", _SDXL, "RealVisXL V5.0, photoreal",
           default_guidance=5.0),
    _alias("dreamshaper-xl-turbo", "Lykon/dreamshaper-xl-v2-turbo", _SDXL,
           "DreamShaper XL v2 Turbo", default_steps=6, default_guidance=2.0),
    _alias("animagine-xl-4", "cagliostrolab/animagine-xl-4.0", _SDXL,
           "Animagine XL 4.0, anime", default_steps=28, default_guidance=5.0),
    # SD 1.x / 2.x
    _alias("sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline",
           "Stable Diffusion 1.5", variant="fp16"),
    _alias("sd-turbo", "stabilityai/sd-turbo", "StableDiffusionPipeline", "SD Turbo, 1-4 steps",
           default_steps=1, max_steps=10, default_guidance=0.0, negative_prompt=False,
           variant="fp16"),
    # SD3.5
    _alias("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", _SD3,
           "Stable Diffusion 3.5 Medium", default_steps=40, default_guidance=4.5),
    _alias("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", _SD3,
           "Stable Diffusion 3.5 Large"),
    _alias("sd3.5-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo", _SD3,
           "Stable Diffusion 3.5 Large Turbo, 4 steps", default_steps=4, max_steps=20,
           default_guidance=0.0, negative_prompt=False),
    # DiT families
    _alias("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArtSigmaPipeline",
           "PixArt-Σ XL 1024"),
    _alias("sana", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", "SanaPipeline",
           "Sana 1.6B 1024px"),
    _alias("sana-sprint", "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
           "SanaSprintPipeline", "Sana Sprint 1.6B, 1-4 steps"),
    _alias("sana-sprint-small", "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
           "SanaSprintPipeline", "Sana Sprint 0.6B, 1-4 steps"),
    _alias("hunyuan-dit", "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers", "HunyuanDiTPipeline",
           "HunyuanDiT v1.2, bilingual"),
    _alias("lumina-next", "Alpha-VLLM/Lumina-Next-SFT-diffusers", "LuminaPipeline",
           "Lumina-Next SFT"),
    _alias("lumina-2", "Alpha-VLLM/Lumina-Image-2.0", "Lumina2Pipeline", "Lumina Image 2.0"),
    _alias("qwen-image", "Qwen/Qwen-Image", "QwenImagePipeline",
           "Qwen-Image 20B, strong text rendering"),
    _alias("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline",
           "Z-Image Turbo, 8-step distilled"),
    _alias("kolors", "Kwai-Kolors/Kolors-diffusers", "KolorsPipeline", "Kolors, bilingual",
           variant="fp16"),
    _alias("auraflow", "fal/AuraFlow-v0.3", "AuraFlowPipeline", "AuraFlow v0.3"),
    _alias("cogview4", "THUDM/CogView4-6B", "CogView4Pipeline", "CogView4 6B"),
    _alias("hidream-i1", "HiDream-ai/HiDream-I1-Full", "HiDreamImagePipeline",
           "HiDream-I1 Full (needs access to Llama 3.1 8B Instruct)",
           extra_components=(
               ("tokenizer_4", "meta-llama/Llama-3.1-8B-Instruct", "AutoTokenizer"),
               ("text_encoder_4", "meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM"),
           )),
    # Two-stage
    _alias("stable-cascade", "stabilityai/stable-cascade", "StableCascadeCombinedPipeline",
           "Stable Cascade: prior then decoder", load_as="StableCascadeCombinedPipeline",
           variant="bf16"),
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
    return GENERIC.with_defaults(name=name, repo=name, **overrides)


def for_pipeline(name: str, pipeline_class: str) -> ModelSpec:
    """The spec of an unregistered model from the pipeline class it loads as."""
    family = FAMILIES.get(pipeline_class)
    if family is None:
        return generic(name, pipeline=pipeline_class)
    return family.with_defaults(name=name, repo=name)


def pipeline_class_of(directory: str) -> str | None:
    """The pipeline class a local model directory declares in model_index.json."""
    index = Path(directory) / "model_index.json"
    try:
        class_name: str | None = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return class_name


def resolve(name: str) -> ModelSpec:
    """The spec a worker serves ``name`` with: its entry, its directory's family (from the
    model_index.json on this machine's disk), or generic. The frontend resolves names with
    http_frontend.model_resolver, which trusts what workers announced over any local disk."""
    spec = lookup(name)
    if spec is not None:
        return spec
    pipeline_class = pipeline_class_of(name)
    return for_pipeline(name, pipeline_class) if pipeline_class else generic(name)


def default_model(cuda: bool) -> str:
    return "flux-schnell" if cuda else TINY
