"""In-memory tokenizers for the tiny family pipelines.

Nothing here reads the Hugging Face hub: every vocabulary is built in code, so the tiny
pipelines build offline and byte-for-byte the same everywhere. Byte-level and byte-fallback
vocabularies (CLIP, Qwen, Gemma, Llama-style, tiktoken-style, ChatGLM) tokenize any text;
the character vocabularies (T5, BERT) map what is not printable ASCII to their unknown token,
as a real SentencePiece T5 does for unseen characters.
"""

from __future__ import annotations

import itertools
import pathlib
import re
import struct
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

# The GPT-2 byte table, defined once for the built-in tiny model and for these tokenizers.
from gpu_worker.tiny import byte_symbols

if TYPE_CHECKING:
    from diffusers.pipelines.kolors import ChatGLMTokenizer
    from transformers import (
        BertTokenizer,
        CLIPTokenizer,
        GemmaTokenizer,
        LlamaTokenizer,
        PreTrainedTokenizerFast,
        Qwen2Tokenizer,
        T5Tokenizer,
    )

WORD_MARK = "\u2581"  # SentencePiece's word-start marker
# Printable ASCII without the space: the characters of the character-level vocabularies.
_ASCII = [chr(c) for c in range(ord("!"), ord("~") + 1)]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 2 * 256 + 2  # every byte, alone and word-final, plus BOS/EOS
CLIP_BOS_ID = CLIP_VOCAB_SIZE - 2
CLIP_EOS_ID = CLIP_VOCAB_SIZE - 1

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 512
# pad, eos, unk, the bare word-start marker, then each char with and without the marker
T5_VOCAB_SIZE = 4 + 2 * len(_ASCII)

BERT_VOCAB_SIZE = 5 + 2 * len({c.lower() for c in _ASCII})

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
# specials, the 256 byte-fallback pieces, "▁" and printable ASCII; template merges come after.
GEMMA_VOCAB_SIZE = len(GEMMA_SPECIALS) + 256 + 1 + len(_ASCII)

QWEN_ENDOFTEXT = "<|endoftext|>"
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
QWEN_THINK = ("<think>", "</think>")
_QWEN_SPECIALS = (QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, *QWEN_THINK)
# 256 bytes and the specials; template merges come after.
QWEN_VOCAB_SIZE = 256 + len(_QWEN_SPECIALS)

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

SP_UNK, SP_BOS, SP_EOS, SP_PAD = "<unk>", "<s>", "</s>", "<pad>"
SP_BPE_VOCAB_SIZE = 4 + 256 + 1  # specials, <0xNN> byte pieces, the bare word marker

# ChatGLM's sentencepiece ids: <unk>, <s>, </s>, the 256 byte pieces, then "▁" and ASCII.
SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2
_SP_CHARS = [WORD_MARK, *_ASCII]
SP_VOCAB_SIZE = 3 + 256 + len(_SP_CHARS)
# ChatGLMTokenizer appends nine special tokens ([MASK], [gMASK], sop, roles...) after these ids.
CHATGLM_VOCAB_SIZE = SP_VOCAB_SIZE + 9
# len() counts get_vocab(), where ChatGLM names <unk>, <s> and </s> all "": three ids, one entry.
CHATGLM_LEN = CHATGLM_VOCAB_SIZE - 2
CHATGLM_MAX_LENGTH = 256


# ------------------------------------------------------------------ byte-level BPE


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer with no merges, so any text tokenizes without unk."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def clip_special_ids() -> tuple[int, int]:
    """Return (bos, eos) ids of clip_tokenizer(); the text encoder config must agree."""
    return CLIP_BOS_ID, CLIP_EOS_ID


def qwen_tokenizer(templates: Iterable[str] = (), *,
                   model_max_length: int = 512) -> Qwen2Tokenizer:
    """Build a byte-level Qwen2 BPE tokenizer whose template words are single tokens.

    The merges make the fixed prompt templates a pipeline wraps around user prompts cost
    about as many tokens as with the real tokenizer (Qwen-Image drops a fixed 34-token prefix).
    """
    from transformers import Qwen2Tokenizer

    symbols = byte_symbols()
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


