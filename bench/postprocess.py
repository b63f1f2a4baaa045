"""Decoded images to PIL: what the device thread spends after the VAE, diffusers' way and ours.

diffusers' output_type="pil" copies the float images to the host and converts them there in
numpy; the worker asks for output_type="pt" and runs gpu_worker.pipeline.to_pil, which does the
same arithmetic where the images are and moves only 8-bit pixels (identical bytes). The device
waits for whichever runs, so this is time the GPU idles between batches.

On a CPU both run on the host; "host part" is then what is left on the host once the
arithmetic runs on a GPU (the uint8 copy and PIL). With --device cuda every figure is measured
directly, with the device synchronised.

    .venv/bin/python bench/postprocess.py                 # CPU, about 15 s
    .venv/bin/python bench/postprocess.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import print_header, table
from gpu import median_seconds

SHAPES = ((1, 512), (8, 512), (1, 1024), (8, 1024))


def measure(processor: Any, batch: int, side: int, args: argparse.Namespace) -> list[str]:
    import torch
    from PIL import Image

    from gpu_worker.pipeline import to_pil

    decoded = torch.rand(batch, 3, side, side, device=args.device) * 2 - 1
    decoded = decoded.to(torch.bfloat16)  # what a bf16 VAE hands back
    theirs = median_seconds(lambda: processor.postprocess(decoded, output_type="pil"),
                            args.device, args.repeats)
    ours = median_seconds(lambda: to_pil(processor.postprocess(decoded, output_type="pt")),
                          args.device, args.repeats)
    # The host part: 8-bit channels-last pixels, as to_pil gets them back, into PIL.
    pixels = processor.postprocess(decoded, output_type="pt").float().mul(255).round()
    pixels = pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    host = median_seconds(lambda: [Image.fromarray(p) for p in pixels], "cpu", args.repeats)
    return [f"{batch} x {side}²", f"{theirs * 1000:.1f}", f"{ours * 1000:.1f}",
            f"{theirs / ours:.1f}x", f"{host * 1000:.1f}", f"{theirs / host:.1f}x"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where the decoded images are")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (a CPU worker runs with few)")
    args = parser.parse_args(argv)

    import torch
    from diffusers.image_processor import VaeImageProcessor

    torch.set_num_threads(args.threads)
    print_header(f"decoded images to PIL on {args.device}")
    processor = VaeImageProcessor()
    rows = [measure(processor, batch, side, args) for batch, side in SHAPES]
    print(table(["images", "diffusers pil ms", "to_pil ms", "gain", "host part ms",
                 "gain with a GPU"], rows))
    print("\nhost part: 8-bit pixels to PIL, what stays on the host when the arithmetic runs "
          "on a GPU. On a CPU, 'gain with a GPU' is a projection from it that leaves out the "
          "GPU's own time for the arithmetic and for copying the 8-bit pixels to the host "
          "(half the bytes of the bf16 images diffusers copies); with --device cuda, "
          "'to_pil ms' and 'gain' are the measured figures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
