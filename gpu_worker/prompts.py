"""How much of a prompt a model reads, said in the result's ``warnings`` when not all of it.

CLIP text encoders read 77 tokens and diffusers drops the rest without a word. SD 1.x/2.x and
SDXL read more: their prompts are encoded in chunks (gpu_worker/prompt_embeds.py), up to
``prompt_embeds.MAX_TOKENS``. The other families whose only prompt encoder is CLIP (Stable
Cascade) read 75 tokens. Families with a long text encoder (T5, Gemma, Qwen: FLUX, SD3,
PixArt, ...) read up to their ``max_sequence_length`` and use CLIP, if at all, for a pooled
summary only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.protocol import JobSpec


def truncation_warnings(pipe: Any, job: JobSpec, *, model: str,
                        long_encoder: bool) -> list[str]:
    """Warnings for ``job``'s prompts that a CLIP-only model cannot read whole."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if long_encoder or tokenizer is None or "CLIP" not in type(tokenizer).__name__:
        return []
    limit = int(getattr(tokenizer, "model_max_length", 77)) - 2  # less BOS and EOS

    def tokens(text: str) -> int:
        return len(tokenizer(text, truncation=False).input_ids) - 2

    return cut_warnings(job, model=model, tokens=tokens, limit=limit, reader="CLIP")


def cut_warnings(job: JobSpec, *, model: str, tokens: Callable[[str], int], limit: int,
                 reader: str) -> list[str]:
    """Warnings for ``job``'s prompts past ``limit`` tokens, counted by ``tokens``."""
    warnings = []
    for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
        if not text:
            continue
        count = tokens(text)
        if count > limit:
            warnings.append(f"the {field.replace('_', ' ')} is {count} tokens long; "
                            f"{model} reads the first {limit} ({reader}), and the rest was "
                            f"ignored")
    return warnings
