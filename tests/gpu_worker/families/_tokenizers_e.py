"""In-memory tokenizers for the group E tiny pipelines (AuraFlow, CogView4, HiDream-I1).

Nothing here reads the Hugging Face hub: every vocabulary is built in code, so the tiny
pipelines build offline and byte-for-byte the same everywhere. Each builder covers every
input text (byte-level or byte-fallback vocabularies) except the T5 one, which maps characters
outside printable ASCII to ``<unk>`` as a real SentencePiece T5 does for unseen characters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, T5Tokenizer

WORD_MARK = "\u2581"  # SentencePiece's word-start marker

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_VOCAB_SIZE = 2 * 256 + 2  # every byte, alone and word-final, plus BOS/EOS

SP_UNK, SP_BOS, SP_EOS, SP_PAD = "<unk>", "<s>", "</s>", "<pad>"
SP_VOCAB_SIZE = 4 + 256 + 1  # specials, <0xNN> byte pieces, the bare word marker

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_T5_CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)]
T5_VOCAB_SIZE = 4 + 2 * len(_T5_CHARS)  # specials, bare marker, each char with and without it


def byte_symbols() -> list[str]:
    """Return the 256 printable symbols GPT-2/CLIP/tiktoken byte-level BPE uses for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer(model_max_length: int) -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer with no merges, so any text tokenizes without unk."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


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


def t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """Build a T5 Unigram tokenizer over printable ASCII with no sentinel tokens."""
    from transformers import T5Tokenizer

    # T5Tokenizer's Unigram model hard-codes unk_id=2, so the specials keep T5's order.
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (WORD_MARK, -2.0)]
    vocab += [(c, -3.0) for c in _T5_CHARS]
    vocab += [(WORD_MARK + c, -2.5) for c in _T5_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


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
