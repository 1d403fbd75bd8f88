"""Byte-level BPE (GPT-2, Radford et al. 2019), trained on the user's data with HF `tokenizers`.

Byte-level means the base alphabet is the 256 byte values, so any UTF-8 text encodes and decodes
back exactly: no unknown token, no normalizer (NFC happens in data cleaning, not here), no prefix
space. Special tokens (`<|endoftext|>` separates documents) come first in the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from aigc.errors import AigcError

BYTE_ALPHABET = 256
DEFAULT_VOCAB_SIZE = 2048
MIN_FREQUENCY = 2  # a merge must be seen at least twice: a pair seen once teaches nothing


def build_bpe_trainer(vocab_size: int, special_tokens: list[str]) -> trainers.BpeTrainer:
    smallest = BYTE_ALPHABET + len(special_tokens)
    if vocab_size < smallest:
        raise AigcError(
            f"--vocab-size {vocab_size} is smaller than the byte alphabet: byte-level BPE needs at least "
            f"{smallest} ({BYTE_ALPHABET} bytes + {len(special_tokens)} special token(s)); "
            f"use --vocab-size {smallest} or more (e.g. {DEFAULT_VOCAB_SIZE})"
        )
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> HFTokenizer:
    """Train a byte-level BPE of exactly `vocab_size` tokens on `texts` (streamed, not held in RAM)."""
    trainer = build_bpe_trainer(vocab_size, special_tokens)  # checks the size before reading any data
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainer)
    got = hf.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise AigcError(
            f"--vocab-size {vocab_size} is larger than the data supports: training ran out of byte pairs "
            f"seen at least {MIN_FREQUENCY} times at {got} tokens; use --vocab-size {got} or less, or more data"
        )
    return hf


def is_bpe_tokenizer(spec: dict) -> bool:
    """Does a parsed tokenizer.json describe a byte-level BPE (ours or GPT-2 style)?"""
    pre = spec.get("pre_tokenizer") or {}
    return spec.get("model", {}).get("type") == "BPE" and pre.get("type") == "ByteLevel"
