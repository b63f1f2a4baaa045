"""Tiny random-weight CogView4 (``CogView4Pipeline``), shaped like THUDM/CogView4-6B."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import save_seeded, vae

if TYPE_CHECKING:
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel
    from transformers import GlmModel, PreTrainedTokenizerFast

PIPELINE = "CogView4Pipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "CogView4Pipeline: real classifier-free guidance, run as two transformer passes (cond, "
    "uncond) per step, whenever guidance_scale > 1 (pipeline default 5.0); negative_prompt "
    "(default '') is used then and must match prompt's type and batch size (str with str). "
    "callback_on_step_end(pipe, i, t, kwargs) works, but its third argument is the scheduler "
    "SIGMA (0..1), not a timestep; tensor inputs: latents, prompt_embeds, "
    "negative_prompt_embeds. Setting pipe._interrupt = True in the callback makes the loop "
    "skip the remaining steps (`if self.interrupt: continue`, no more callbacks) but the VAE "
    "still decodes and images are returned. max_sequence_length (GLM tokens) defaults to 1024; "
    "prompts are padded only to the longest prompt, then left-padded up to a multiple of 16, so "
    "short prompts stay cheap. The pipeline only checks width/height % 16 (ValueError, no "
    "rounding); the model card requires multiples of 32 within 512..2048 and H*W <= 2^21, so a "
    "server should round to 32 for the real model (the tiny build accepts 16). height/width "
    "None means transformer.sample_size*8 = 1024. Real model: THUDM (zai-org)/CogView4-6B, "
    "1024x1024, 50 steps, card example guidance_scale 3.5, bf16 only (BF16 or FP32 per the "
    "card); text encoder GlmModel (glm-4-9b), tokenizer PreTrainedTokenizerFast, left padding. "
    "Tiny build: byte-level BPE tokenizer prepending [gMASK]<sop> like GLM-4, 2-layer GlmModel "
    "(hidden 32), 2-layer transformer with 4 latent channels (real 16), 4-level VAE."
)

_PAD = "<|endoftext|>"
_SPECIALS = [_PAD, "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS: dict[str, tuple[int, int]] = {
    "tokenizer": (256 + len(_SPECIALS), 1024),
}

_TEXT_DIM = 32


def build(path: pathlib.Path) -> None:
    """Build the tiny CogView4 pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> CogView4Pipeline:
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    tokenizer = _build_tokenizer()
    return CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=_build_text_encoder(len(tokenizer), tokenizer.pad_token_id),
        vae=vae(sample_size=1024, scaling_factor=1.0),
        transformer=_build_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_shift=0.25,
            max_shift=0.75,
            base_image_seq_len=256,
            use_dynamic_shifting=True,
            time_shift_type="linear",
        ),
    )


def _build_tokenizer() -> PreTrainedTokenizerFast:
    return tok.byte_level_tokenizer(
        specials=_SPECIALS,
        prefix=["[gMASK]", "<sop>"],
        eos=_PAD,
        pad=_PAD,
        padding_side="left",
        model_max_length=TOKENIZERS["tokenizer"][1],
    )


def _build_text_encoder(vocab_size: int, pad_token_id: int) -> GlmModel:
    from transformers import GlmConfig, GlmModel

    config = GlmConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=pad_token_id,
        eos_token_id=pad_token_id,
    )
    return GlmModel(config)


def _build_transformer() -> CogView4Transformer2DModel:
    from diffusers import CogView4Transformer2DModel

    return CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        text_embed_dim=_TEXT_DIM,  # GLM hidden size
        time_embed_dim=16,
        condition_dim=8,
        sample_size=128,
    )

