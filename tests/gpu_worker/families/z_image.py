"""Tiny random-weight Z-Image (``ZImagePipeline``) for tests.

Same component classes as Tongyi-MAI/Z-Image-Turbo (single-stream S3-DiT transformer, FLUX-style
16-channel ``AutoencoderKL`` with 8x compression, Qwen3 text encoder, Qwen2 BPE tokenizer with a
chat template), shrunk to about two megabytes. It makes noise, not pictures.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import flux_vae, save_seeded
from tests.gpu_worker.families._tokenizers import (
    QWEN3_CHAT_TEMPLATE,
    QWEN_ENDOFTEXT,
    QWEN_IM_END,
    qwen_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen2Tokenizer, Qwen3Model

PIPELINE = "ZImagePipeline"
CALL_KWARGS: dict[str, Any] = {}
NOTES = (
    "CFG is on whenever guidance_scale > 0 (default 5.0), not > 1, and the formula is pos + "
    "guidance_scale * (pos - neg): Z-Image's guidance_scale is the usual CFG weight minus 1. "
    "z-image-turbo is distilled and meant to run with guidance_scale=0.0 (one transformer pass "
    "per step, negative_prompt silently ignored); with CFG on, an absent negative_prompt means "
    "''. Optional cfg_normalization (default False) caps the guided norm, cfg_truncation (default"
    " 1.0, i.e. never) turns CFG off for steps whose normalized time exceeds it. Each prompt goes"
    " through the tokenizer's chat template (user turn + generation prompt, enable_thinking=True "
    "so no empty think block), is padded to max_sequence_length (default 512, no upper-bound "
    "check) and only the unpadded hidden states (text encoder's second-to-last layer) are kept. "
    "Width and height must be multiples of 16 (ValueError otherwise); without them the size is "
    "1024x1024. callback_on_step_end(pipe, i, t, kwargs) works and must return a dict; tensor "
    "inputs: latents, prompt_embeds. `pipe._interrupt = True` inside the callback skips the "
    "remaining steps (the loop `continue`s) but the partly denoised latents are still VAE-decoded"
    " and returned; `_interrupt` is reset at the start of every call. Real Z-Image-Turbo: 6B, "
    "bf16, num_inference_steps=9 per the model card, guidance_scale=0.0, 1024x1024; the "
    "pipeline's own defaults are 50 steps and guidance 5.0, meant for the undistilled Z-Image."
)

MAX_LENGTH = 512
VOCAB_SIZE = 273
# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (VOCAB_SIZE, MAX_LENGTH)}
TEXT_DIM = 16
LATENT_CHANNELS = 16


def build(path: pathlib.Path) -> None:
    """Build the tiny Z-Image pipeline deterministically and save it to ``path``."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> ZImagePipeline:
    from diffusers import ZImagePipeline

    tokenizer = _tokenizer()
    return ZImagePipeline(
        scheduler=_scheduler(),
        # FLUX-style: 16 latent channels.
        vae=flux_vae(latent_channels=LATENT_CHANNELS, sample_size=64),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_transformer(),
    )


def _tokenizer() -> Qwen2Tokenizer:
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokenizer = qwen_tokenizer([template], model_max_length=MAX_LENGTH)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3Model:
    from transformers import Qwen3Config, Qwen3Model

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=ids(QWEN_ENDOFTEXT),
        eos_token_id=ids(QWEN_IM_END),
        pad_token_id=ids(QWEN_ENDOFTEXT),
    )
    return Qwen3Model(config)


def _transformer() -> ZImageTransformer2DModel:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=TEXT_DIM,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        # The real model's RoPE ranges: caption positions up to 1024, 512 patches a side.
        axes_lens=[1024, 512, 512],
    )



def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Z-Image-Turbo's scheduler: fixed shift 3, no resolution-dependent shifting.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
