"""Tiny random-weight Stable Diffusion XL pipeline (``StableDiffusionXLPipeline``).

Covers the SDXL-architecture aliases: sdxl, sdxl-turbo, playground-v2.5, juggernaut-xl,
realvisxl, dreamshaper-xl-turbo, animagine-xl-4. Two CLIP text encoders (the second with a
projection, whose pooled output feeds the UNet's ``text_time`` embedding), a UNet with
SDXL's added conditioning, and a four-level VAE (scale factor 8, as in the real model).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._tokenizers_b import clip_text_config_kwargs, clip_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig

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
SEED = 0


def build(path: pathlib.Path) -> None:
    """Build the tiny SDXL pipeline deterministically and save it to path."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        pipe = build_pipeline()
    pipe.save_pretrained(path)


def build_pipeline() -> StableDiffusionXLPipeline:
    """Build the pipeline in memory (seed the RNG first) with every module in eval mode."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _text_config()
    pipe = StableDiffusionXLPipeline(
        vae=build_vae(),
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        # The UNet cross-attends to both encoders' penultimate states, concatenated.
        unet=build_unet(cross_attention_dim=2 * TEXT_DIM, pooled_dim=TEXT_DIM),
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.unet):
        module.eval()
    return pipe


def _text_config() -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2]
        num_attention_heads=4,
        projection_dim=TEXT_DIM,
        hidden_act="gelu",
        **clip_text_config_kwargs(),
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
    """Build a four-level VAE (factor 8, as SDXL's), no mid-block attention (Kolors uses it too)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SAMPLE_SIZE * 8,
        scaling_factor=0.13025,
        mid_block_add_attention=False,
    )


def build_scheduler() -> Any:
    """Build the Euler scheduler with SDXL base's configuration."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
