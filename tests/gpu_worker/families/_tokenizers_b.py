"""Tokenizers built in code, without the hub, for the group-B family builders.

``clip_tokenizer`` is a byte-level CLIP BPE with no merges (SDXL, Stable Cascade).
``chatglm_tokenizer`` is Kolors' ChatGLM tokenizer over a hand-written sentencepiece model.
"""

from __future__ import annotations

import pathlib
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.pipelines.kolors import ChatGLMTokenizer
    from transformers import CLIPTokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_VOCAB_SIZE = 2 * 256 + 2  # every byte, alone and word-final, plus BOS/EOS
CLIP_BOS_ID = CLIP_VOCAB_SIZE - 2
CLIP_EOS_ID = CLIP_VOCAB_SIZE - 1
CLIP_MAX_LENGTH = 77

# sentencepiece ids: <unk>, <s>, </s>, the 256 byte-fallback pieces, then "▁" and printable ASCII.
SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2
_SP_CHARS = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
SP_VOCAB_SIZE = 3 + 256 + len(_SP_CHARS)
# ChatGLMTokenizer appends nine special tokens ([MASK], [gMASK], sop, roles...) after these ids.
CHATGLM_VOCAB_SIZE = SP_VOCAB_SIZE + 9
# len() counts get_vocab(), where ChatGLM names <unk>, <s> and </s> all "": three ids, one entry.
CHATGLM_LEN = CHATGLM_VOCAB_SIZE - 2
CHATGLM_MAX_LENGTH = 256


def _byte_symbols() -> list[str]:
    """Return the 256 printable symbols GPT-2/CLIP byte-level BPE uses for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer with no merges, so any text tokenizes without unk."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_text_config_kwargs() -> dict[str, Any]:
    """Return the CLIPTextConfig ids matching ``clip_tokenizer`` (pooling finds EOS by id)."""
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "bos_token_id": CLIP_BOS_ID,
        "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": CLIP_EOS_ID,
    }


# --- sentencepiece ModelProto, written by hand: protobuf (for sentencepiece_model_pb2) is not
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
