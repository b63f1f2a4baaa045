"""Real-size pipelines with random weights, built from the published configs (no download).

bench/gpu.py times these: what matters for speed is the shape of every layer, not the weights,
so each component is built from its checkpoint's real config and randomly initialised, straight
on the device in the pipeline's dtype. The tokenizers are the in-memory ones of the test
fixtures: prompts are padded to the real sequence lengths (CLIP 77, T5 256), so the text
encoders do the real amount of work.

``depth`` (tests and CPU smoke runs only) keeps every width but cuts every stack of layers to
that many, so the whole path runs on a laptop; ``tiny`` cuts the widths too (a miniature of
the same classes: a generation in a fraction of a second on a CPU). Figures from either are
not real-size.

Every component is built from one seed, so two builds of a model have the same weights: the
speed settings of gpu.py and quality.py each get a fresh denoiser (quantising, compiling and
step caching change it in place) and share the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# -------------------------------------------------------------------------- published configs

# black-forest-labs/FLUX.1-schnell: transformer/config.json (12B)
FLUX_SCHNELL_TRANSFORMER = {
    "attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
    "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
# FLUX.1 vae/config.json: 16 latent channels, no quant convs
FLUX_VAE = {
    "act_fn": "silu", "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "force_upcast": True, "mid_block_add_attention": True,
}
# FLUX.1-schnell scheduler/scheduler_config.json
FLUX_SCHNELL_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
}
# openai/clip-vit-large-patch14 text tower (FLUX text_encoder, SDXL text_encoder)
CLIP_L = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}
# laion CLIP-ViT-bigG-14 text tower (SDXL text_encoder_2, with projection)
CLIP_BIG_G = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "vocab_size": 49408,
    "hidden_act": "gelu", "projection_dim": 1280,
}
# google/t5-v1_1-xxl encoder (FLUX text_encoder_2)
T5_XXL = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
    "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
}
# stabilityai/sdxl-turbo unet/config.json (SDXL base's UNet at sample size 64)
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280), "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 64, "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
}
# SDXL vae/config.json
SDXL_VAE = {
    "act_fn": "silu", "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.13025, "force_upcast": True,
}
# sdxl-turbo scheduler/scheduler_config.json
SDXL_TURBO_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "trailing",
}


# Miniatures (``tiny=True``): the same classes, schedulers and tokenizers, every width and depth
# cut so that a whole generation takes a fraction of a second on a CPU. For CPU smoke runs and
# tests of the scripts; their figures say nothing about a real model.
TINY_FLUX_TRANSFORMER = {
    **FLUX_SCHNELL_TRANSFORMER, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 32, "pooled_projection_dim": 32, "num_layers": 2,
    "num_single_layers": 2, "axes_dims_rope": (4, 6, 6),
}
_TINY_VAE = {"block_out_channels": (8,) * 4, "layers_per_block": 1, "norm_num_groups": 4,
             "mid_block_add_attention": False}
TINY_FLUX_VAE = {**FLUX_VAE, **_TINY_VAE}
TINY_SDXL_VAE = {**SDXL_VAE, **_TINY_VAE}
# Real vocabularies (the tokenizers' ids must fit), everything else small.
TINY_CLIP = {**CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "projection_dim": 32}
TINY_CLIP_G = {**TINY_CLIP, "hidden_act": "gelu"}
TINY_T5 = {**T5_XXL, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32}
TINY_SDXL_UNET = {
    **SDXL_UNET, "attention_head_dim": (2, 4), "block_out_channels": (16, 32),
    "cross_attention_dim": 64,  # both CLIPs' hidden states, concatenated
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1,
    "norm_num_groups": 8, "transformer_layers_per_block": (1, 1), "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # micro-conditioning + pooled text
}

SEED = 0  # every component is built from this seed: the same weights in every build

# component name -> a function that builds it (on the current default device and dtype)
Factories = dict[str, Callable[[], Any]]


@dataclass(frozen=True)
class RealSize:
    """How to build one model, and the setting bench/gpu.py runs it at."""
    name: str  # the registry alias whose defaults the worker uses
    size: int
    steps: int
    factories: Callable[[int | None, bool], Factories]  # (depth, tiny) -> component builders
    assemble: Callable[[dict[str, Any]], Any]  # modules -> the pipeline (scheduler, tokenizers)
    denoiser: str  # the component quantising, compiling and step caching change in place


# -------------------------------------------------------------------------- building


@contextlib.contextmanager
def on_device(device: str, dtype: Any) -> Iterator[None]:
    """Create parameters on ``device`` in ``dtype``: no float32 copy on the host first.

    FLUX.1's transformer and T5-XXL alone are 67 GB in float32; built this way they are
    allocated once, in bf16, where they run.
    """
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(model: RealSize, device: str, dtype: Any, depth: int | None = None, *,
          tiny: bool = False, reuse: dict[str, Any] | None = None) -> Any:
    """The pipeline with seeded random weights, every module on ``device`` in ``dtype``, in
    eval mode.

    ``reuse``: modules of an earlier build of the same model to share instead of building
    them again (see ``components``).
    """
    modules = {**(reuse or {}), **components(model, device, dtype, depth, tiny=tiny,
                                             leave_out=tuple(reuse or ()))}
    # Schedulers and tokenizers are made outside: they compute with numpy, in float32.
    return model.assemble(modules)


def components(model: RealSize, device: str, dtype: Any, depth: int | None = None, *,
               tiny: bool = False, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The model's modules but those in ``leave_out``, each built from the same seed: every
    build of a component has the same weights. bench/gpu.py and bench/quality.py build the
    others once and a fresh denoiser per setting (the one component a setting changes in
    place), so the images of every setting can be compared."""
    return {name: _seeded(factory, device, dtype)
            for name, factory in model.factories(depth, tiny).items() if name not in leave_out}


