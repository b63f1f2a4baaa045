"""Previews of images still being denoised, from the first step on.

Two ways to see latents, cheapest first:

- **Latent map**: a linear map of the latent channels to RGB with each family's known factors
  (the community's approximations that ComfyUI also uses: SD 1.x, SDXL, SD3, FLUX), on the
  device, then a few kilobytes to the host. Microseconds where a VAE decode costs as much as
  a denoising step. A family without factors gets its first three channels, stretched to the
  full colour range: the composition, not the colours.
- **Small decode**: the pipeline's own VAE on the latents shrunk to the preview's size, so
  the colours are the final ones. Used for the later previews only where it is cheap: an
  AutoencoderKL whose latents need nothing but scaling, not offloaded, and measured at under
  ``DECODE_BUDGET`` of a denoising step (``PreviewMaker``).

Either is upscaled to the image's aspect ratio, ``PREVIEW_LONG_SIDE`` pixels on the long side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

PREVIEW_LONG_SIDE = 256
DECODE_BUDGET = 0.25  # a small decode may cost up to this share of one denoising step


@dataclass(frozen=True)
class LatentRGB:
    """A family's linear latent -> RGB approximation: rgb = latents @ factors + bias, in [-1, 1]."""

    factors: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def matrix(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.factors, dtype=torch.float32, device=device),
                torch.tensor(self.bias, dtype=torch.float32, device=device))


