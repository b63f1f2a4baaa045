"""Tiny random-weight Sana Sprint pipeline (Sana plus guidance embedding and the SCM scheduler)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import save_seeded
from tests.gpu_worker.families._tokenizers import gemma_tokenizer
from tests.gpu_worker.families.sana import (
    TOKENIZER_MAX_LENGTH,
    TOKENIZER_VOCAB_SIZE,
    dc_autoencoder,
    gemma2_text_encoder,
    sana_transformer,
)

if TYPE_CHECKING:
    from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

PIPELINE = "SanaSprintPipeline"

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (TOKENIZER_VOCAB_SIZE, TOKENIZER_MAX_LENGTH)}

# sample_size 32 selects the 1024px bins, which would run the tiny model at ~1 megapixel.
CALL_KWARGS: dict[str, Any] = {"use_resolution_binning": False}

NOTES = (
    "SanaSprintPipeline (aliases sana-sprint, sana-sprint-small: Sana_Sprint_1.6B / 0.6B) is "
    "timestep-distilled: __call__ has NO negative_prompt parameter (passing one raises TypeError) "
    "and no CFG; guidance_scale (default 4.5) is an embedded guidance value fed to the "
    "transformer (scaled by guidance_embeds_scale 0.1), so the batch never doubles. Steps: "
    "default num_inference_steps=2 (1-4 intended); intermediate_timesteps defaults to 1.3 and the "
    "pipeline raises ValueError('Intermediate timesteps for SCM is not supported when "
    "num_inference_steps != 2') for any other step count unless the caller passes "
    "intermediate_timesteps=None; max_timesteps defaults to 1.5708 (pi/2). Supports "
    "callback_on_step_end (tensor inputs: latents, prompt_embeds) and the interrupt property: "
    "pipe._interrupt = True skips the remaining steps but the result is still decoded from the "
    "last step's `denoised` estimate and returned normally; note the output comes from "
    "`denoised`, so a callback that edits latents on the last step has no effect. height/width "
    "must be multiples of 32 (default 1024; an explicit None raises TypeError). "
    "use_resolution_binning (default True) works only for transformer sample_size 32 (1024px "
    "bins; any other sample_size raises 'Invalid sample size') and resizes/crops back to the "
    "requested size; the tiny build passes False. Same Gemma-2 text path as Sana "
    "(complex_human_instruction prefix by default, max_sequence_length 300). Real models "
    "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers and _0.6B_: 1024x1024, 2 steps, "
    "guidance 4.5, SCMScheduler, bf16 (text encoder must stay bf16, VAE bf16 or fp32)."
)


def build(path: pathlib.Path) -> None:
    """Build the tiny Sana Sprint pipeline with fixed weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> SanaSprintPipeline:
    from diffusers import SanaSprintPipeline

    return SanaSprintPipeline(
        tokenizer=gemma_tokenizer(model_max_length=TOKENIZER_MAX_LENGTH),
        text_encoder=gemma2_text_encoder(),
        vae=dc_autoencoder(),
        transformer=_transformer(),
        scheduler=_scheduler(),
    )


def _transformer() -> SanaTransformer2DModel:
    """Build the Sana DiT with Sprint's guidance embedding and RMS q/k norm."""
    return sana_transformer(guidance_embeds=True, qk_norm="rms_norm_across_heads")


def _scheduler() -> SCMScheduler:
    from diffusers import SCMScheduler

    return SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
