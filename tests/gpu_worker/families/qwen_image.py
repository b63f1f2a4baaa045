"""Tiny random-weight Qwen-Image (``QwenImagePipeline``) for tests.

Same component classes as Qwen/Qwen-Image (MMDiT transformer, causal 3D ``AutoencoderKLQwenImage``
with 8x spatial compression, Qwen2.5-VL text encoder, Qwen2 BPE tokenizer), shrunk to a few
hundred kilobytes. It makes noise, not pictures.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import save_seeded
from tests.gpu_worker.families._tokenizers import (
    QWEN_ENDOFTEXT,
    QWEN_IM_END,
    QWEN_IM_START,
    qwen_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

PIPELINE = "QwenImagePipeline"
CALL_KWARGS: dict[str, Any] = {}
NOTES = (
    "Real CFG only: the knob is `true_cfg_scale` (default 4.0), not `guidance_scale`; CFG runs (a"
    " second transformer pass per step) only when true_cfg_scale > 1 AND a negative prompt is "
    "given (negative_prompt is not None - even '' or ' ' counts; the model card uses ' '). "
    "Without a negative prompt it logs a warning and runs unguided; passing `guidance_scale` to "
    "this non-guidance-distilled model only logs 'ignored', so a server should map its guidance "
    "value to true_cfg_scale, pass guidance_scale=None, and send negative_prompt=' ' when the "
    "user gave none. The guided prediction is rescaled to the conditional prediction's norm. The "
    "prompt is wrapped in a chat template and the first 34 tokens (the system part) are dropped "
    "from the embeddings - our tiny tokenizer makes that prefix exactly 34 tokens too. "
    "max_sequence_length defaults to 512, must be <= 1024 (ValueError), and truncates the "
    "embeddings after the template prefix. Width/height should be multiples of 16 "
    "(vae_scale_factor 8 x 2x2 packing); other sizes only warn and are floored to a multiple of "
    "16. callback_on_step_end(pipe, i, t, kwargs) works and must return a dict; tensor inputs: "
    "latents, prompt_embeds. `pipe._interrupt = True` set inside the callback skips the remaining"
    " steps (the loop `continue`s), but the partly denoised latents are still VAE-decoded and "
    "returned; `_interrupt` is reset to False at the start of every call. Real model: ~20B MMDiT,"
    " bf16, 50 steps, true_cfg_scale 4.0 with negative_prompt ' ', 1328x1328 for 1:1 (1664x928 "
    "for 16:9, 928x1664, 1472x1104, 1104x1472, 1584x1056, 1056x1584); default size without "
    "width/height is 1024x1024."
)

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34
MAX_LENGTH = 1024 + TEMPLATE_PREFIX_TOKENS  # what the pipeline truncates to
VOCAB_SIZE = 363
# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (VOCAB_SIZE, MAX_LENGTH)}
TEXT_DIM = 16
Z_DIM = 4


def build(path: pathlib.Path) -> None:
    """Build the tiny Qwen-Image pipeline deterministically and save it to ``path``."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> QwenImagePipeline:
    from diffusers import QwenImagePipeline

    tokenizer = _tokenizer()
    return QwenImagePipeline(
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_transformer(),
    )


def _tokenizer() -> Qwen2Tokenizer:
    tokenizer = qwen_tokenizer([TEMPLATE], model_max_length=MAX_LENGTH)
    prefix = TEMPLATE.split("{}")[0]
    # The pipeline drops exactly this many leading hidden states, so the prefix must match it.
    assert len(tokenizer(prefix).input_ids) == TEMPLATE_PREFIX_TOKENS
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": TEXT_DIM,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": ids(QWEN_ENDOFTEXT),
            "eos_token_id": ids(QWEN_IM_END),
            "pad_token_id": ids(QWEN_ENDOFTEXT),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": TEXT_DIM,
            "fullatt_block_indexes": [0],
        },
        # Vision placeholders lie outside the vocabulary so no text token is taken for an image.
        image_token_id=VOCAB_SIZE + 3,
        video_token_id=VOCAB_SIZE + 4,
        vision_start_token_id=VOCAB_SIZE + 1,
        vision_end_token_id=VOCAB_SIZE + 2,
    )
    assert ids(QWEN_IM_START) < VOCAB_SIZE
    return Qwen2_5_VLForConditionalGeneration(config)


def _transformer() -> QwenImageTransformer2DModel:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=Z_DIM * 4,
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def _vae() -> AutoencoderKLQwenImage:
    from diffusers import AutoencoderKLQwenImage

    # Three downsampling levels give the real model's 8x compression (sizes in multiples of 16).
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen-Image's own scheduler settings: resolution-dependent exponential shift.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
