"""Built-in miniature ``tiny`` text-to-image model.

``tiny`` is a Stable-Diffusion-shaped pipeline (UNet, VAE, CLIP text encoder,
byte-level CLIP tokenizer, Euler scheduler) with random weights: it makes noise,
not pictures. It exists for tests and for machines without a GPU, so it is
built locally and never fetched from the Hugging Face hub.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

TINY_VERSION = 1
TINY_DEFAULT_SIZE = (256, 256)  # the registry's default size for "tiny" (gpu_worker/models.py)

TINY_MAX_LENGTH = 77
TINY_VOCAB_SIZE = 2 * 256 + 2  # every byte, alone and word-final, plus BOS/EOS
TINY_TEXT_DIM = 32
TINY_SEED = 0

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def default_cache_dir() -> pathlib.Path:
    """Return the cache directory from DC_CACHE_DIR or the per-user default."""
    env = os.environ.get("DC_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/diffusion-cluster").expanduser()


def ensure_tiny_pipeline(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Build the tiny pipeline once under cache_dir and return its directory."""
    parent = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = parent / f"tiny-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    try:
        build_tiny_pipeline().save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its build into place first; keep theirs.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """Build the tiny pipeline in memory with weights seeded identically everywhere."""
    import torch
    from diffusers import StableDiffusionPipeline

    # Fork the RNG so building does not disturb the caller's torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        pipe = StableDiffusionPipeline(
            vae=_build_vae(),
            text_encoder=_build_text_encoder(),
            tokenizer=_build_tokenizer(),
            unet=_build_unet(),
            scheduler=build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval()
    return pipe


def byte_symbols() -> list[str]:
    """Return the 256 printable symbols GPT-2/CLIP byte-level BPE uses for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _build_tokenizer() -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer with no merges, so any text tokenizes."""
    from transformers import CLIPTokenizer

    # Every byte alone and word-final: any word splits into known symbols, never unk.
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_MAX_LENGTH)


def _build_text_encoder() -> CLIPTextModel:
    """Build a two-layer CLIP text encoder sized to the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = TINY_VOCAB_SIZE
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def _build_unet() -> UNet2DConditionModel:
    """Build a two-level UNet with cross-attention only at the coarser level."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_DEFAULT_SIZE[0] // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
    )


def _build_vae() -> AutoencoderKL:
    """Build a VAE with four levels (scale factor 8) and no mid-block attention."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_DEFAULT_SIZE[0],
        # Full attention over a 64x64 latent would dominate 512px decode time.
        mid_block_add_attention=False,
    )


def build_scheduler() -> EulerDiscreteScheduler:
    """Build a deterministic Euler scheduler with Stable Diffusion 1.x betas."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
