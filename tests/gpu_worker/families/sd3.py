"""Tiny random-weight Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``), SD3.5-shaped."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import (
    clip_text_encoder,
    save_seeded,
    t5_encoder,
    vae,
)

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

PIPELINE = "StableDiffusion3Pipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "StableDiffusion3Pipeline (SD3 medium, SD3.5 medium/large/large-turbo). Three text encoders:"
    " CLIP-L and CLIP-G (77 tokens each, longer prompts truncated with a warning) and T5 "
    "(max_sequence_length, default 256, at most 512); prompt_2/prompt_3 and negative_prompt_2/_3"
    " default to prompt/negative_prompt. Real classifier-free guidance on guidance_scale "
    "(default 7.0): > 1 batches cond+uncond through the transformer and uses negative_prompt "
    "(default \"\"); <= 1 (turbo uses 0.0) skips it and ignores negative_prompt. Also clip_skip "
    "and skip-layer guidance (skip_guidance_layers). callback_on_step_end(pipe, i, t, kwargs) "
    "works (tensor inputs: latents, prompt_embeds, pooled_prompt_embeds); pipe._interrupt = True"
    " skips the remaining steps but the VAE still decodes and images are returned. Width/height "
    "must be multiples of vae_scale_factor*patch_size = 16: unlike the FLUX pipelines, other "
    "sizes raise ValueError. The largest size is 16*pos_embed_max_size (96 here and in SD3 "
    "medium = 1536 px; 192 in SD3.5). Default size is transformer.config.sample_size*8 = 1024. "
    "Real models: SD3 medium 28 steps, guidance 7.0, fp16; SD3.5 large/medium 28 steps (card: 40"
    " for medium), guidance 3.5-4.5, bf16; SD3.5 large turbo 4 steps, guidance 0.0, bf16. Tiny "
    "build: 4 latent channels (real 16), one dual-attention MMDiT block with RMS qk-norm (as in "
    "SD3.5), CLIP hidden 32+32, T5 d_model 64."
)

_CLIP_DIM = 32
_T5_DIM = 2 * _CLIP_DIM  # CLIP-L and CLIP-G hidden states are concatenated, padded to T5's width

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {
    "tokenizer": (tok.CLIP_VOCAB_SIZE, tok.CLIP_MAX_LENGTH),
    "tokenizer_2": (tok.CLIP_VOCAB_SIZE, tok.CLIP_MAX_LENGTH),
    "tokenizer_3": (tok.T5_VOCAB_SIZE, tok.T5_MAX_LENGTH),
}


def build(path: pathlib.Path) -> None:
    """Build the tiny SD3 pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> StableDiffusion3Pipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip_text_encoder(with_projection=True, hidden_size=_CLIP_DIM),
        tokenizer=tok.clip_tokenizer(),
        text_encoder_2=clip_text_encoder(with_projection=True, hidden_size=_CLIP_DIM),
        tokenizer_2=tok.clip_tokenizer(),
        text_encoder_3=t5_encoder(d_model=_T5_DIM),
        tokenizer_3=tok.t5_tokenizer(),
        transformer=_build_transformer(),
    )


def _build_transformer() -> SD3Transformer2DModel:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128,  # latent size of the real 1024px default
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _CLIP_DIM,  # CLIP-L and CLIP-G pooled outputs, concatenated
        pos_embed_max_size=96,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )

