"""Tiny random-weight Stable Diffusion XL pipeline (``StableDiffusionXLPipeline``).

Covers the SDXL-architecture aliases: sdxl, sdxl-turbo, playground-v2.5, juggernaut-xl,
realvisxl, dreamshaper-xl-turbo, animagine-xl-4. Two CLIP text encoders (the second with a
projection, whose pooled output feeds the UNet's ``text_time`` embedding), a UNet with
SDXL's added conditioning, and a four-level VAE (scale factor 8, as in the real model).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from gpu_worker import tiny
from tests.gpu_worker.families._components import clip_text_encoder, save_seeded, vae
from tests.gpu_worker.families._tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

PIPELINE = "StableDiffusionXLPipeline"
CALL_KWARGS: dict[str, Any] = {}
NOTES = (
    "StableDiffusionXLPipeline: real classifier-free guidance with `guidance_scale` (CFG on "
    "when > 1) and `negative_prompt`/`negative_prompt_2` (the `_2` variants go to the second "
    "CLIP encoder and default to the first); with no negative prompt and "
    "`force_zeros_for_empty_prompt` (true in the SDXL configs) the unconditional embedding is "
    "zeros, not the encoded empty string. `callback_on_step_end(pipe, i, t, kwargs)` is called "
    "once per denoising step and must return a dict; `pipe._interrupt = True` inside it makes "
    "the loop `continue` over the remaining steps (no more UNet calls or callbacks) but the VAE "
    "still decodes the partly denoised latents and the call returns images. Prompts are "
    "truncated to the CLIP tokenizers' `model_max_length` (77 tokens, no `max_sequence_length` "
    "argument). height/width must be multiples of 8 (VAE factor 8; the UNet pads odd latent "
    "sizes itself); default size is unet.sample_size*8 = 1024 for real checkpoints (256 for "
    "this tiny build). Real-model defaults (model cards / diffusers docs): SDXL base 1024x1024, "
    "~30-50 steps, guidance 5-7, fp16 (`variant='fp16'`, VAE `force_upcast` decodes in fp32 "
    "unless the fp16-fix VAE is used); sdxl-turbo 512x512, 1-4 steps, guidance_scale=0.0 (no "
    "CFG, negative prompt ignored); playground-v2.5 1024x1024, EDM DPM-Solver scheduler, ~50 "
    "steps, guidance 3.0, fp16 variant; dreamshaper-xl-turbo ~4-8 steps, guidance ~2; "
    "juggernaut-xl / realvisxl / animagine-xl-4 are ordinary SDXL fine-tunes (~25-30 steps, "
    "guidance ~5-7; animagine prefers 832x1216-class sizes). `output_type`, "
    "`num_images_per_prompt` and a list of per-image generators all work as usual."
)

TEXT_DIM = 32
TIME_EMBED_DIM = 8
SAMPLE_SIZE = 32  # latent size; default image side is 8x this

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {
    "tokenizer": (CLIP_VOCAB_SIZE, CLIP_MAX_LENGTH),
    "tokenizer_2": (CLIP_VOCAB_SIZE, CLIP_MAX_LENGTH),
}


def build(path: pathlib.Path) -> None:
    """Build the tiny SDXL pipeline deterministically and save it to path."""
    save_seeded(path, build_pipeline)


def build_pipeline() -> StableDiffusionXLPipeline:
    """Build the pipeline in memory (seed the RNG first)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=build_vae(),
        # SDXL reads both encoders' hidden_states[-2]: two layers are the fewest that have one.
        text_encoder=clip_text_encoder(with_projection=False, hidden_size=TEXT_DIM,
                                       hidden_act="gelu"),
        text_encoder_2=clip_text_encoder(with_projection=True, hidden_size=TEXT_DIM,
                                         hidden_act="gelu"),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        # The UNet cross-attends to both encoders' penultimate states, concatenated.
        unet=build_unet(cross_attention_dim=2 * TEXT_DIM, pooled_dim=TEXT_DIM),
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def build_unet(cross_attention_dim: int, pooled_dim: int, **extra: Any) -> UNet2DConditionModel:
    """Build a two-level UNet with SDXL's ``text_time`` added conditioning (also used by Kolors)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # Six micro-conditioning values (original size, crop, target size) plus pooled text.
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + pooled_dim,
        **extra,
    )


def build_vae() -> AutoencoderKL:
    """Build a four-level VAE (factor 8, as SDXL's) with SDXL's scaling (Kolors uses it too)."""
    return vae(sample_size=SAMPLE_SIZE * 8, scaling_factor=0.13025)


def build_scheduler() -> EulerDiscreteScheduler:
    """Build the Euler scheduler with SDXL base's configuration: SD 1.x's, as the tiny model's."""
    return tiny.build_scheduler()
