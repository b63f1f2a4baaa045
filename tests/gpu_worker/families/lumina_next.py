"""Tiny random-weight Lumina-Next (``LuminaPipeline``) for tests.

Same component classes as Alpha-VLLM/Lumina-Next-SFT-diffusers (Next-DiT transformer, SDXL-style
4-channel ``AutoencoderKL`` with 8x compression, Gemma text encoder, Gemma tokenizer), shrunk to
well under a megabyte. It makes noise, not pictures.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import save_seeded, vae
from tests.gpu_worker.families._tokenizers import gemma_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        LuminaNextDiT2DModel,
        LuminaPipeline,
    )
    from transformers import GemmaModel, GemmaTokenizer

PIPELINE = "LuminaPipeline"
# clean_caption defaults to True: with bs4 and ftfy installed it scrubs URLs, HTML and punctuation
# from the prompt, without them it logs two warnings per call and skips that. False makes the
# output the same on every machine.
CALL_KWARGS: dict[str, Any] = {"clean_caption": False}
NOTES = (
    "Classic CFG: on when guidance_scale > 1 (default 4.0), negative_prompt honoured (absent "
    "means '') but tokenized to the prompt's padded length, so a negative prompt longer than the "
    "prompt loses its tail; cond and uncond share one transformer call on a doubled batch and, "
    "quirk, guidance is applied to the first 3 of the 4 latent channels only. The prompt (not the"
    " negative one) is always lower-cased and stripped; clean_caption (default True) additionally"
    " scrubs URLs, HTML and odd punctuation but needs bs4+ftfy, else it warns twice per call and "
    "is skipped - pass clean_caption=False to get the same result on every machine. The "
    "max_sequence_length argument is ignored: prompts are always truncated to 256 Gemma tokens "
    "(self.max_sequence_length) and padded to a multiple of 8. Width and height must be multiples"
    " of 16 (ValueError); without them the size is transformer sample_size x 8 (1024 for the real"
    " model, 128 for the tiny one). Other knobs: scaling_watershed (1.0), proportional_attn "
    "(True), sigmas. callback_on_step_end(pipe, i, t, kwargs) works and must return a dict; "
    "tensor inputs: latents, prompt_embeds. There is no interrupt support: `pipe._interrupt = "
    "True` is never read and all steps run - to stop early, raise from the callback. Real "
    "Lumina-Next-SFT: 2B Next-DiT + Gemma-2B, bf16, pipeline defaults 30 steps, guidance 4.0, "
    "1024x1024."
)

MAX_LENGTH = 256
VOCAB_SIZE = 414
# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (VOCAB_SIZE, MAX_LENGTH)}
TEXT_DIM = 32
LATENT_CHANNELS = 4


def build(path: pathlib.Path) -> None:
    """Build the tiny Lumina-Next pipeline deterministically and save it to ``path``."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> LuminaPipeline:
    from diffusers import LuminaPipeline

    tokenizer = _tokenizer()
    return LuminaPipeline(
        transformer=_transformer(),
        scheduler=_scheduler(),
        # SDXL-VAE-style: 4 latent channels and its scaling factor.
        vae=vae(latent_channels=LATENT_CHANNELS, sample_size=128, scaling_factor=0.13025),
        text_encoder=_text_encoder(),
        tokenizer=tokenizer,
    )


def _tokenizer() -> GemmaTokenizer:
    # No prompt template to cover: a few common words keep ordinary prompts short.
    words = "a an the of and with in on at to photo painting portrait picture cat dog red blue"
    tokenizer = gemma_tokenizer([words], model_max_length=MAX_LENGTH)
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


def _text_encoder() -> GemmaModel:
    from transformers import GemmaConfig, GemmaModel

    config = GemmaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=4,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return GemmaModel(config)


def _transformer() -> LuminaNextDiT2DModel:
    import torch
    from diffusers import LuminaNextDiT2DModel

    transformer = LuminaNextDiT2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        hidden_size=24,
        num_layers=2,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        learn_sigma=True,
        qk_norm=True,
        cross_attention_dim=TEXT_DIM,
        scaling_factor=1.0,
    )
    # Created with torch.empty and never initialised (nor used): fill it so builds are identical.
    torch.nn.init.normal_(transformer.pad_token, std=0.02)
    return transformer



def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
