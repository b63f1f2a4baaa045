"""Tiny random-weight Lumina Image 2.0 (``Lumina2Pipeline``) for tests.

Same component classes as Alpha-VLLM/Lumina-Image-2.0 (unified Next-DiT transformer, FLUX-style
16-channel ``AutoencoderKL`` with 8x compression, Gemma2 text encoder, Gemma tokenizer), shrunk to
well under a megabyte. It makes noise, not pictures.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import flux_vae, save_seeded
from tests.gpu_worker.families._tokenizers import gemma_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )
    from transformers import Gemma2Model, GemmaTokenizer

PIPELINE = "Lumina2Pipeline"
CALL_KWARGS: dict[str, Any] = {}
NOTES = (
    "Classic CFG: on when guidance_scale > 1 (default 4.0), negative_prompt honoured (absent "
    "means ''), two transformer passes per guided step, the guided prediction rescaled to the "
    "conditional norm when cfg_normalization=True (default). cfg_trunc_ratio (default 1.0 = guide"
    " every step) stops CFG after that fraction of the steps; the model card uses "
    "cfg_trunc_ratio=0.25. The prompt (not the negative prompt) is prefixed with a ~30-token "
    "system prompt (`system_prompt` kwarg) plus ' <Prompt Start> ', then padded/truncated to "
    "max_sequence_length (default 256, ValueError above 512; but an effective caption over 299 "
    "tokens crashes the transformer's RoPE lookup - axes_lens[0]=300, the library default, kept "
    "in the tiny build - so keep it <= 299), so long prompts lose their tail silently apart from "
    "a log line. The default system prompt's words are single tokens in our tiny tokenizer too. "
    "Width and height must be multiples of 16 (ValueError). callback_on_step_end(pipe, i, t, "
    "kwargs) works and must return a dict; tensor inputs: latents, prompt_embeds. There is no "
    "interrupt support: `pipe._interrupt = True` is never read, all steps run - to stop early, "
    "raise from the callback. Real model: 2B, bf16, 1024x1024 (default size: transformer "
    "sample_size 128 x 8), pipeline defaults 30 steps / guidance 4.0; the model card uses 50 "
    "steps, guidance 4.0, cfg_trunc_ratio 0.25, cfg_normalization True."
)

SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of "
    "image-text alignment based on textual prompts or user prompts. <Prompt Start> "
)
MAX_LENGTH = 256
VOCAB_SIZE = 451
# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (VOCAB_SIZE, MAX_LENGTH)}
TEXT_DIM = 16
LATENT_CHANNELS = 16


def build(path: pathlib.Path) -> None:
    """Build the tiny Lumina 2 pipeline deterministically and save it to ``path``."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> Lumina2Pipeline:
    from diffusers import Lumina2Pipeline

    tokenizer = _tokenizer()
    return Lumina2Pipeline(
        transformer=_transformer(),
        scheduler=_scheduler(),
        # FLUX-style: 16 latent channels.
        vae=flux_vae(latent_channels=LATENT_CHANNELS, sample_size=128),
        text_encoder=_text_encoder(),
        tokenizer=tokenizer,
    )


def _tokenizer() -> GemmaTokenizer:
    tokenizer = gemma_tokenizer([SYSTEM_PROMPT], model_max_length=MAX_LENGTH)
    # The pipeline sets this on every load; saving it keeps the saved tokenizer honest.
    tokenizer.padding_side = "right"
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


def _text_encoder() -> Gemma2Model:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma2Model(config)


def _transformer() -> Lumina2Transformer2DModel:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(8, 4, 4),
        axes_lens=(300, 512, 512),
        cap_feat_dim=TEXT_DIM,
    )



def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