def _seeded(factory: Callable[[], Any], device: str, dtype: Any) -> Any:
    import torch

    torch.manual_seed(SEED)  # the same weights whatever was built before
    with on_device(device, dtype):
        module = factory()
    return module.to(device=device, dtype=dtype).eval()


def _cut(config: dict[str, Any], depth: int | None, *keys: str) -> dict[str, Any]:
    if depth is None:
        return dict(config)
    return {**config, **{key: depth for key in keys}}


def _clip(config: dict[str, Any], depth: int | None, *, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.gpu_worker.families import _tokenizers as tok

    bos, eos = tok.clip_special_ids()  # the in-memory tokenizer's ids, inside the real vocab
    text = CLIPTextConfig(**_cut(config, depth, "num_hidden_layers"), bos_token_id=bos,
                          eos_token_id=eos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text)


def _t5(config: dict[str, Any], depth: int | None) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**_cut(config, depth, "num_layers"), is_encoder_decoder=False,
                                   use_cache=False))


def flux_schnell_factories(depth: int | None = None, tiny: bool = False) -> Factories:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = TINY_FLUX_TRANSFORMER if tiny else FLUX_SCHNELL_TRANSFORMER
    return {
        "transformer": lambda: FluxTransformer2DModel(
            **_cut(transformer, depth, "num_layers", "num_single_layers")),
        "vae": lambda: AutoencoderKL(**(TINY_FLUX_VAE if tiny else FLUX_VAE)),
        "text_encoder": lambda: _clip(TINY_CLIP if tiny else CLIP_L, depth, projection=False),
        "text_encoder_2": lambda: _t5(TINY_T5 if tiny else T5_XXL, depth),
    }


def flux_schnell_pipeline(modules: dict[str, Any]) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from tests.gpu_worker.families import _tokenizers as tok

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER),
                        tokenizer=tok.clip_tokenizer(), tokenizer_2=tok.t5_tokenizer(),
                        **modules)


def sdxl_turbo_factories(depth: int | None = None, tiny: bool = False) -> Factories:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = dict(TINY_SDXL_UNET if tiny else SDXL_UNET)
    if depth is not None:
        blocks = len(unet_config["block_out_channels"])
        unet_config.update(transformer_layers_per_block=(depth,) * blocks, layers_per_block=depth)
    return {
        "unet": lambda: UNet2DConditionModel(**unet_config),
        "vae": lambda: AutoencoderKL(**(TINY_SDXL_VAE if tiny else SDXL_VAE)),
        "text_encoder": lambda: _clip(TINY_CLIP if tiny else CLIP_L, depth, projection=False),
        "text_encoder_2": lambda: _clip(TINY_CLIP_G if tiny else CLIP_BIG_G, depth,
                                        projection=True),
    }


def sdxl_turbo_pipeline(modules: dict[str, Any]) -> Any:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from tests.gpu_worker.families import _tokenizers as tok

    return StableDiffusionXLPipeline(
        scheduler=EulerAncestralDiscreteScheduler(**SDXL_TURBO_SCHEDULER),
        tokenizer=tok.clip_tokenizer(), tokenizer_2=tok.clip_tokenizer(), **modules)


MODELS = {
    "flux-schnell": RealSize("flux-schnell", size=1024, steps=4,
                             factories=flux_schnell_factories, assemble=flux_schnell_pipeline,
                             denoiser="transformer"),
    "sdxl-turbo": RealSize("sdxl-turbo", size=512, steps=1, factories=sdxl_turbo_factories,
                           assemble=sdxl_turbo_pipeline, denoiser="unet"),
}
