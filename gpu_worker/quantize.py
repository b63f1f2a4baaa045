"""Quantising the denoiser's linear layers through torchao (``--quantize``).

The denoiser does nearly all of a generation's arithmetic, so it alone is quantised; the text
encoders and the VAE keep the model's dtype. Each choice names a torchao config:

- ``fp8``: float8 weights and float8 activations, scaled per row
  (``Float8DynamicActivationFloat8WeightConfig``): float8 tensor-core matmuls, the fast one.
  torchao runs it on CUDA devices of compute capability 8.9 or newer (Ada, Hopper,
  Blackwell), and nowhere else.
- ``fp8-weight-only``: float8 weights, matmuls in the model's dtype: half the weight memory.
- ``int8``: int8 weights and int8 activations, scaled dynamically.
- ``int8-weight-only``: int8 weights, matmuls in the model's dtype.

LoRA adapters apply on top of the quantised layers (PEFT keeps its own in the model's dtype),
with every choice but fp8, which is refused with them until it has run on a GPU here.

A choice a device cannot run is refused when the worker starts (QuantizeError is a
ValueError: exit 78, no restart), never at the first job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

NONE = "none"
CHOICES = (NONE, "fp8", "fp8-weight-only", "int8", "int8-weight-only")
FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later


class QuantizeError(ValueError):
    """A quantisation the worker cannot do here."""


def check(choice: str, device: str, *, loras: bool = False) -> None:
    """Refuse, with the reason, a choice ``device`` cannot run (or not with LoRA adapters,
    ``loras``); do nothing for one it can."""
    if choice not in CHOICES:
        raise QuantizeError(f"--quantize {choice!r}: one of {', '.join(CHOICES)}")
    if choice == NONE:
        return
    if choice == "fp8" and loras:
        # PEFT wraps the quantised layers; with float8 activations that has never run on a
        # device here (the int8 and weight-only choices have: tests/gpu_worker/test_quantize.py).
        raise QuantizeError("--quantize fp8 cannot be used with LoRA adapters yet: untested; "
                            "fp8-weight-only, int8 and int8-weight-only can")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise QuantizeError(f"--quantize {choice} needs torchao (pip install "
                            f"'diffusion-cluster[quantize]'): {exc}") from exc
    if choice == "fp8":
        _check_fp8_device(device)


def _check_fp8_device(device: str) -> None:
    if not device.startswith("cuda"):
        raise QuantizeError(f"--quantize fp8 runs float8 matmuls, which torchao does on CUDA "
                            f"GPUs of compute capability 8.9 or newer; {device} is not one "
                            f"(fp8-weight-only, int8 and int8-weight-only run on a CPU)")
    import torch

    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(torch.device(device))
        raise QuantizeError(f"--quantize fp8 needs compute capability 8.9 or newer (Ada, "
                            f"Hopper, Blackwell); {name} has {capability[0]}.{capability[1]}: "
                            f"use int8 or int8-weight-only")


def config_for(choice: str) -> Any:
    """torchao's config for a choice other than none."""
    from torchao import quantization as q

    return {
        "fp8": lambda: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow()),
        "fp8-weight-only": q.Float8WeightOnlyConfig,
        "int8": q.Int8DynamicActivationInt8WeightConfig,
        "int8-weight-only": q.Int8WeightOnlyConfig,
    }[choice]()


def quantize_denoiser(pipe: Any, choice: str, device: str, *, loras: bool = False) -> None:
    """Quantise the denoiser of ``pipe``, already on ``device``, in place."""
    check(choice, device, loras=loras)
    if choice == NONE:
        return
    from torchao.quantization import quantize_

    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise QuantizeError(f"--quantize: {type(pipe).__name__} has no transformer or unet")
    started = time.perf_counter()
    try:
        quantize_(denoiser, config_for(choice))
    except Exception as exc:  # torchao refuses a layout or a device it does not support
        raise QuantizeError(f"--quantize {choice} failed on {type(denoiser).__name__} "
                            f"({device}): {exc}") from exc
    log.info("quantised %s to %s in %.1f s", type(denoiser).__name__, choice,
             time.perf_counter() - started)
