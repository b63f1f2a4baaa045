"""Tiny random-weight PixArt-Σ pipeline (T5 encoder, PixArt DiT, 8x VAE, DPM-Solver++)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import save_seeded, t5_encoder, vae
from tests.gpu_worker.families._tokenizers import T5_VOCAB_SIZE, t5_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

PIPELINE = "PixArtSigmaPipeline"

TOKENIZER_VOCAB_SIZE = T5_VOCAB_SIZE
TOKENIZER_MAX_LENGTH = 300  # the pipeline's default max_sequence_length
TEXT_DIM = 32

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (TOKENIZER_VOCAB_SIZE, TOKENIZER_MAX_LENGTH)}

# The tiny transformer's sample_size (8) has no aspect-ratio bin table: binning raises.
CALL_KWARGS: dict[str, Any] = {"use_resolution_binning": False}

NOTES = (
    "PixArtSigmaPipeline does real classifier-free guidance (CFG on when guidance_scale > 1, so "
    "the batch doubles) and takes negative_prompt (default \"\"; pass \"\" for none: None crashes "
    "with AttributeError); guidance parameter is guidance_scale (default 4.5). It has NO "
    "callback_on_step_end and NO interrupt property: __call__ ends in **kwargs, so a "
    "callback_on_step_end argument is swallowed silently (never called, no error) and setting "
    "pipe._interrupt does nothing. Progress must use the legacy callback(step, timestep, latents) "
    "with callback_steps=1 (must be a positive int); to cancel, raise from that callback: the "
    "exception propagates out of __call__ right after that step, no VAE decode happens, and the "
    "next call is unaffected (set_timesteps resets the scheduler; same seed gives identical "
    "bytes). Only maybe_free_model_hooks() is skipped, which matters only with CPU offload. "
    "Prompts go through T5 with max_sequence_length (default 300) tokens padded to max_length; "
    "clean_caption defaults to True and needs bs4+ftfy, otherwise every call logs warnings "
    "and just lower-cases/strips the prompt (pass clean_caption=False to silence). height/width: "
    "check_inputs only demands multiples of 8, but with patch size 2 anything not a multiple of "
    "16 crashes inside the transformer (RuntimeError: size mismatch), so use multiples of 16; "
    "None means transformer sample_size*8 (1024 for the real model). use_resolution_binning "
    "(default True) maps the request to the nearest trained aspect-ratio bucket by transformer "
    "sample_size (256->2048 bins, 128->1024, 64->512, 32->256; any other sample_size raises "
    "'Invalid sample size'), generates there, then resizes and center-crops back to the requested "
    "size; the tiny build must pass use_resolution_binning=False. Real model "
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: 1024x1024 default, 20 steps, guidance 4.5, "
    "DPMSolverMultistepScheduler, fp16 (the T5-XXL text encoder alone is ~9.5 GB in fp16)."
)


def build(path: pathlib.Path) -> None:
    """Build the tiny PixArt-Σ pipeline with fixed weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> PixArtSigmaPipeline:
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(TOKENIZER_MAX_LENGTH),
        text_encoder=t5_encoder(TEXT_DIM),
        vae=vae(sample_size=64),
        transformer=_transformer(),
        scheduler=_scheduler(),
    )


def _transformer() -> PixArtTransformer2DModel:
    """Build a two-block PixArt DiT (diffusers' fast-test config) with a learned-sigma output."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=TEXT_DIM,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        # Sigma passes no resolution/aspect-ratio micro-conditions.
        use_additional_conditions=False,
    )


def _scheduler() -> DPMSolverMultistepScheduler:
    """Build the DPM-Solver++ scheduler PixArt-Σ ships with."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        solver_order=2,
        algorithm_type="dpmsolver++",
    )
