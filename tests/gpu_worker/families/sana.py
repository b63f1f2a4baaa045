"""Tiny random-weight Sana pipeline (Gemma 2 encoder, linear DiT, 32x DC-AE, flow DPM-Solver)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import save_seeded
from tests.gpu_worker.families._tokenizers import GEMMA_VOCAB_SIZE, gemma_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Model

PIPELINE = "SanaPipeline"

TOKENIZER_VOCAB_SIZE = GEMMA_VOCAB_SIZE
# The complex human instruction alone is ~1000 character tokens; leave room for it plus 300.
TOKENIZER_MAX_LENGTH = 2048
TEXT_DIM = 16

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (TOKENIZER_VOCAB_SIZE, TOKENIZER_MAX_LENGTH)}

# sample_size 32 selects the 1024px bins, which would run the tiny model at ~1 megapixel.
CALL_KWARGS: dict[str, Any] = {"use_resolution_binning": False}

NOTES = (
    "SanaPipeline does real classifier-free guidance (on when guidance_scale > 1; default 4.5) "
    "and takes negative_prompt (default \"\"; None crashes with AttributeError, pass \"\"). It "
    "supports callback_on_step_end(pipe, i, t, kwargs) (tensor inputs: latents, prompt_embeds, "
    "negative_prompt_embeds; must return the dict) and the interrupt property: setting "
    "pipe._interrupt = True inside the callback makes every remaining step `continue` without "
    "running the transformer, but the loop still iterates and the partly denoised latents are "
    "STILL VAE-decoded and returned as a normal result (so a cancelling server must discard that "
    "output, or raise from the callback instead, which propagates cleanly). height/width must be "
    "multiples of 32 (ValueError otherwise), checked after binning; they default to 1024 and an "
    "explicit None raises TypeError, so omit them or pass ints. use_resolution_binning (default "
    "True) picks the aspect-ratio table from transformer sample_size (128->4096px bins, 64->2048, "
    "32->1024, 16->512, else 'Invalid sample size'), generates at the nearest bucket and "
    "resizes/center-crops back to the requested size; the tiny build (sample_size 32) passes "
    "False so it runs at the requested size. Prompts are prefixed with complex_human_instruction "
    "(a long default 'enhance the prompt' instruction, only for the positive prompt) and the "
    "Gemma embeddings are cut to [bos] + the last max_sequence_length-1 tokens "
    "(max_sequence_length default 300); pass complex_human_instruction=None to disable. Text goes "
    "through Gemma-2-2B (Gemma2Model); tokenizer padding_side is forced to right. Real model "
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers: 1024x1024, 20 steps, guidance 4.5, "
    "DPMSolverMultistepScheduler(flow_prediction, use_flow_sigmas, flow_shift 3.0), recommended "
    "dtype float16 (variant fp16); the _BF16_ and 4K/2K checkpoints want bfloat16. VAE is the 32x "
    "DC-AE."
)


def build(path: pathlib.Path) -> None:
    """Build the tiny Sana pipeline with fixed weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> SanaPipeline:
    from diffusers import SanaPipeline

    return SanaPipeline(
        tokenizer=gemma_tokenizer(model_max_length=TOKENIZER_MAX_LENGTH),
        text_encoder=gemma2_text_encoder(),
        vae=dc_autoencoder(),
        transformer=sana_transformer(),
        scheduler=_scheduler(),
    )


def gemma2_text_encoder() -> Gemma2Model:
    """Build a one-layer Gemma 2 decoder stack (no LM head), as Sana uses."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=8192,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma2Model(config)


def dc_autoencoder() -> AutoencoderDC:
    """Build a six-level DC-AE (32x down-sampling like the real one) with 8 channels per level."""
    from diffusers import AutoencoderDC

    levels = 6
    block_types = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    multiscales = ((),) * 3 + ((5,),) * 3
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=block_types,
        decoder_block_types=block_types,
        encoder_block_out_channels=(8,) * levels,
        decoder_block_out_channels=(8,) * levels,
        encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales,
        encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def sana_transformer(**overrides: Any) -> SanaTransformer2DModel:
    """Build a one-block Sana DiT (diffusers' fast-test sizes) reading the tiny Gemma's states."""
    from diffusers import SanaTransformer2DModel

    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 4,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 4,
        "cross_attention_dim": 8,
        "caption_channels": TEXT_DIM,
        # The real 1024px models: no positional embedding, 1024px bins.
        "sample_size": 32,
    }
    return SanaTransformer2DModel(**(config | overrides))


def _scheduler() -> DPMSolverMultistepScheduler:
    """Build the flow-matching DPM-Solver++ the Sana conversion script ships."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