SD1_RGB = LatentRGB(((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                     (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)))
SDXL_RGB = LatentRGB(((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                      (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                     (0.1084, -0.0175, -0.0011))
SD3_RGB = LatentRGB((
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189)), (0.2394, 0.2135, 0.1925))
FLUX_RGB = LatentRGB((
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778)), (-0.0329, -0.0718, -0.0851))

# By registry family (gpu_worker/models.py). Families that decode with another's VAE share
# its factors: SDXL's VAE (Kolors, PixArt-Sigma, Hunyuan-DiT, Lumina-Next, AuraFlow) and
# FLUX's (Chroma, Lumina 2, Z-Image, HiDream). The factors apply only to latents with as many
# channels as they have rows; anything else gets the fallback.
FAMILY_RGB: dict[str, LatentRGB] = {
    "sd": SD1_RGB, "tiny": SD1_RGB,
    "sdxl": SDXL_RGB, "kolors": SDXL_RGB, "pixart-sigma": SDXL_RGB, "hunyuan-dit": SDXL_RGB,
    "lumina-next": SDXL_RGB, "auraflow": SDXL_RGB,
    "sd3": SD3_RGB,
    "flux": FLUX_RGB, "chroma": FLUX_RGB, "lumina-2": FLUX_RGB, "z-image": FLUX_RGB,
    "hidream": FLUX_RGB,
}


def preview_steps(total: int, count: int) -> set[int]:
    """The steps (1-based) at which to send ``count`` previews: the first step, then evenly
    spread over the rest, never the last one of a multi-step run (the image follows it)."""
    if count <= 0 or total <= 0:
        return set()
    steps = {int(1 + (total - 1) * k / count + 0.5) for k in range(count)}
    return steps - {total} if total > 1 else {1}


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The preview's size: the image's aspect ratio, PREVIEW_LONG_SIDE on the long side
    (never larger than the image)."""
    scale = min(1.0, PREVIEW_LONG_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def latents_to_images(latents: Any, pipe: Any, width: int, height: int,
                      family: str | None = None) -> list[Image.Image]:
    """One latent-map preview per image in the batch; [] when the latents cannot be read."""
    spatial = spatial_latents(latents, pipe, width, height)
    if spatial is None:
        return []
    return [_to_image(rgb, width, height) for rgb in latent_rgb(spatial, family)]


def spatial_latents(latents: Any, pipe: Any, width: int, height: int) -> torch.Tensor | None:
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


def latent_rgb(latents: torch.Tensor, family: str | None) -> torch.Tensor:
    """(batch, 3, h, w) uint8 on the host, mapped where the latents are."""
    latents = latents.float()
    known = FAMILY_RGB.get(family or "")
    if known is not None and len(known.factors) == latents.shape[1]:
        factors, bias = known.matrix(latents.device)
        rgb = torch.einsum("bchw,cr->brhw", latents, factors) + bias.view(1, 3, 1, 1)
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:  # no factors for these latents: show the structure, stretched to full range
        rgb = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1].expand(-1, 3, -1, -1)
        low = rgb.amin(dim=(1, 2, 3), keepdim=True)
        high = rgb.amax(dim=(1, 2, 3), keepdim=True)
        rgb = (rgb - low) / (high - low).clamp(min=1e-6)
    return (rgb * 255).round().to(torch.uint8).cpu()


def _to_image(rgb: torch.Tensor, width: int, height: int) -> Image.Image:
    image = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy(), "RGB")
    size = preview_size(width, height)
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


class PreviewMaker:
    """Makes a batch's previews: a latent map first, small VAE decodes later where cheap.

    Belongs to one runner (one thread). It learns what a small decode costs for each batch
    and preview size (the first of each measured twice: the first call may pay a one-time
    set-up) and decodes where that is within DECODE_BUDGET of a denoising step; a decode
    that fails stops the VAE previews for good.
    """

    def __init__(self, pipe: Any, family: str | None, *, offloaded: bool = False) -> None:
        self.pipe = pipe
        self.family = family
        self.decodes = not offloaded and _decodable(pipe)
        self.decode_seconds: float | None = None  # the last decode's
        self._costs: dict[tuple[int, ...], tuple[float, int]] = {}  # shape: (seconds, times)

    def make(self, latents: Any, width: int, height: int, *, first: bool,
             step_seconds: float | None = None) -> list[Image.Image]:
        """One preview per image of the batch ([] when the latents cannot be read)."""
        spatial = spatial_latents(latents, self.pipe, width, height)
        if spatial is None:
            return []
        if not first and self._decode_affordable(_shape(spatial, width, height), step_seconds):
            images = self._decode(spatial, width, height)
            if images:
                return images
        return [_to_image(rgb, width, height) for rgb in latent_rgb(spatial, self.family)]

    def _decode_affordable(self, shape: tuple[int, ...], step_seconds: float | None) -> bool:
        if not self.decodes:
            return False
        seconds, times = self._costs.get(shape, (0.0, 0))
        if times < 2 or step_seconds is None:
            return True  # not measured (twice) yet: a try tells
        return seconds <= DECODE_BUDGET * step_seconds

    def _decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        vae = self.pipe.vae
        config = vae.config
        if latents.shape[1] != config.latent_channels:
            self.decodes = False
            return []
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        out_w, out_h = preview_size(width, height)
        size = (max(1, -(-out_h // scale)), max(1, -(-out_w // scale)))
        if latents.is_cuda:  # time the decode alone, not the step still queued before it
            torch.cuda.synchronize(latents.device)
        started = time.perf_counter()
        try:
            small = F.interpolate(latents.float(), size=size, mode="area")
            small = small / config.scaling_factor + (getattr(config, "shift_factor", None) or 0)
            with torch.inference_mode():
                pixels = vae.decode(small.to(vae.dtype), return_dict=False)[0]
            rgb = ((pixels.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        except Exception as exc:  # a VAE we cannot drive this way: latent maps from now on
            log.info("small-decode previews not available: %s", exc)
            self.decodes = False
            return []
        self.decode_seconds = time.perf_counter() - started
        shape = _shape(latents, width, height)
        _, times = self._costs.get(shape, (0.0, 0))
        self._costs[shape] = (self.decode_seconds, times + 1)
        return [_to_image(img, width, height) for img in rgb]


def _shape(latents: torch.Tensor, width: int, height: int) -> tuple[int, ...]:
    """What a small decode's cost depends on: the batch and the preview's size."""
    return (int(latents.shape[0]), *preview_size(width, height))


def _decodable(pipe: Any) -> bool:
    """Whether the pipeline's VAE decodes scaled latents as they are: an AutoencoderKL with
    no per-channel statistics, and not in half precision that needs upcasting (SDXL's)."""
    vae = getattr(pipe, "vae", None)
    if vae is None or type(vae).__name__ != "AutoencoderKL":
        return False
    config = vae.config
    if getattr(config, "latents_mean", None) is not None:
        return False
    if getattr(config, "force_upcast", False) and vae.dtype == torch.float16:
        return False
    return isinstance(getattr(config, "scaling_factor", None), (int, float))
