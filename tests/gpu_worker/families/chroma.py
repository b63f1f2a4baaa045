"""Tiny random-weight Chroma (``ChromaPipeline``): FLUX.1-schnell-derived, T5 only, real CFG."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import (
    flux_scheduler,
    flux_vae,
    save_seeded,
    t5_encoder,
)

if TYPE_CHECKING:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

PIPELINE = "ChromaPipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "ChromaPipeline: one T5 text encoder, no CLIP, no prompt_2. Real classifier-free guidance: "
    "guidance_scale > 1 runs the transformer twice per step (cond and uncond) and uses "
    "negative_prompt (default \"\" when none is given); guidance_scale <= 1 skips it and ignores "
    "negative_prompt. No guidance embedding, no true_cfg_scale. The T5 attention mask is used "
    "and all padding but the first pad token is masked in the transformer. "
    "callback_on_step_end(pipe, i, t, kwargs) works (tensor inputs: latents, prompt_embeds); "
    "pipe._interrupt = True skips the remaining steps (`if self.interrupt: continue`) but the "
    "VAE still decodes and images are returned. max_sequence_length defaults to 512 (> 512 "
    "raises ValueError). Width/height must be multiples of vae_scale_factor*2 = 16; others are "
    "floored with a warning. Real model (lodestones/Chroma1-HD): 1024x1024 default, bf16; "
    "pipeline defaults 35 steps, guidance_scale 5.0; the diffusers docs example uses 40 steps, "
    "guidance_scale 3.0 and a negative prompt. Tiny build: 4 latent channels (real 16), 1 double"
    " + 1 single block, a 1-layer distilled guidance approximator."
)

_TEXT_DIM = 32

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (tok.T5_VOCAB_SIZE, tok.T5_MAX_LENGTH)}


def build(path: pathlib.Path) -> None:
    """Build the tiny Chroma pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> ChromaPipeline:
    from diffusers import ChromaPipeline

    return ChromaPipeline(
        scheduler=flux_scheduler(),
        vae=flux_vae(),
        text_encoder=t5_encoder(d_model=_TEXT_DIM),
        tokenizer=tok.t5_tokenizer(),
        transformer=_build_transformer(),
    )


def _build_transformer() -> ChromaTransformer2DModel:
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # 2x2-packed latents of the 4-channel VAE
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM,  # T5 hidden size
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
