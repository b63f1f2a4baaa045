"""Tiny random-weight Stable Cascade pipeline (``StableCascadeCombinedPipeline``).

Stable Cascade is two diffusion stages: the prior (stage C) turns the prompt into a tiny
16-channel "image embedding" at 1/42.67 of the image size, and the decoder (stage B) turns
that into 4-channel VQ latents at 1/4 of the image size, which the Paella VQGAN (stage A)
decodes. This module saves both stages as one combined pipeline in one directory, so the
worker's ``DiffusionPipeline.from_pretrained(dir)`` loads it like any other family.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from tests.gpu_worker.families._components import clip_text_encoder, save_seeded
from tests.gpu_worker.families._tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableCascadeCombinedPipeline, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import PreTrainedModel

PIPELINE = "StableCascadeCombinedPipeline"
# num_inference_steps only sets the decoder's steps; the prior's default is 60.
CALL_KWARGS: dict[str, Any] = {"prior_num_inference_steps": 2}
# Output side = 4 * int(10.67 * ceil(side / 42.67)): exact only for multiples of 128.
SIZE_MULTIPLE = 128
NOTES = (
    "StableCascadeCombinedPipeline (deprecated in diffusers: warns on construction, no fixes "
    "after 0.35.2). LOADING: no hub repo holds a combined pipeline. "
    "stabilityai/stable-cascade-prior is a StableCascadePriorPipeline; "
    "stabilityai/stable-cascade's model_index is a StableCascadeDecoderPipeline and its README "
    "front matter says `prior: [stabilityai/stable-cascade-prior]`, which only "
    "StableCascadeCombinedPipeline.from_pretrained(<hub id>) follows (`_load_connected_pipes`, "
    "resolved by hub id, so hub or HF cache only); DiffusionPipeline.from_pretrained(<decoder "
    "dir>) gives the decoder alone, which needs image_embeddings. So a server should fetch BOTH "
    "repos and load them as two directories: "
    "StableCascadePriorPipeline.from_pretrained(prior_dir, variant='bf16', "
    "torch_dtype=torch.bfloat16), and the decoder's components one by one (StableCascadeUNet "
    "subfolder='decoder', PaellaVQModel subfolder='vqgan' from "
    "diffusers.pipelines.deprecated.wuerstchen, CLIPTextModelWithProjection, CLIPTokenizer, "
    "DDPMWuerstchenScheduler), then StableCascadeCombinedPipeline(decoder=..., vqgan=..., "
    "text_encoder=..., tokenizer=..., scheduler=..., **{'prior_' + k: v for k, v in "
    "prior.components.items()}); tested on the tiny build: same images as the one-directory "
    "load. Why not the decoder's from_pretrained: in diffusers 0.42 PaellaVQModel is no longer "
    "exported from `diffusers`, so a model_index naming it ['wuerstchen', ...] (what older "
    "diffusers wrote) or ['diffusers', ...] (what 0.42 writes) fails to load even with vqgan= "
    "passed; this tiny build stores the class's full module path instead, so "
    "DiffusionPipeline.from_pretrained(dir) works on the one directory. CALL: "
    "`num_inference_steps` is the DECODER's steps (default 12; docs use 10); "
    "`prior_num_inference_steps` the prior's (default 60; docs use 20); there is no "
    "`guidance_scale` (passing it raises TypeError): use `prior_guidance_scale` (real CFG, "
    "default 4.0) and `decoder_guidance_scale` (default 0.0, off). `negative_prompt` works "
    "(prior CFG; the decoder reuses the prior's prompt embeddings, so the decoder's own text "
    "encoder is loaded but never run). CALLBACKS: `callback_on_step_end` runs only for decoder "
    "steps (i = 0..num_inference_steps-1, first argument is the inner "
    "StableCascadeDecoderPipeline, not the combined one); prior steps go to "
    "`prior_callback_on_step_end` (first argument the inner StableCascadePriorPipeline); total "
    "progress = prior + decoder steps. Neither stage checks `_interrupt`: setting it does "
    "nothing; raising an exception from either callback aborts the call. Prompt truncated to "
    "CLIP's 77 tokens (no max_sequence_length). SIZE: output side = 4 * int(10.67 * ceil(side / "
    "42.67)): exact for multiples of 128 (default 1024x1024); other sizes silently grow (1000 "
    "-> 1024) or crash in the decoder's PixelUnshuffle (96x64), so restrict to multiples of "
    "128. DTYPE: prior bf16 only (fp16 unsupported per the diffusers docs); decoder bf16 (torch "
    ">= 2.2) or fp16; docs example 1024x1024, prior 20 steps at guidance 4.0, decoder 10 steps "
    "at guidance 0.0."
)

TEXT_DIM = 32
COND_DIM = 32
PRIOR_CHANNELS = 16  # stage C latent channels, fixed by the decoder's effnet input

# Tokenizer component -> (len(tokenizer), model_max_length), for tests.
TOKENIZERS = {
    "tokenizer": (CLIP_VOCAB_SIZE, CLIP_MAX_LENGTH),
    "prior_tokenizer": (CLIP_VOCAB_SIZE, CLIP_MAX_LENGTH),
}


def build(path: pathlib.Path) -> None:
    """Build the tiny Stable Cascade pipeline deterministically and save it to path."""
    save_seeded(path, build_pipeline)


def build_pipeline() -> StableCascadeCombinedPipeline:
    """Build the combined pipeline in memory (seed the RNG first)."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline

    pipe = StableCascadeCombinedPipeline(
        tokenizer=clip_tokenizer(),
        text_encoder=_build_text_encoder(),
        decoder=_build_decoder(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=_build_vqgan(),
        prior_prior=_build_prior(),
        prior_text_encoder=_build_text_encoder(),
        prior_tokenizer=clip_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    # PaellaVQModel moved to diffusers.pipelines.deprecated; `diffusers` no longer exports it, yet
    # save_pretrained records ["diffusers", "PaellaVQModel"], which from_pretrained cannot resolve.
    # The full module path resolves: importing the combined pipeline put it in sys.modules.
    pipe.register_to_config(vqgan=(type(pipe.vqgan).__module__, type(pipe.vqgan).__name__))
    return pipe


def _build_text_encoder() -> PreTrainedModel:
    return clip_text_encoder(with_projection=True, hidden_size=TEXT_DIM, hidden_act="gelu")


def _build_prior() -> StableCascadeUNet:
    """Build stage C: no resolution switches, so any (tiny) latent size works."""
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=PRIOR_CHANNELS,
        out_channels=PRIOR_CHANNELS,
        conditioning_dim=COND_DIM,
        block_out_channels=(32, 32),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        clip_text_in_channels=TEXT_DIM,
        clip_text_pooled_in_channels=TEXT_DIM,
        # The prior always gets a (zero) CLIP image embedding of this width when no image is given.
        clip_image_in_channels=TEXT_DIM,
        switch_level=(False,),
    )


def _build_decoder() -> StableCascadeUNet:
    """Build stage B, conditioned on the prior's embedding (effnet) and pooled text embedding."""
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        conditioning_dim=COND_DIM,
        block_out_channels=(16, 32),
        num_attention_heads=(-1, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        block_types_per_layer=(
            ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
            ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ),
        clip_text_pooled_in_channels=TEXT_DIM,
        effnet_in_channels=PRIOR_CHANNELS,
        pixel_mapper_in_channels=3,
        patch_size=4,  # as stage B: the decoder latent must then be a multiple of 4
        timestep_conditioning_type=("sca",),
        switch_level=None,
    )


def _build_vqgan() -> PaellaVQModel:
    """Build stage A with the real model's 4x factor (up_down_scale_factor 2, two levels)."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    return PaellaVQModel(
        up_down_scale_factor=2,
        levels=2,
        bottleneck_blocks=1,
        embed_dim=16,
        latent_channels=4,
        num_vq_embeddings=16,
    )
