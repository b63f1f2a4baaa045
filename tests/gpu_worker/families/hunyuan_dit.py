"""Tiny random-weight HunyuanDiT pipeline (BERT + mT5 encoders, 8x VAE, DDPM v-prediction)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import save_seeded, t5_encoder, vae
from tests.gpu_worker.families._tokenizers import (
    BERT_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    bert_tokenizer,
    t5_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertModel

PIPELINE = "HunyuanDiTPipeline"

# The pipeline hard-codes these prompt lengths (77 for BERT, 256 for mT5) in __call__.
BERT_MAX_LENGTH = 77
T5_MAX_LENGTH = 256
BERT_DIM = 32
T5_DIM = 32

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {
    "tokenizer": (BERT_VOCAB_SIZE, BERT_MAX_LENGTH),
    "tokenizer_2": (T5_VOCAB_SIZE, T5_MAX_LENGTH),
}

# With binning on, any size outside SUPPORTED_SHAPE is replaced by a >=768px standard shape.
CALL_KWARGS: dict[str, Any] = {"use_resolution_binning": False}

NOTES = (
    "HunyuanDiTPipeline does real classifier-free guidance (on when guidance_scale > 1; default "
    "5.0) plus optional guidance_rescale, and takes negative_prompt (None -> \"\"; it must be the "
    "same type as prompt, str with str or list with list, else TypeError). Supports "
    "callback_on_step_end (tensor inputs: latents, prompt_embeds, negative_prompt_embeds, "
    "prompt_embeds_2, negative_prompt_embeds_2) and the interrupt property: pipe._interrupt = "
    "True skips the remaining transformer calls but the partly denoised latents are still "
    "VAE-decoded and returned normally. Two text encoders: BERT (bilingual CLIP text tower, 77 "
    "tokens) and mT5-XL (256 tokens); both lengths are hard-coded in __call__, there is no "
    "max_sequence_length argument. height/width are silently floored to multiples of 16 (default "
    "sample_size*8 = 1024). With use_resolution_binning=True (default) any (height, width) not in "
    "SUPPORTED_SHAPE = [(1024, 1024), (1280, 1280), (1024, 768), (1152, 864), (1280, 960), (768, "
    "1024), (864, 1152), (960, 1280), (1280, 768), (768, 1280)] (symmetric, so orientation does "
    "not matter) is replaced by the closest standard shape by aspect ratio (1:1, 4:3, 3:4, 16:9, "
    "9:16) then area, and the image is returned at THAT size (not resized back, only a warning is "
    "logged), so a server must either request a supported shape or pass "
    "use_resolution_binning=False; the tiny build passes False and then works at any multiple of "
    "16 (96x64 and 64x64 included). RoPE grid uses a hard-coded /8, so the VAE must be 8x. "
    "original_size (default (1024, 1024)), target_size and crops_coords_top_left feed size "
    "conditioning only when the transformer has use_style_cond_and_image_meta_size (v1.1: yes; "
    "v1.2: no). DDPMScheduler step draws variance noise from the generator. Real model "
    "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers (also -Distilled): 1024x1024, 50 steps (pipeline "
    "default), guidance 5.0, DDPM v_prediction, fp16; safety_checker/feature_extractor are None."
)


def build(path: pathlib.Path) -> None:
    """Build the tiny HunyuanDiT pipeline with fixed weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> HunyuanDiTPipeline:
    from diffusers import HunyuanDiTPipeline

    return HunyuanDiTPipeline(
        vae=vae(sample_size=64, scaling_factor=0.13025),
        text_encoder=_bert(),
        tokenizer=bert_tokenizer(BERT_MAX_LENGTH),
        transformer=_transformer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=t5_encoder(T5_DIM),
        tokenizer_2=t5_tokenizer(T5_MAX_LENGTH),
    )


def _bert() -> BertModel:
    """Build a two-layer BERT sized to the character WordPiece vocabulary."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=BERT_VOCAB_SIZE,
        hidden_size=BERT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return BertModel(config)


def _transformer() -> HunyuanDiT2DModel:
    """Build a two-block HunyuanDiT (fast-test sizes) without size/style cond, like v1.2."""
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        cross_attention_dim=BERT_DIM,
        cross_attention_dim_t5=T5_DIM,
        pooled_projection_dim=16,
        hidden_size=24,
        activation_fn="gelu-approximate",
        text_len=BERT_MAX_LENGTH,
        text_len_t5=T5_MAX_LENGTH,
        use_style_cond_and_image_meta_size=False,
    )


def _scheduler() -> DDPMScheduler:
    """Build HunyuanDiT v1.2's DDPM v-prediction scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.018,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        variance_type="fixed_small",
        clip_sample=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