def byte_level_tokenizer(
    *,
    specials: list[str],
    prefix: list[str],
    eos: str,
    pad: str | None,
    padding_side: str,
    model_max_length: int,
    bos: str | None = None,
) -> PreTrainedTokenizerFast:
    """Build a tiktoken-style byte-level BPE tokenizer (GLM-4, Llama 3) with no merges.

    ``specials`` follow the 256 byte symbols in the vocabulary; ``prefix`` tokens are prepended
    to every encoded text, as GLM-4 prepends ``[gMASK]<sop>`` and Llama 3 ``<|begin_of_text|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    template = " ".join([*prefix, "$A"])
    backend.post_processor = processors.TemplateProcessing(
        single=template,
        pair=f"{template} $B",
        special_tokens=[(token, vocab[token]) for token in prefix],
    )
    named = {"eos_token": eos, "pad_token": pad, "bos_token": bos}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[t for t in specials if t not in named.values()],
        padding_side=padding_side,
        model_max_length=model_max_length,
        **{k: v for k, v in named.items() if v is not None},
    )


# ------------------------------------------------------------------ byte-fallback BPE


def gemma_tokenizer(templates: Iterable[str] = (), *, model_max_length: int) -> GemmaTokenizer:
    """Build a Gemma BPE tokenizer (byte fallback) whose template words are single tokens."""
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(GEMMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for code in range(0x20, 0x7F):
        vocab.setdefault(WORD_MARK if code == 0x20 else chr(code), len(vocab))
    words = [w for text in templates for w in re.findall(r"[^\W_]+", text)]
    # Gemma marks a preceding space with "▁"; words occur both after a space and not.
    merges = _learn_merges(vocab, [form for w in words for form in (WORD_MARK + w, w)])
    # Gemma 2 prepends <bos>; Sana keeps index 0 of the embeddings, so it must be there.
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        add_bos_token=True,
        add_eos_token=False,
    )


def sentencepiece_bpe_tokenizer(model_max_length: int) -> LlamaTokenizer:
    """Build a Llama (SentencePiece-BPE) tokenizer of byte-fallback pieces, T5-style specials.

    Shaped like AuraFlow's pile-t5 tokenizer (a LlamaTokenizerFast): a ``<pad>`` token, no BOS,
    ``</s>`` appended, right padding.
    """
    from transformers import LlamaTokenizer

    vocab = {SP_UNK: 0, SP_BOS: 1, SP_EOS: 2, SP_PAD: 3}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab[WORD_MARK] = len(vocab)
    return LlamaTokenizer(
        vocab=vocab,
        merges=[],
        pad_token=SP_PAD,
        add_bos_token=False,
        add_eos_token=True,
        padding_side="right",
        model_max_length=model_max_length,
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


# ------------------------------------------------------------------ character vocabularies


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """Build a character-level Unigram T5 tokenizer: ASCII tokenizes, anything else is unk."""
    from transformers import T5Tokenizer

    # T5Tokenizer's Unigram model hard-codes unk_id=2, so the specials keep T5's order.
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (WORD_MARK, -2.0)]
    for char in _ASCII:
        vocab += [(WORD_MARK + char, -3.0), (char, -3.0)]
    # No sentinel <extra_id_*> tokens: only T5's span-corruption pretraining uses them.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def bert_tokenizer(model_max_length: int) -> BertTokenizer:
    """Build a lower-casing WordPiece tokenizer with every character alone and as a continuation."""
    from transformers import BertTokenizer

    chars = sorted({c.lower() for c in _ASCII})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab = {token: i for i, token in enumerate(tokens)}
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)


# ------------------------------------------------------------------ ChatGLM (Kolors)
# A sentencepiece ModelProto, written by hand: protobuf (for sentencepiece_model_pb2) is not
# installed, and a listed vocabulary is reproducible by construction, unlike a trained one.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _piece(text: str, score: float, kind: int) -> bytes:
    # SentencePiece.Type: NORMAL=1, UNKNOWN=2, CONTROL=3, BYTE=6.
    return _field_bytes(1, text.encode()) + _field_float(2, score) + _field_varint(3, kind)


def sentencepiece_model_bytes() -> bytes:
    """Return a serialized unigram sentencepiece model with byte fallback (any text encodes)."""
    pieces = [_piece("<unk>", 0.0, 2), _piece("<s>", 0.0, 3), _piece("</s>", 0.0, 3)]
    pieces += [_piece(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [_piece(ch, -1.0 - i / 100, 1) for i, ch in enumerate(_SP_CHARS)]
    trainer = (
        _field_varint(3, 1)  # model_type UNIGRAM
        + _field_varint(4, SP_VOCAB_SIZE)
        + _field_varint(35, 1)  # byte_fallback
        + _field_varint(40, SP_UNK_ID)
        + _field_varint(41, SP_BOS_ID)
        + _field_varint(42, SP_EOS_ID)
    )  # pad_id keeps its proto default, -1: ChatGLM pads with unk
    normalizer = (
        _field_bytes(1, b"identity")
        + _field_varint(3, 1)  # add_dummy_prefix
        + _field_varint(4, 1)  # remove_extra_whitespaces
        + _field_varint(5, 1)  # escape_whitespaces
    )
    model = b"".join(_field_bytes(1, p) for p in pieces)
    return model + _field_bytes(2, trainer) + _field_bytes(3, normalizer)


def chatglm_tokenizer(directory: pathlib.Path) -> ChatGLMTokenizer:
    """Build Kolors' ChatGLM tokenizer over ``sentencepiece_model_bytes`` written into directory.

    ChatGLMTokenizer only takes a file path and re-reads it on save_pretrained, so the
    directory must outlive the save.
    """
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    model_file = directory / "tokenizer.model"
    model_file.write_bytes(sentencepiece_model_bytes())
    return ChatGLMTokenizer(vocab_file=str(model_file), model_max_length=CHATGLM_MAX_LENGTH)
