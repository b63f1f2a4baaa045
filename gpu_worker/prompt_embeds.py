"""Prompt embeddings for the CLIP families (SD 1.x/2.x, SDXL): word weights and whole long
prompts, through compel.

diffusers reads a prompt for these families as its first 77 CLIP tokens and takes brackets
as text. Here the prompt is parsed (gpu_worker/prompt_syntax.py) and encoded by compel
(https://github.com/damian0815/compel, MIT, the prompt code InvokeAI grew from, kept current
with diffusers and transformers): a prompt past 75 tokens is encoded in chunks of 75 and the
chunks' embeddings are joined, a weight above 1 scales its tokens' embeddings away from the
empty prompt's, and one below 1 blends toward the embedding of the prompt without those
words (one more text-encoder pass each, hence prompt_syntax.MAX_DOWNWEIGHTED).

A prompt with no weights and no more than 75 tokens comes out bit for bit as diffusers' own
encoding (tests/gpu_worker/test_prompt_embeds.py checks it), so plain prompts make the same
images as before.

Each job is encoded on its own and padded, prompt and negative alike, to its own length (in
chunks of 77 tokens, with the empty prompt's embedding): batched or alone, a job's embeddings
are the same. Jobs of different lengths cannot share a call without padding each other, so
``groups`` splits a batch by length. For SDXL with no negative prompt the unconditional
embeddings are zeros where the model's config says so (``force_zeros_for_empty_prompt``), as
diffusers does, per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from broker.protocol import JobSpec
from gpu_worker import prompt_syntax
from gpu_worker.prompt_syntax import Fragment

# Tokens of a prompt read at most, 8 chunks of 75: each chunk is a text-encoder pass (and one
# more per part weighed below 1), and the denoiser attends to every token at every step.
MAX_TOKENS = 8 * 75


@dataclass(frozen=True)
class _Encoded:
    embeds: torch.Tensor  # (1, tokens, width)
    pooled: torch.Tensor | None  # (1, width): SDXL's second encoder's summary


class PromptEncoder:
    """Encodes the prompts of a batch for one SD or SDXL pipeline (and the edit pipelines
    made from it: they share its encoders). Called on the device thread only."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.xl = getattr(pipe, "text_encoder_2", None) is not None

    @staticmethod
    def fits(pipe: Any) -> bool:
        """Whether ``pipe`` has the CLIP encoders this reads (a first one, and SDXL's
        second with its projection)."""
        first = getattr(pipe, "text_encoder", None)
        return first is not None and type(first).__name__ == "CLIPTextModel" \
            and getattr(pipe, "tokenizer", None) is not None

    # ---------------------------------------------------------------- lengths

    def groups(self, jobs: Sequence[JobSpec], *, guided: bool) -> list[list[JobSpec]]:
        """The jobs split by the length their embeddings take, in order of first seen.
        ``guided`` as for ``call_kwargs``."""
        compels = self._compels()
        by_length: dict[int, list[JobSpec]] = {}
        for job in jobs:
            by_length.setdefault(self._length(compels, job, guided), []).append(job)
        return list(by_length.values())

    def _length(self, compels: list[Any], job: JobSpec, guided: bool) -> int:
        # Without guidance the negative prompt is not encoded, so it must not count: a long
        # one would put the job in a group whose length its embeddings do not have.
        texts = [job.prompt] + ([job.negative_prompt] if job.negative_prompt and guided else [])
        return max(_token_count(compel, _capped(compels[0], prompt_syntax.parse(text)))
                   for compel in compels for text in texts)

    def tokens(self, text: str) -> int:
        """How many tokens ``text``'s words take (its weighting syntax aside)."""
        compel = self._compels()[0]
        fragments = prompt_syntax.parse(text)
        ids = compel.conditioning_provider.get_token_ids(
            [f.text for f in fragments], include_start_and_end_markers=False)
        return sum(len(part) for part in ids)

    # ---------------------------------------------------------------- embeddings

    def call_kwargs(self, jobs: Sequence[JobSpec], negatives: Sequence[str | None], *,
                    guided: bool) -> dict[str, Any]:
        """The pipeline's ``prompt_embeds`` and the rest, one row per image made, for jobs
        of one length (``groups``). ``negatives``: each job's negative prompt or None;
        ``guided``: classifier-free guidance is on, so negatives are needed."""
        compels = self._compels()
        rows: dict[str, list[torch.Tensor]] = {}
        for job, negative in zip(jobs, negatives, strict=True):
            encoded = self._job(compels, job.prompt, negative if guided else None,
                                guided=guided)
            for name, tensor in encoded.items():
                rows.setdefault(name, []).extend([tensor] * job.n)
        return {name: torch.cat(tensors) for name, tensors in rows.items()}

    def _job(self, compels: list[Any], prompt: str, negative: str | None, *,
             guided: bool) -> dict[str, torch.Tensor]:
        positive = self._encode(compels, self._read(compels, prompt))
        found: dict[str, torch.Tensor] = {"prompt_embeds": positive.embeds}
        if positive.pooled is not None:
            found["pooled_prompt_embeds"] = positive.pooled
        if not guided:
            return found
        if not negative and self.xl and self._zeros_for_empty():  # "" is no negative either
            # The positive's own shape, so never padded.
            unconditional = _Encoded(torch.zeros_like(positive.embeds),
                                     None if positive.pooled is None
                                     else torch.zeros_like(positive.pooled))
        else:
            unconditional = self._encode(compels, self._read(compels, negative or ""))
        length = max(positive.embeds.shape[1], unconditional.embeds.shape[1])
        found["prompt_embeds"] = self._padded(compels, positive.embeds, length)
        found["negative_prompt_embeds"] = self._padded(compels, unconditional.embeds, length)
        if unconditional.pooled is not None:
            found["negative_pooled_prompt_embeds"] = unconditional.pooled
        return found

    @staticmethod
    def _read(compels: list[Any], text: str) -> list[Fragment]:
        return _capped(compels[0], prompt_syntax.check(text))

    def _encode(self, compels: list[Any], fragments: list[Fragment]) -> _Encoded:
        texts = [[f.text for f in fragments]]
        weights = [[f.weight for f in fragments]]
        device = self._pipe._execution_device
        parts = [compel.conditioning_provider.get_embeddings_for_weighted_prompt_fragments(
                     text_batch=texts, fragment_weights_batch=weights, device=device)
                 for compel in compels]
        length = max(part.shape[1] for part in parts)
        parts = [_pad(compel, part, length) for compel, part in zip(compels, parts, strict=True)]
        pooled = None
        if self.xl:  # the summary reads the words, not their weights (as in compel)
            pooled = compels[-1].conditioning_provider.get_pooled_embeddings(
                [prompt_syntax.plain_text(fragments)], device=device)
        return _Encoded(torch.cat(parts, dim=-1), pooled)

    def _padded(self, compels: list[Any], embeds: torch.Tensor, length: int) -> torch.Tensor:
        if embeds.shape[1] == length:
            return embeds
        # Each encoder's share of the width is padded with its own empty prompt.
        widths = [compel.conditioning_provider.empty_z.shape[-1] for compel in compels]
        shares = torch.split(embeds, widths, dim=-1)
        return torch.cat([_pad(compel, share, length)
                          for compel, share in zip(compels, shares, strict=True)], dim=-1)

    def _zeros_for_empty(self) -> bool:
        return bool(getattr(self._pipe.config, "force_zeros_for_empty_prompt", False))

    def _compels(self) -> list[Any]:
        """Fresh each batch: compel keeps the empty prompt's embedding once made, and a LoRA
        adapter on a text encoder changes it between batches."""
        from compel import Compel, ReturnedEmbeddingsType

        pipe = self._pipe
        if not self.xl:
            return [Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                           truncate_long_prompts=False)]
        # SDXL: both encoders' penultimate layers side by side; the second's pooled output.
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        return [Compel(tokenizer=tokenizer, text_encoder=encoder, returned_embeddings_type=kind,
                       truncate_long_prompts=False)
                for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                           (pipe.tokenizer_2, pipe.text_encoder_2))
                if encoder is not None]


