"""How much of a prompt a model reads: CLIP text encoders read 77 tokens and diffusers drops the
rest without a word. For the families whose only prompt encoder is CLIP (SD 1.x/2.x, SDXL),
a prompt past that comes back with a warning saying how much was read. Families with a long
text encoder (T5, Gemma, Qwen: FLUX, SD3, PixArt, ...) read up to their
``max_sequence_length`` and use CLIP, if at all, for a pooled summary only.
"""

from __future__ import annotations

from typing import Any

from broker.protocol import JobSpec


def truncation_warnings(pipe: Any, job: JobSpec, *, model: str,
                        long_encoder: bool) -> list[str]:
    """Warnings for ``job``'s prompts that its model cannot read whole; none otherwise."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if long_encoder or tokenizer is None or "CLIP" not in type(tokenizer).__name__:
        return []
    limit = int(getattr(tokenizer, "model_max_length", 77))
    warnings = []
    for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
        if not text:
            continue
        tokens = len(tokenizer(text, truncation=False).input_ids)
        if tokens > limit:
            warnings.append(f"the {field.replace('_', ' ')} is {tokens - 2} tokens long; "
                            f"{model} reads the first {limit - 2} (CLIP), and the rest was "
                            f"ignored")
    return warnings
