"""Tiny random-weight FLUX.2 klein (``Flux2KleinPipeline``): Qwen3 text encoder, base variant."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import flux_scheduler, save_seeded, vae_config

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

PIPELINE = "Flux2KleinPipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "Flux2KleinPipeline has NO negative_prompt parameter (passing one raises TypeError); its "
    "unconditional prompt is always \"\" (only negative_prompt_embeds can override it). Real CFG "
    "on guidance_scale (default 4.0): when guidance_scale > 1 and model_index.json has "
    "is_distilled=false (the Base checkpoints, and this tiny build) the transformer runs twice "
    "per step; the step-distilled checkpoints (FLUX.2-klein-4B/9B, is_distilled=true) ignore "
    "guidance_scale and log a warning when it is > 1. The Qwen3 prompt goes through the "
    "tokenizer's chat template (enable_thinking=False), is padded to max_sequence_length "
    "(default 512), and the hidden states of layers text_encoder_out_layers=(9, 18, 27) are "
    "stacked, so the text encoder needs >= 27 layers for the default (this tiny Qwen3 has 27). "
    "The first positional parameter is `image` (reference image for editing), so pass prompt by "
    "keyword. callback_on_step_end(pipe, i, t, kwargs) works (tensor inputs: latents, "
    "prompt_embeds); pipe._interrupt = True skips the remaining steps but the VAE still decodes "
    "and images are returned. Width/height must be multiples of vae_scale_factor*2 = 16; others "
    "are floored with a warning. Real models: 1024x1024 default, bf16; klein-4B/9B (distilled): "
    "4 steps, guidance_scale 1.0; klein Base: 50 steps (pipeline default), guidance_scale 4.0. "
    "Tiny build: 4 latent channels (real 32), 1 double + 1 single block, hidden size 16 Qwen3."
)

_QWEN_HIDDEN = 16
_QWEN_MAX_LENGTH = 512
_QWEN_LAYERS = 27  # the pipeline's default text_encoder_out_layers read hidden state 27
_STACKED_LAYERS = 3  # len(text_encoder_out_layers)
_LATENT_CHANNELS = 4

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (tok.QWEN_VOCAB_SIZE, _QWEN_MAX_LENGTH)}


def build(path: pathlib.Path) -> None:
    """Build the tiny FLUX.2 klein pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> Flux2KleinPipeline:
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    tokenizer = tok.qwen_tokenizer(model_max_length=_QWEN_MAX_LENGTH)
    tokenizer.chat_template = tok.QWEN3_CHAT_TEMPLATE
    return Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=AutoencoderKLFlux2(**vae_config(latent_channels=_LATENT_CHANNELS, sample_size=1024)),
        text_encoder=_build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_build_transformer(),
        is_distilled=False,
    )


def _build_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3ForCausalLM:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_QWEN_HIDDEN,
        intermediate_size=2 * _QWEN_HIDDEN,
        num_hidden_layers=_QWEN_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=_QWEN_MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=ids(tok.QWEN_ENDOFTEXT),
        eos_token_id=ids(tok.QWEN_IM_END),
        pad_token_id=ids(tok.QWEN_ENDOFTEXT),
    )
    return Qwen3ForCausalLM(config)


def _build_transformer() -> Flux2Transformer2DModel:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # 2x2-patchified VAE latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_STACKED_LAYERS * _QWEN_HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )

