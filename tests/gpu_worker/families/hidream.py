"""Tiny random-weight HiDream-I1 (``HiDreamImagePipeline``), shaped like HiDream-I1-Full.

HiDreamImagePipeline does not honour width/height: it rescales every request to the area
``(128 * vae_scale_factor)**2`` (keeping the aspect ratio), see ``output_size``. This build uses
a one-level VAE (scale factor 1), so images are about 128x128 pixels in area.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import clip_text_encoder, save_seeded, t5_encoder, vae

if TYPE_CHECKING:
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

PIPELINE = "HiDreamImagePipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "HiDreamImagePipeline. SIZE: width/height are only an aspect ratio: the pipeline rescales "
    "every request to area (default_sample_size*vae_scale_factor)^2 = (128*8)^2 = 1024^2 for "
    "the real model (128^2 for this tiny build, VAE scale factor 1) and floors each side to a "
    "multiple of 2*vae_scale_factor (16 real, 2 tiny), e.g. real 768x512 -> 1248x832, tiny "
    "96x64 -> 156x104 (see output_size()). default_sample_size is hard-coded to 128 in "
    "__init__ (not in any config); a server that must honour sizes can set "
    "pipe.default_sample_size = ceil(sqrt(w*h)/vae_scale_factor) per request, which gives back "
    "w x h exactly for multiples of 2*vae_scale_factor with aspect ratio < 4 (checked here). "
    "Real classifier-free guidance whenever guidance_scale > 1 (pipeline default 5.0): "
    "negative_prompt (default '') feeds all four encoders unless negative_prompt_2/_3/_4 are "
    "given; prompt_2/_3/_4 likewise default to prompt. callback_on_step_end(pipe, i, t, "
    "kwargs) works (tensor inputs: latents, prompt_embeds_t5, prompt_embeds_llama3, "
    "pooled_prompt_embeds). Setting pipe._interrupt = True makes the loop skip the remaining "
    "steps (`continue`, no more callbacks) but the VAE still decodes and images are returned. "
    "max_sequence_length (one argument, default 128) caps all four encoders: both CLIPs are "
    "padded to min(max_sequence_length, 218) (Long-CLIP, 248 positions), T5 to "
    "min(max_sequence_length, tokenizer_3.model_max_length), Llama to min(max_sequence_length, "
    "tokenizer_4.model_max_length). Each transformer call always sees max_resolution-derived "
    "4096 image tokens (non-square latents are zero-padded to that). The transformer must be in "
    "eval mode (training mode changes the output layout and the MoE gate). Real models: "
    "HiDream-ai/HiDream-I1-Full 50 steps, guidance 5.0 (UniPC flow scheduler, shift 3.0); -Dev "
    "28 steps, guidance 0.0, -Fast 16 steps, guidance 0.0 (guidance 0 disables CFG; both "
    "flash flow-match Euler, shift 6.0 / 3.0); ~1024x1024 (listed resolutions 1024x1024, "
    "768x1360, 880x1168, 832x1248 and transposes), bf16. The official HiDream-ai repos do NOT "
    "ship text_encoder_4/tokenizer_4 (Llama-3.1-8B-Instruct, gated): from_pretrained(dir) needs "
    "them passed as kwargs (text_encoder_4=LlamaForCausalLM..., tokenizer_4=...) unless the "
    "local copy includes them, as this tiny build does. __init__ sets tokenizer_4.pad_token = "
    "eos_token. Tiny build: 2 CLIP-with-projection (hidden 32), 2-layer T5 (32), 2-layer Llama "
    "(16), 1 double + 1 single MoE block (4 experts, top 2), 4 latent channels (real 16)."
)

_CLIP_MAX_LENGTH = 248  # Long-CLIP positions, above the pipeline's hard cap of 218
_T5_MAX_LENGTH = 128
_LLAMA_MAX_LENGTH = 128
_LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS: dict[str, tuple[int, int]] = {
    "tokenizer": (tok.CLIP_VOCAB_SIZE, _CLIP_MAX_LENGTH),
    "tokenizer_2": (tok.CLIP_VOCAB_SIZE, _CLIP_MAX_LENGTH),
    "tokenizer_3": (tok.T5_VOCAB_SIZE, _T5_MAX_LENGTH),
    "tokenizer_4": (256 + len(_LLAMA_SPECIALS), _LLAMA_MAX_LENGTH),
}

_CLIP_DIM = 32
_T5_DIM = 32
_LLAMA_DIM = 16
_VAE_SCALE_FACTOR = 1
_DEFAULT_SAMPLE_SIZE = 128  # HiDreamImagePipeline.__init__ hard-codes it


def output_size(width: int, height: int) -> tuple[int, int]:
    """Return the (width, height) the tiny pipeline really produces for a request."""
    division = _VAE_SCALE_FACTOR * 2
    scale = math.sqrt((_DEFAULT_SAMPLE_SIZE * _VAE_SCALE_FACTOR) ** 2 / (width * height))
    return int(width * scale // division * division), int(height * scale // division * division)


def build(path: pathlib.Path) -> None:
    """Build the tiny HiDream-I1 pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> HiDreamImagePipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    tokenizer_4 = _build_llama_tokenizer()
    return HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        # One level (scale factor 1) keeps the forced 128^2-area output small (module docstring).
        vae=vae(levels=1, sample_size=128, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_build_clip(),
        tokenizer=tok.clip_tokenizer(_CLIP_MAX_LENGTH),
        text_encoder_2=_build_clip(),
        tokenizer_2=tok.clip_tokenizer(_CLIP_MAX_LENGTH),
        text_encoder_3=t5_encoder(d_model=_T5_DIM),
        tokenizer_3=tok.t5_tokenizer(_T5_MAX_LENGTH),
        text_encoder_4=_build_llama(tokenizer_4),
        tokenizer_4=tokenizer_4,
        transformer=_build_transformer(),
    )


def _build_clip() -> PreTrainedModel:
    return clip_text_encoder(with_projection=True, hidden_size=_CLIP_DIM,
                             max_length=_CLIP_MAX_LENGTH)


def _build_llama_tokenizer() -> PreTrainedTokenizerFast:
    bos, _, eot = _LLAMA_SPECIALS
    return tok.byte_level_tokenizer(
        specials=_LLAMA_SPECIALS,
        prefix=[bos],
        bos=bos,
        eos=eot,  # Llama-3.1-Instruct's eos_token; the pipeline pads with it
        pad=None,
        padding_side="right",
        model_max_length=_LLAMA_MAX_LENGTH,
    )


def _build_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_LLAMA_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _build_transformer() -> HiDreamImageTransformer2DModel:
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        # One head: attention over the ~4500 tokens of every call is nearly all the CPU time.
        num_attention_heads=1,
        caption_channels=[_T5_DIM, _LLAMA_DIM],
        text_emb_dim=2 * _CLIP_DIM,  # both CLIP projections, concatenated
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),  # sums to attention_head_dim
        # Latent area is always 128^2 (see output_size), i.e. at most 64x64 = 4096 patches.
        max_resolution=(128, 128),
        llama_layers=[0, 1],  # one Llama hidden state per block (1 double + 1 single)
    )