def _capped(compel: Any, fragments: list[Fragment]) -> list[Fragment]:
    """The fragments within MAX_TOKENS: the fragment that crosses it is cut at a token."""
    ids = compel.conditioning_provider.get_token_ids([f.text for f in fragments],
                                                     include_start_and_end_markers=False)
    if sum(len(part) for part in ids) <= MAX_TOKENS:
        return fragments
    kept: list[Fragment] = []
    room = MAX_TOKENS
    for fragment, part in zip(fragments, ids, strict=True):
        if len(part) > room:
            # Decoded tokens read again need not be the same tokens (a cut inside a word of
            # many, or inside a character's bytes, reads as more): cut earlier until they fit.
            for cut in range(room, 0, -1):
                text = compel.conditioning_provider.tokenizer.decode(part[:cut])
                again = compel.conditioning_provider.get_token_ids(
                    [text], include_start_and_end_markers=False)[0]
                if len(again) <= room:
                    kept.append(Fragment(text, fragment.weight))
                    break
            break
        kept.append(fragment)
        room -= len(part)
    return kept


def _token_count(compel: Any, fragments: list[Fragment]) -> int:
    """Tokens the embeddings of ``fragments`` take: whole chunks of the encoder's length,
    split where compel splits them (at sentence ends where it can)."""
    tokens, _, _ = compel.conditioning_provider.get_token_ids_and_expand_weights(
        [f.text for f in fragments], [f.weight for f in fragments], device="cpu")
    return int(tokens.shape[0])


def _pad(compel: Any, embeds: torch.Tensor, length: int) -> torch.Tensor:
    """``embeds`` made ``length`` tokens long with chunks of the empty prompt's embedding."""
    missing = length - embeds.shape[1]
    if missing <= 0:
        return embeds
    empty = compel.conditioning_provider.empty_z.to(embeds.device, embeds.dtype)
    chunks = missing // empty.shape[1]
    return torch.cat([embeds, empty.expand(embeds.shape[0], -1, -1).repeat(1, chunks, 1)],
                     dim=1)
