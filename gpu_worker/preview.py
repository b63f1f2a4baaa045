"""Cheap previews of images still being denoised, made from the latents without the VAE.

A linear map of the latent channels to RGB: Stable Diffusion's known factors for 4-channel
latents, the first three channels otherwise, each image stretched to the full colour range.
It costs microseconds where a VAE decode costs as much as a denoising step, and it shows the
composition taking shape, which is what a preview is for.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

PREVIEW_LONG_SIDE = 256

# Stable Diffusion 1.x latent -> RGB (the community's standard approximation; SDXL's is close).
_SD_FACTORS = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])


def preview_steps(total: int, count: int) -> set[int]:
    """Evenly spaced steps (1-based, before the last) at which to send ``count`` previews."""
    if count <= 0 or total <= 1:
        return set()
    return {max(1, round(total * k / (count + 1))) for k in range(1, count + 1)} - {total}


def latents_to_images(latents: Any, pipe: Any, width: int, height: int) -> list[Image.Image]:
    """One small RGB preview per image in the batch; [] when the latents cannot be read."""
    spatial = _spatial(latents, pipe, width, height)
    if spatial is None:
        return []
    rgb = _to_rgb(spatial.float().cpu())
    return [_to_image(img, width, height) for img in rgb]


def _spatial(latents: Any, pipe: Any, width: int, height: int) -> torch.Tensor | None:
    """Latents as (batch, channels, h, w), unpacking the token layouts of DiT pipelines."""
    if not isinstance(latents, torch.Tensor):
        return None
    if latents.ndim == 3:  # packed (batch, tokens, channels): FLUX, Chroma, Qwen-Image
        unpack = getattr(pipe, "_unpack_latents", None)
        if unpack is None:
            return None
        try:
            latents = unpack(latents, height, width, pipe.vae_scale_factor)
        except Exception:  # a signature we do not know: no preview rather than no image
            return None
    if latents.ndim == 5:  # (batch, channels, frames, h, w) with one frame
        latents = latents[:, :, 0]
    return latents if latents.ndim == 4 else None


def _to_rgb(latents: torch.Tensor) -> torch.Tensor:
    channels = latents.shape[1]
    if channels == 4:
        rgb = torch.einsum("bchw,cr->brhw", latents, _SD_FACTORS)
    elif channels >= 3:
        rgb = latents[:, :3]
    else:
        rgb = latents[:, :1].expand(-1, 3, -1, -1)
    low = rgb.amin(dim=(1, 2, 3), keepdim=True)
    high = rgb.amax(dim=(1, 2, 3), keepdim=True)
    return ((rgb - low) / (high - low).clamp(min=1e-6) * 255).round().to(torch.uint8)


def _to_image(rgb: torch.Tensor, width: int, height: int) -> Image.Image:
    image = Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB")
    scale = PREVIEW_LONG_SIDE / max(width, height)
    size = (max(1, round(width * min(1.0, scale))), max(1, round(height * min(1.0, scale))))
    return image.resize(size, Image.Resampling.BILINEAR)
