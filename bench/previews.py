"""What one preview costs the device thread: a latent map, a small VAE decode, a full decode.

Previews (``partial_images``) are made between denoising steps, on the thread that drives the
device, so the device waits for them. Three ways, per preview of a batch of images:

- ``latent map``: gpu_worker.preview's linear latent -> RGB map and the upscale to the
  preview's size (256 px on the long side): what the first preview always is;
- ``small decode``: the pipeline's VAE on the latents shrunk to the preview's size: what the
  later previews are where it costs under DECODE_BUDGET of a step;
- ``full decode``: the VAE on the full latents, then scaled down: what a final-quality
  preview would cost, for comparison.

The ``step`` column is one denoising step of the same pipeline at the same size, measured in a
real generation. With the ``tiny`` model (default) the VAE is a miniature, so the decode
figures are far below a real model's; ``--model`` takes any registry name the machine can load.

    .venv/bin/python bench/previews.py                   # CPU, tiny, about 30 s
    .venv/bin/python bench/previews.py --device cuda --model sdxl-turbo
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from typing import Any

from _common import print_header, table
from gpu import median_seconds, synchronize

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = ((1, 256), (1, 512), (4, 512), (1, 1024))


def step_seconds(runner: Any, batch: int, side: int, device: str,
                 loras: tuple[tuple[str, float], ...] = ()) -> float:
    """The median denoising step of a real generation at this size (with ``loras``)."""
    from broker.protocol import JobSpec

    stamps: list[float] = []

    def on_step(done: int, total: int, previews: list[Any]) -> bool:
        synchronize(device)
        stamps.append(time.perf_counter())
        return True

    job = JobSpec(id="bench", model=runner.spec.name, prompt="a lighthouse", width=side,
                  height=side, steps=6, seeds=tuple(range(batch)),
                  guidance=runner.spec.default_guidance, loras=loras)
    runner.generate(job, on_step)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def measure(runner: Any, batch: int, side: int, args: argparse.Namespace) -> list[str]:
    import torch

    from gpu_worker.preview import PreviewMaker, latents_to_images

    pipe = runner.pipe
    scale = pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    latents = torch.randn(batch, channels, side // scale, side // scale, device=args.device,
                          dtype=pipe.vae.dtype)
    maker = PreviewMaker(pipe, runner.spec.family)

    def full_decode() -> None:
        config = pipe.vae.config
        scaled = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0)
        with torch.inference_mode():
            pixels = pipe.vae.decode(scaled, return_dict=False)[0]
        rgb = ((pixels.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        from PIL import Image
        for image in rgb:
            Image.fromarray(image.permute(1, 2, 0).numpy()).resize((256, 256))

    latent_map = median_seconds(lambda: latents_to_images(latents, pipe, side, side,
                                                          runner.spec.family),
                                args.device, args.repeats)
    small = median_seconds(lambda: maker._decode(latents, side, side, None), args.device,
                           args.repeats)
    full = median_seconds(full_decode, args.device, args.repeats)
    step = step_seconds(runner, batch, side, args.device)
    return [f"{batch} x {side}²", f"{latent_map * 1000:.2f}", f"{small * 1000:.1f}",
            f"{full * 1000:.1f}", f"{step * 1000:.1f}", f"{full / latent_map:.0f}x",
            f"{small / latent_map:.0f}x", f"{latent_map / step:.1%}", f"{small / step:.0%}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="a registry name (default: tiny)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per shape (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (a CPU worker runs with few)")
    args = parser.parse_args(argv)

    from gpu_worker import models
    from gpu_worker.pipeline import LoadOptions, PipelineRunner

    runner = PipelineRunner(models.resolve(args.model),
                            LoadOptions(device=args.device, threads=args.threads))
    print_header(f"one preview of {args.model} on {args.device}")
    rows = [measure(runner, batch, side, args) for batch, side in SHAPES]
    print(table(["images", "latent map ms", "small decode ms", "full decode ms", "step ms",
                 "full/map", "small/map", "map/step", "small/step"], rows))
    print("\nlatent map: the first preview, always; small decode: later previews where it "
          "costs at most DECODE_BUDGET (25%) of a step.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
