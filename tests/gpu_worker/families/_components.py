"""Model parts several tiny family pipelines share: the seeded build, a tiny VAE, text encoders.

Only shapes that really are the same across families live here; each family module still
spells out what makes it that family (its transformer, its scheduler, its quirks).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families import _tokenizers as tok

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import PreTrainedModel

SEED = 0


def save_seeded(path: pathlib.Path, build_pipeline: Callable[[], DiffusionPipeline]) -> None:
    """Build a pipeline with seeded weights, put every module in eval mode, save it to path."""
    import torch

    # Fork the RNG so building does not disturb the caller's torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        pipe = build_pipeline()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.save_pretrained(path)


def vae_config(*, levels: int = 4, **config: Any) -> dict[str, Any]:
    """Return a tiny AutoencoderKL config: 8 channels a level, no mid-block attention.

    Four levels give the real scale factor 8, so the server sees the real size multiples.
    Full attention over a 128x128 latent would dominate a 1024px decode on CPU, hence none.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": (8,) * levels,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
        **config,
    }


def vae(**config: Any) -> AutoencoderKL:
    """Build a tiny AutoencoderKL (see ``vae_config``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(**config))


def flux_vae(**config: Any) -> AutoencoderKL:
    """Build a tiny FLUX.1-style VAE: no quant convs, FLUX's scale and shift."""
    return vae(**{"sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False,
                  "shift_factor": 0.1159, "scaling_factor": 0.3611, **config})


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Build FLUX.1-dev's flow-matching scheduler with resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def clip_text_encoder(*, with_projection: bool, hidden_size: int = 32,
                      max_length: int = tok.CLIP_MAX_LENGTH,
                      hidden_act: str = "quick_gelu") -> PreTrainedModel:
    """Build a two-layer CLIP text encoder sized to ``tok.clip_tokenizer()``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tok.CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        hidden_act=hidden_act,
        # Pooling finds EOS by id: the ids must be the tokenizer's.
        bos_token_id=tok.CLIP_BOS_ID,
        eos_token_id=tok.CLIP_EOS_ID,
        pad_token_id=tok.CLIP_EOS_ID,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def t5_encoder(d_model: int = 32) -> PreTrainedModel:
    """Build a two-layer T5 v1.1-style (gated-GELU) encoder sized to ``tok.t5_tokenizer()``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=tok.T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)
