"""Stable Diffusion 1.x/2.x: the built-in tiny model is this family's miniature."""

from __future__ import annotations

import pathlib

from gpu_worker.tiny import build_tiny_pipeline

PIPELINE = "StableDiffusionPipeline"
CALL_KWARGS: dict = {}
NOTES = ("Real CFG with a negative prompt through guidance_scale; callback_on_step_end and "
         "pipe._interrupt work; sizes are multiples of 8. SD 1.5 runs 512x512, 30-50 steps, "
         "guidance 7.5, fp16; the turbo variants 1-4 steps without guidance.")


def build(path: pathlib.Path) -> None:
    build_tiny_pipeline().save_pretrained(path)
