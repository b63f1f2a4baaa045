"""Tiny random-weight AuraFlow (``AuraFlowPipeline``), shaped like fal/AuraFlow-v0.3."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok
from tests.gpu_worker.families._components import save_seeded, vae

if TYPE_CHECKING:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel
    from transformers import UMT5EncoderModel

PIPELINE = "AuraFlowPipeline"

CALL_KWARGS: dict[str, Any] = {}

NOTES = (
    "AuraFlowPipeline: real classifier-free guidance. negative_prompt is used whenever "
    "guidance_scale > 1 (pipeline default 3.5; an empty negative prompt is encoded when none is "
    "given) and the transformer then runs on a doubled batch; guidance_scale <= 1 disables CFG "
    "and ignores negative_prompt. callback_on_step_end(pipe, i, t, kwargs) works (tensor inputs: "
    "latents, prompt_embeds; t is the scheduler timestep, 0..1000). The pipeline has NO "
    "interrupt support: it never reads pipe._interrupt, so setting it does nothing and every "
    "step runs; the only way to stop early is to raise from the callback (or from a progress "
    "hook), which aborts the call without images. max_sequence_length (UMT5 tokens, prompt "
    "padded to it) defaults to 256. Width and height must be multiples of vae_scale_factor*2 = "
    "16 or it raises ValueError (it does not round); height/width None means "
    "transformer.sample_size*8 (512 in this build), so always pass them. "
    "The learned position embedding is a sqrt(pos_embed_max_size)-square grid of patches "
    "(real and tiny 9216 -> 96x96 patches = 1536 px per side): larger sizes break. Real model: "
    "fal/AuraFlow(-v0.2/-v0.3), card example 1024x1024, 50 steps, guidance_scale 3.5, fp16 "
    "(torch_dtype=torch.float16); tokenizer is LlamaTokenizerFast (pile-t5), text encoder "
    "UMT5EncoderModel. Tiny build: SentencePiece-BPE byte-fallback tokenizer (pad, EOS appended), "
    "2-layer UMT5 (d_model 32), 1 MMDiT + 1 single-DiT block, 4-level 8-channel VAE."
)

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS: dict[str, tuple[int, int]] = {
    "tokenizer": (tok.SP_BPE_VOCAB_SIZE, 256),
}

_TEXT_DIM = 32


def build(path: pathlib.Path) -> None:
    """Build the tiny AuraFlow pipeline with seeded weights and save it to path."""
    save_seeded(path, _build_pipeline)


def _build_pipeline() -> AuraFlowPipeline:
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    return AuraFlowPipeline(
        tokenizer=tok.sentencepiece_bpe_tokenizer(TOKENIZERS["tokenizer"][1]),
        text_encoder=_build_text_encoder(),
        vae=vae(sample_size=1024, scaling_factor=0.13025),
        transformer=_build_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )


def _build_text_encoder() -> UMT5EncoderModel:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=tok.SP_BPE_VOCAB_SIZE,
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=3,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    return UMT5EncoderModel(config)


def _build_transformer() -> AuraFlowTransformer2DModel:
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_TEXT_DIM,  # UMT5 hidden size
        caption_projection_dim=32,  # must equal heads * head_dim
        out_channels=4,
        pos_embed_max_size=9216,
    )

