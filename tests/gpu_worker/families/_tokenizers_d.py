"""In-memory tokenizers for the group-D tiny pipelines (Lumina-Next, Lumina 2, Qwen-Image, Z-Image).

Nothing is read from the Hugging Face hub. Each tokenizer covers every byte, so any text
tokenizes without unknown tokens, and adds whole-word merges for the fixed prompt templates the
pipelines wrap around user prompts, so those templates cost about as many tokens as with the
real tokenizers (Qwen-Image drops a fixed 34-token template prefix; Lumina 2 spends part of its
256-token budget on a system prompt).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GemmaTokenizer, Qwen2Tokenizer

QWEN_ENDOFTEXT = "<|endoftext|>"
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
QWEN_THINK = ("<think>", "</think>")
_QWEN_SPECIALS = (QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, *QWEN_THINK)

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")

# Qwen3's chat template reduced to text-only messages; like the real one, enable_thinking=False
# appends an empty think block to the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def qwen_tokenizer(templates: Iterable[str], model_max_length: int) -> Qwen2Tokenizer:
    """Build a byte-level Qwen2 BPE tokenizer whose template words are single tokens."""
    from transformers import Qwen2Tokenizer

    symbols = _byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    words = ["".join(symbols[b] for b in word.encode()) for word in _qwen_words(templates)]
    merges = _learn_merges(vocab, words)
    for token in _QWEN_SPECIALS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        extra_special_tokens=[t for t in _QWEN_SPECIALS if t != QWEN_ENDOFTEXT],
    )


def gemma_tokenizer(templates: Iterable[str], model_max_length: int) -> GemmaTokenizer:
    """Build a Gemma BPE tokenizer (byte fallback) whose template words are single tokens."""
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(GEMMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for code in range(0x20, 0x7F):
        vocab.setdefault("▁" if code == 0x20 else chr(code), len(vocab))
    words = [w for text in templates for w in re.findall(r"[^\W_]+", text)]
    # Gemma marks a preceding space with "▁"; words occur both after a space and not.
    merges = _learn_merges(vocab, [form for w in words for form in ("▁" + w, w)])
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        add_bos_token=True,
        add_eos_token=False,
    )


def _learn_merges(vocab: dict[str, int], words: Iterable[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on ``words`` until each is one token, adding merged tokens to ``vocab``.

    Real BPE training rather than ad-hoc prefix chains: the tokenizer then applies the merges in
    rank order and lands on exactly the training segmentation, so every word stays whole.
    Ties go to the smallest pair, so the result is the same on every build.
    """
    pieces = [list(word) for word in dict.fromkeys(words) if len(word) > 1]
    merges: list[tuple[str, str]] = []
    while pieces:
        counts = Counter(pair for piece in pieces for pair in itertools.pairwise(piece))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        pieces = [merged for piece in pieces if len(merged := _merge(piece, best)) > 1]
    return merges


def _merge(piece: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every non-overlapping occurrence of ``pair`` in ``piece``, left to right."""
    out: list[str] = []
    i = 0
    while i < len(piece):
        if i + 1 < len(piece) and (piece[i], piece[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(piece[i])
            i += 1
    return out


def _qwen_words(templates: Iterable[str]) -> list[str]:
    """Split templates the way Qwen2's pre-tokenizer does, keeping multi-character pieces."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    specials = "|".join(re.escape(t) for t in (*_QWEN_SPECIALS, "{}"))
    words: dict[str, None] = {}
    for template in templates:
        for segment in re.split(specials, template):
            for piece, _ in split.pre_tokenize_str(segment):
                if len(piece.encode()) > 1:
                    words[piece] = None
    return list(words)


def _byte_symbols() -> list[str]:
    """Return the 256 printable symbols GPT-2-style byte-level BPE uses for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
