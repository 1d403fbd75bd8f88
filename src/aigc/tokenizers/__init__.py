"""Tokenizers: `char` and byte-level `bpe`, both stored as Hugging Face `tokenizer.json`.

tok = train_tokenizer("bpe", texts, vocab_size=2048)
tok.encode("hello") -> [ids]; tok.decode(ids) -> "hello"; tok.save_pretrained(dir)
load_tokenizer("dir_or_tokenizer.json")  # also music event tokenizers ("kind": "music")
"""

from pathlib import Path

from aigc.tokenizers.base import EOS, KINDS, Tokenizer, train_tokenizer
from aigc.tokenizers.base import load_tokenizer as _load_text_tokenizer
from aigc.tokenizers.char import UNK, UNKNOWN_POLICIES
from aigc.tokenizers.music import MusicTokenizer, is_music_tokenizer_file


def load_tokenizer(path: str | Path) -> Tokenizer | MusicTokenizer:
    """Load a `tokenizer.json` (or the one inside a directory): text kinds, or music events."""
    if is_music_tokenizer_file(path):
        return MusicTokenizer.load(path)
    return _load_text_tokenizer(path)


__all__ = [
    "EOS",
    "KINDS",
    "UNK",
    "UNKNOWN_POLICIES",
    "MusicTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
]
