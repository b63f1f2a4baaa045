"""In-memory tokenizers and matching text encoders for the group A tiny pipelines.

Group A: FLUX.1, Chroma, FLUX.2 klein, SD3.

Nothing here reads the Hugging Face hub: every vocabulary is built in code, so the tiny
pipelines build offline and byte-for-byte the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedModel, Qwen2Tokenizer, T5Tokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 2 * 256 + 2  # every byte, alone and word-final, plus BOS/EOS

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 512
_T5_CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)]
# pad, eos, unk, the bare word-start marker, then each char with and without the marker
T5_VOCAB_SIZE = 4 + 2 * len(_T5_CHARS)
_WORD_MARK = "\u2581"  # SentencePiece's word-start marker

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_THINK = ("<think>", "</think>")
QWEN_MAX_LENGTH = 512
QWEN_VOCAB_SIZE = 256 + len(QWEN_SPECIAL) + len(QWEN_THINK)

# What Qwen3's real template renders for one user turn with enable_thinking=False.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def byte_symbols() -> list[str]:
    """Return the 256 printable symbols GPT-2/CLIP/Qwen byte-level BPE uses for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer() -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer with no merges, so any text tokenizes without unk."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def clip_special_ids() -> tuple[int, int]:
    """Return (bos, eos) ids of clip_tokenizer(); the text encoder config must agree."""
    return CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1


def t5_tokenizer() -> T5Tokenizer:
    """Build a character-level Unigram T5 tokenizer: ASCII tokenizes, anything else is unk."""
    from transformers import T5Tokenizer

    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (_WORD_MARK, -2.0)]
    for char in _T5_CHARS:
        vocab += [(_WORD_MARK + char, -3.0), (char, -3.0)]
    # No sentinel <extra_id_*> tokens: only T5's span-corruption pretraining uses them.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """Build a byte-level Qwen2 tokenizer (no merges) with Qwen3's chat special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for token in (*QWEN_SPECIAL, *QWEN_THINK):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=QWEN_MAX_LENGTH,
        additional_special_tokens=list(QWEN_SPECIAL[1:]),
    )
    # Qwen3 has the think tags as single (non-special) tokens; match that.
    tokenizer.add_tokens([AddedToken(token, special=False) for token in QWEN_THINK])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Text encoders live here too: their vocabularies and special ids must match the tokenizers.


def clip_text_encoder(*, with_projection: bool, hidden_size: int = 32) -> PreTrainedModel:
    """Build a two-layer CLIP text encoder sized to clip_tokenizer()."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    bos, eos = clip_special_ids()
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def t5_encoder(d_model: int = 32) -> PreTrainedModel:
    """Build a two-layer T5 v1.1-style (gated-GELU) encoder sized to t5_tokenizer()."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)
