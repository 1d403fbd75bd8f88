"""Tokenizers: `char` and byte-level `bpe`, both stored as Hugging Face `tokenizer.json`.

tok = train_tokenizer("bpe", texts, vocab_size=2048)
tok.encode("hello") -> [ids]; tok.decode(ids) -> "hello"; tok.save_pretrained(dir)
load_tokenizer("dir_or_tokenizer.json")
"""

from aigc.tokenizers.base import EOS, KINDS, Tokenizer, load_tokenizer, train_tokenizer
from aigc.tokenizers.char import UNK, UNKNOWN_POLICIES

__all__ = ["EOS", "KINDS", "UNK", "UNKNOWN_POLICIES", "Tokenizer", "load_tokenizer", "train_tokenizer"]
