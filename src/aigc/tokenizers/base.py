"""`Tokenizer`: one small API over both kinds (char, byte-level BPE), stored as HF `tokenizer.json`.

The kind and the unknown-character policy are read back from the JSON itself (model type,
pre-tokenizer, whether `<unk>` is in the vocabulary), so any `tokenizer.json` we wrote loads with
no sidecar file, and the same file loads in `transformers` (`save_pretrained`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from aigc.errors import AigcError
from aigc.tokenizers.bpe import DEFAULT_VOCAB_SIZE, is_bpe_tokenizer, train_bpe
from aigc.tokenizers.char import UNK, CharTable, Unknown, build_char_tokenizer, is_char_tokenizer
from aigc.utils.io import atomic_write_json, atomic_write_text

EOS = "<|endoftext|>"
KINDS = ("char", "bpe")
Kind = Literal["char", "bpe"]


class Tokenizer:
    """A trained tokenizer: `encode`/`decode`, its `id` (content hash), save and export."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        spec = json.loads(hf.to_str())
        if is_char_tokenizer(spec):
            self.kind: Kind = "char"
        elif is_bpe_tokenizer(spec):
            self.kind = "bpe"
        else:
            raise AigcError(
                "tokenizer.json is neither an AIGC char tokenizer (WordLevel over single characters) nor a "
                "byte-level BPE; train one with `aigc data prepare`"
            )
        vocab = hf.get_vocab(with_added_tokens=True)
        self.special_tokens = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
        self.unknown: Unknown = "unk" if self.kind == "char" and UNK in vocab else "error"
        self.eos_token = EOS if EOS in vocab else None
        self.eos_id: int | None = vocab.get(EOS)
        # Short content hash of the canonical JSON: same vocabulary and rules -> same id.
        canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self.id = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        self._table = None
        if self.kind == "char":
            fuse = (spec.get("decoder") or {}).get("type") == "Fuse"  # (decoding joins the strings)
            self._table = CharTable(vocab, self.special_tokens, joins=fuse)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, id={self.id!r})"

    # ------------------------------------------------------------------ encode / decode

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of `text` as an int64 array (the fast path data preparation uses)."""
        if self._table is not None:
            return self._table.encode(text)
        return np.asarray(self.hf.encode(text).ids, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        if self._table is not None:
            return self._table.encode_list(text)
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode several texts; BPE runs them in parallel in Rust."""
        if self._table is not None:
            return [self._table.encode(t) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept, so `decode(encode(s)) == s` for any text."""
        if self._table is not None and isinstance(ids, list):
            text = self._table.decode_list(ids)
            if text is not None:
                return text
        ids = [int(i) for i in ids]
        n = self.vocab_size  # once: a call into the Rust tokenizer, and streams decode per token
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise AigcError(f"token id {bad[0]} is out of range; this tokenizer has ids 0..{n - 1}")
        return self.hf.decode(ids, skip_special_tokens=False)

    def token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    # ------------------------------------------------------------------ save / export

    def to_json(self) -> str:
        return self.hf.to_str(pretty=True)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (to `path`, or into `path` if it is a directory) atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return atomic_write_text(path, self.to_json())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write files `transformers.AutoTokenizer.from_pretrained(directory)` loads as-is."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory / "tokenizer.json")
        config: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # Exact round trips: no space clean-up, no automatic BOS/EOS.
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1_000_000_000,
            "aigc_tokenizer_kind": self.kind,
            "aigc_unknown": self.unknown,
        }
        if self.eos_token is not None:
            config["eos_token"] = self.eos_token
        if self.kind == "char" and self.unknown == "unk":
            config["unk_token"] = UNK
        atomic_write_json(directory / "tokenizer_config.json", config)
        return directory


# ---------------------------------------------------------------------- build / load


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    unknown: Unknown = "error",
    special_tokens: list[str] | None = None,
) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts` (an iterable, consumed once).

    char: the vocabulary is the characters of `texts` (+ `special_tokens`, + `<unk>` if
    `unknown="unk"`); `vocab_size` must be left None. bpe: byte-level BPE of `vocab_size` tokens
    (default 2048) with `special_tokens` (default `<|endoftext|>`).
    """
    if kind not in KINDS:
        raise AigcError(f"unknown tokenizer {kind!r}; valid tokenizers: {', '.join(KINDS)}")
    if kind == "char":
        if vocab_size is not None:
            raise AigcError(
                "--vocab-size applies to --tokenizer bpe only; a char tokenizer's vocabulary is the "
                "characters found in the data"
            )
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        for tok in special_tokens or []:
            chars.discard(tok)  # a one-character special token stays special
        if not chars:
            raise AigcError("cannot build a char tokenizer from empty text; give it some data")
        return Tokenizer(build_char_tokenizer(chars, special_tokens, unknown))
    if unknown != "error":
        raise AigcError("--unknown unk applies to --tokenizer char only; byte-level BPE encodes any text")
    specials = [EOS] if special_tokens is None else special_tokens
    return Tokenizer(train_bpe(texts, vocab_size or DEFAULT_VOCAB_SIZE, specials))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` file, or the one inside a directory."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise AigcError(
            f"no tokenizer found at {file}; expected a tokenizer.json file or a directory holding one"
        )
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser's message names the JSON problem
        raise AigcError(
            f"{file} is not a valid tokenizer.json ({e}); re-create it with `aigc data prepare`"
        ) from None
    return Tokenizer(hf)
