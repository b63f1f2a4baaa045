"""Tiny random-weight FLUX.1 (``FluxPipeline``), shaped like FLUX.1-dev (guidance-distilled)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import (
    clip_text_encoder,
    flux_scheduler,
    flux_vae,
    save_seeded,
    t5_encoder,
)

if TYPE_CHECKING:
    from diffusers import FluxPipeline, FluxTransformer2DModel

PIPELINE = "FluxPipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "FluxPipeline (FLUX.1-schnell and FLUX.1-dev share it). guidance_scale is NOT "
    "classifier-free guidance: it is fed to the transformer's guidance embedding, and only when "
    "transformer.config.guidance_embeds is true (dev; this tiny build); schnell has no guidance "
    "embedding and ignores it (its card says guidance_scale=0.0). Real CFG is opt-in: "
    "negative_prompt is accepted but only used when true_cfg_scale > 1 (default 1.0), which then"
    " runs the transformer twice per step; negative_prompt alone changes nothing. prompt_2 / "
    "negative_prompt_2 go to T5 (default: prompt). callback_on_step_end(pipe, i, t, kwargs) "
    "works (tensor inputs: latents, prompt_embeds); setting pipe._interrupt = True makes the "
    "loop skip the remaining steps (`if self.interrupt: continue`), but the VAE still decodes "
    "and images are returned. max_sequence_length (T5) defaults to 512 (> 512 raises "
    "ValueError); schnell must use <= 256; CLIP is fixed at 77 tokens (longer prompts are "
    "truncated with a warning). Width/height must be multiples of vae_scale_factor*2 = 16; other"
    " sizes are floored with a warning, not rejected. Real models: 1024x1024 default, bf16; "
    "schnell 4 steps, guidance 0.0, max_sequence_length 256; dev 28 steps (pipeline default; "
    "card example 50), guidance_scale 3.5. Tiny build: 4 latent channels (real 16), 1 double + 1"
    " single block, same scheduler config as dev (dynamic shift)."
)

_TEXT_DIM = 32

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {
    "tokenizer": (tok.CLIP_VOCAB_SIZE, tok.CLIP_MAX_LENGTH),
    "tokenizer_2": (tok.T5_VOCAB_SIZE, tok.T5_MAX_LENGTH),
}


def build(path: pathlib.Path) -> None:
    """Build the tiny FLUX.1 pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> FluxPipeline:
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=flux_vae(),
        text_encoder=clip_text_encoder(with_projection=False, hidden_size=_TEXT_DIM),
        tokenizer=tok.clip_tokenizer(),
        text_encoder_2=t5_encoder(d_model=_TEXT_DIM),
        tokenizer_2=tok.t5_tokenizer(),
        transformer=_build_transformer(),
    )


def _build_transformer() -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # 2x2-packed latents of the 4-channel VAE
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM,  # T5 hidden size
        pooled_projection_dim=_TEXT_DIM,  # CLIP pooled output
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
