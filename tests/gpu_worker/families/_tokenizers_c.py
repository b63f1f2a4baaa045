"""In-memory tokenizers for the group C tiny pipelines (PixArt-Σ, Sana, Sana Sprint, HunyuanDiT).

Each vocabulary is built from characters, never fetched, so any prompt tokenizes offline:
ASCII maps to one token per character, anything else to ``unk`` (T5, BERT) or to
UTF-8 byte tokens (Gemma, which has byte fallback).
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BertTokenizer, GemmaTokenizer, T5Tokenizer

_SPACE = "▁"  # SentencePiece's word-start marker
# Printable ASCII without whitespace: every piece a tokenizer needs for English prompts.
_ASCII = [c for c in string.printable if not c.isspace()]

T5_VOCAB_SIZE = 4 + 2 * len(_ASCII)
GEMMA_VOCAB_SIZE = 5 + 256 + 1 + len(_ASCII)
BERT_VOCAB_SIZE = 5 + 2 * len(sorted({c.lower() for c in _ASCII}))


def t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """Build a Unigram T5 tokenizer: ids pad=0, eos=1, unk=2, then characters."""
    from transformers import T5Tokenizer

    # Equal scores, so Unigram prefers the fewest pieces: "▁a" over "▁" + "a".
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_SPACE, -1.0)]
    pieces += [(_SPACE + c, -1.0) for c in _ASCII] + [(c, -1.0) for c in _ASCII]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def gemma_tokenizer(model_max_length: int) -> GemmaTokenizer:
    """Build a merge-free Gemma BPE tokenizer with all 256 byte-fallback tokens."""
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + [_SPACE] + _ASCII
    vocab = {token: i for i, token in enumerate(tokens)}
    # Gemma 2 prepends <bos>; Sana keeps index 0 of the embeddings, so it must be there.
    return GemmaTokenizer(
        vocab=vocab, merges=[], add_bos_token=True, model_max_length=model_max_length
    )


def bert_tokenizer(model_max_length: int) -> BertTokenizer:
    """Build a lower-casing WordPiece tokenizer with every character alone and as a continuation."""
    from transformers import BertTokenizer

    chars = sorted({c.lower() for c in _ASCII})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab = {token: i for i, token in enumerate(tokens)}
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)
