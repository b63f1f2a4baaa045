"""Tiny random-weight Kolors pipeline (``KolorsPipeline``).

Kolors is an SDXL-shaped UNet and VAE driven by one ChatGLM3 text encoder instead of two
CLIPs: the UNet projects the GLM states with its own ``encoder_hid_proj`` (``text_proj``) and
takes the GLM's last-token state as the pooled embedding. The ChatGLM model and tokenizer
classes ship inside diffusers; the tokenizer reads a sentencepiece model file, written here
from a hand-built proto.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import sdxl
from tests.gpu_worker.families._components import save_seeded
from tests.gpu_worker.families._tokenizers import (
    CHATGLM_LEN,
    CHATGLM_MAX_LENGTH,
    CHATGLM_VOCAB_SIZE,
    chatglm_tokenizer,
)

if TYPE_CHECKING:
    import torch
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

PIPELINE = "KolorsPipeline"
CALL_KWARGS: dict[str, Any] = {}
NOTES = (
    "KolorsPipeline: real classifier-free guidance with `guidance_scale` (on when > 1, pipeline "
    "default 5.0) and a single `negative_prompt` (no `_2` variant); Kolors sets "
    "`force_zeros_for_empty_prompt` false, so a missing negative prompt is encoded as the empty "
    "string. The prompt goes to ChatGLM3 (Chinese and English) padded on the LEFT to "
    "`max_sequence_length` (call argument, default 256, values above 256 raise ValueError; the "
    "tokenizer's model_max_length is not used). `callback_on_step_end(pipe, i, t, kwargs)` runs "
    "once per step and must return a dict; `pipe._interrupt = True` makes the loop `continue` "
    "through the remaining steps without UNet calls or callbacks, then the VAE still decodes "
    "and images are returned. Sizes: multiples of 8 (VAE factor 8); default size "
    "unet.sample_size*8 = 1024 for the real model (256 here). Real model "
    "(Kwai-Kolors/Kolors-diffusers, diffusers docs): fp16 (`variant='fp16'`, "
    "torch_dtype=float16), 1024x1024, docs example 25 steps with DPMSolverMultistep (karras) "
    "and guidance_scale 6.5; pipeline defaults 50 steps, guidance 5.0. The ChatGLM text encoder "
    "is ~6B params (~12 GB in fp16), so the whole pipeline needs far more memory than SDXL. "
    "DiffusionPipeline.from_pretrained loads the custom `ChatGLMModel`/`ChatGLMTokenizer` from "
    "diffusers itself (no trust_remote_code)."
)

GLM_DIM = 32
GLM_LAYERS = 2  # Kolors reads hidden_states[-2]
# Rounded up past the tokenizer's ids, as ChatGLM3 pads 64798+ ids to 65024 rows.
GLM_PADDED_VOCAB = 384

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {"tokenizer": (CHATGLM_LEN, CHATGLM_MAX_LENGTH)}


def build(path: pathlib.Path) -> None:
    """Build the tiny Kolors pipeline deterministically and save it to path."""
    # The tokenizer's sentencepiece file must exist until save_pretrained has copied it.
    with tempfile.TemporaryDirectory(prefix="kolors-sp-") as scratch:
        tokenizer = chatglm_tokenizer(pathlib.Path(scratch))
        save_seeded(path, lambda: build_pipeline(tokenizer))


def build_pipeline(tokenizer: ChatGLMTokenizer) -> KolorsPipeline:
    """Build the pipeline in memory (seed the RNG first)."""
    from diffusers import KolorsPipeline

    return KolorsPipeline(
        vae=sdxl.build_vae(),
        text_encoder=_build_text_encoder(),
        tokenizer=tokenizer,
        unet=sdxl.build_unet(
            cross_attention_dim=2 * GLM_DIM,
            pooled_dim=GLM_DIM,
            encoder_hid_dim=GLM_DIM,
            encoder_hid_dim_type="text_proj",
        ),
        scheduler=sdxl.build_scheduler(),
        force_zeros_for_empty_prompt=False,
    )


def _build_text_encoder() -> ChatGLMModel:
    """Build a two-layer ChatGLM3-shaped encoder (multi-query attention, RMSNorm, original RoPE)."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    assert GLM_PADDED_VOCAB >= CHATGLM_VOCAB_SIZE
    config = ChatGLMConfig(
        num_layers=GLM_LAYERS,
        padded_vocab_size=GLM_PADDED_VOCAB,
        hidden_size=GLM_DIM,
        ffn_hidden_size=64,
        kv_channels=8,
        num_attention_heads=4,
        multi_query_attention=True,
        multi_query_group_num=2,
        add_qkv_bias=True,
        seq_length=CHATGLM_MAX_LENGTH,  # rotary table length; prompts are padded to 256
        original_rope=True,
    )
    # empty_init=True (the default) would leave weights as uninitialised memory.
    model = ChatGLMModel(config, empty_init=False)
    _init_weights(model)
    return model


def _init_weights(model: torch.nn.Module) -> None:
    """Give every parameter a seeded value: ChatGLM's RMSNorm weights start as torch.empty."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and not name.endswith("bias"):
                param.fill_(1.0)  # norm scales
            elif param.ndim == 1:
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
