"""Text data preparation: source -> cleaned documents -> split -> tokenizer -> train.bin / val.bin.

The corpus is read in three streaming passes, never held in memory as a whole:
  1. clean every document, count characters, give each document a split key (and collect the
     character set for a char tokenizer);
  2. train the tokenizer on the train split only (BPE; a char vocabulary comes from pass 1), or
     reuse a given one as is (`tokenizer="runs/x"`: a run's, to fine-tune it with `--init-from`);
  3. encode in batches of chunks and append the ids to `train.bin` / `val.bin`.

Split (deterministic):
  - one document: contiguous, the first (1 - val_fraction) of its characters train, the rest
    validate (nanoGPT's `shakespeare_char/prepare.py`);
  - several documents: the `round(val_fraction * n)` documents with the smallest seeded content hash
    validate (at least one, never all), so the split does not depend on file order and a
    document always lands in the same split for a given seed. Each document is followed by
    `<|endoftext|>` (the tokenizer's eos), so a model learns where documents end.

Everything is built in a staging directory and moved into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aigc.config import resolve, save_config, to_dict
from aigc.data.clean import Cleaner
from aigc.data.sources import BUILTINS, Source, open_source
from aigc.errors import AigcError
from aigc.utils.io import atomic_write_json, building_dir, prepare_out_dir, read_json

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 16  # encode long documents in pieces of about this many characters
BATCH_CHARS = 1 << 21  # characters per encode_batch call
FLUSH_TOKENS = 1 << 20  # ids buffered per split before they are appended to the .bin file
TEXT_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
UNSEEN_SHOWN = 5  # unseen characters an error names


@dataclass
class DataConfig:
    """How to turn a text source into tokenized train/val arrays (saved as config.json)."""

    source: str = ""  # a file, a directory, a JSON Lines file or a built-in name (`aigc data list`)
    kind: Literal["text"] = "text"
    tokenizer: str = "char"  # char | bpe (trained here), or a run directory / tokenizer.json to reuse
    vocab_size: int | None = None  # bpe only (default 2048); a char vocabulary comes from the data
    field: str | None = None  # JSON Lines: the field holding the text (dotted for nested: a.b)
    glob: str | None = None  # directory sources: which files (default all, recursively)
    blocks: bool = False  # text files: one document per blank-line separated block
    val_fraction: float = 0.1
    seed: int = 1337  # for the document-level split
    dedup: bool = False  # drop exact duplicate documents (after cleaning)
    scrub_pii: bool = True  # mask e-mails, phone numbers and long digit runs (privacy: on by default)
    unknown: Literal["error", "unk"] = "error"  # char: unseen characters at encode time
    max_bytes: int | None = None  # stop after this many UTF-8 bytes of cleaned text

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive number, got {self.vocab_size}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {self.max_bytes}")


# ---------------------------------------------------------------------- pass helpers


class _Corpus:
    """The cleaned documents of a source, readable any number of times in the same order."""

    def __init__(self, src: Source, cfg: DataConfig, cap: int | None) -> None:
        self.src, self.cfg, self.cap = src, cfg, cap
        self.cleaner = Cleaner()
        self.truncated = False  # did the last pass stop at `cap`?

    def texts(self, on_file: Callable[[str, str], None] | None = None) -> Iterator[str]:
        """Clean documents in a fixed order; stop (cutting the last one) after `cap` UTF-8 bytes."""
        self.cleaner = Cleaner(dedup=self.cfg.dedup, scrub=self.cfg.scrub_pii)
        self.truncated = False
        used = 0
        docs = self.src.documents(on_file)
        try:
            for raw in docs:
                text = self.cleaner(raw)
                if text is None:
                    continue
                if self.cap is not None:
                    size = len(text.encode("utf-8"))
                    if used + size > self.cap:
                        # cut at the last line break that fits, so the corpus does not end mid-line
                        head = text.encode("utf-8")[: self.cap - used].decode("utf-8", errors="ignore")
                        head = head[: head.rfind("\n") + 1] or head
                        self.truncated = True
                        if head.strip():
                            yield head
                        return
                    used += size
                yield text
        finally:
            docs.close()  # now, not at garbage collection: the source reports the file it was in


@dataclass
class _Scan:
    """What pass 1 learns about the corpus, and the split it implies."""

    documents: int = 0
    chars: int = 0
    charset: set[str] = field(default_factory=set)
    keys: list[int] = field(default_factory=list)  # split key per kept document
    files: int = 0
    source_hash: str = ""
    cut: int = 0  # single document: characters that go to train
    val_mask: np.ndarray | None = None  # several documents: True = validation

    @property
    def single(self) -> bool:
        return self.documents == 1


def _scan(corpus: _Corpus, cfg: DataConfig, chars: bool, specials: list[str] | None = None) -> _Scan:
    """Pass 1: count, hash the source, collect split keys (and, when `chars`, the characters that
    are not inside a `specials` string: those encode as their special token, not char by char)."""
    scan = _Scan()
    file_hashes: list[str] = []

    def on_file(name: str, sha256: str) -> None:
        file_hashes.append(f"{name}\0{sha256}\n")

    for text in corpus.texts(on_file):
        scan.documents += 1
        scan.chars += len(text)
        scan.keys.append(_split_key(text, cfg.seed))
        if chars:
            for tok in specials or []:
                if tok in text:
                    text = text.replace(tok, "")
            scan.charset.update(text)
    scan.files = len(file_hashes)
    if len(file_hashes) == 1:  # one file: its plain sha256, comparable with published checksums
        scan.source_hash = file_hashes[0].split("\0")[1].strip()
    else:
        scan.source_hash = hashlib.sha256("".join(file_hashes).encode()).hexdigest()
    stats = corpus.cleaner.stats
    if scan.chars == 0:
        raise AigcError(
            f"the corpus is empty: {corpus.src.description} holds no text after cleaning "
            f"({stats.documents_in} documents read, {stats.empty_removed} empty, "
            f"{stats.duplicates_removed} duplicates); give a source with text in it"
        )
    if scan.single:
        scan.cut = int(scan.chars * (1 - cfg.val_fraction))
        if scan.cut == 0:
            raise AigcError(f"the corpus is too small to split: {scan.chars} characters; give more text")
    else:
        scan.val_mask = _val_mask(scan.keys, cfg.val_fraction)
    return scan


def _splits(corpus: _Corpus, scan: _Scan, only: str | None = None) -> Iterator[tuple[str, str]]:
    """(split, text) of every document in order; a single document is cut at `scan.cut` chars."""
    for i, text in enumerate(corpus.texts()):
        if scan.single:
            if only in (None, "train"):
                yield "train", text[: scan.cut]
            if only in (None, "val") and scan.cut < len(text):
                yield "val", text[scan.cut :]
        else:
            split = "val" if scan.val_mask[i] else "train"
            if only in (None, split):
                yield split, text


def _split_key(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little")


def _val_mask(keys: list[int], val_fraction: float) -> np.ndarray:
    """True for documents that go to validation: the k smallest keys (ties broken by position)."""
    n = len(keys)
    k = round(val_fraction * n)
    if val_fraction > 0:
        k = min(max(k, 1), n - 1)
    order = np.lexsort((np.arange(n), np.array(keys, dtype=np.uint64)))
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text into pieces of about `size` characters where BPE pre-tokenization is unchanged.

    A cut goes right after a newline that sits between two non-space characters: the byte-level
    pre-tokenizer (GPT-2 regex) always makes such a newline a token of its own, so encoding the
    pieces gives the same ids as encoding the whole text.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while True:
            nl = text.find("\n", cut, start + 4 * size)
            if nl < 0:
                break
            if not text[nl - 1].isspace() and nl + 1 < len(text) and not text[nl + 1].isspace():
                break
            cut = nl + 1
        if nl < 0:
            break  # no safe cut nearby: keep the rest whole
        pieces.append(text[start : nl + 1])
        start = nl + 1
    pieces.append(text[start:])
    return pieces


class _BinWriter:
    """Appends ids to a .bin file in large blocks; counts tokens, characters and bytes."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self.dtype = dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = self.tokens = self.chars = self.bytes = self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        if self.buffered >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            np.concatenate(self.buffer).astype(self.dtype).tofile(self.file)
        self.buffer, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.file.close()


def _encode(tok: Any, splits: Iterator[tuple[str, str]], writers: dict[str, _BinWriter], eos: bool) -> None:
    """Pass 3: encode in batches of chunks (parallel in Rust for BPE), append ids, count text."""
    eos_ids = np.array([tok.eos_id if eos else 0], dtype=np.int64)
    batch: list[tuple[str, str, bool]] = []  # (split, piece, ends a document)

    def flush() -> None:
        for (split, piece, last), ids in zip(batch, tok.encode_batch([p for _, p, _ in batch]), strict=True):
            w = writers[split]
            w.add(ids)
            w.chars += len(piece)
            w.bytes += len(piece.encode("utf-8"))
            if last:
                w.documents += 1
                if eos:
                    w.add(eos_ids)
        batch.clear()

    batched = 0
    for split, text in splits:
        pieces = _chunks(text)
        for j, piece in enumerate(pieces):
            batch.append((split, piece, j == len(pieces) - 1))
            batched += len(piece)
        if batched >= BATCH_CHARS:
            flush()
            batched = 0
    flush()


# ---------------------------------------------------------------------- prepare


def prepare_text(
    source: str,
    out: str | Path,
    config: DataConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
    download: bool = False,
    url: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare `source` into `out/` (train.bin, val.bin, tokenizer.json, meta.json, config.json).

    `config` (or the defaults) is updated by `overrides` (`["tokenizer=bpe", "vocab_size=1024"]`).
    `tokenizer` other than char / bpe names a run directory or a tokenizer.json to encode with as is
    (no new vocabulary), so a model trained on it can be fine-tuned or evaluated on this data.
    Returns the meta dict. Raises AigcError for bad input; nothing is left half-written.
    """
    from aigc.tokenizers import EOS, KINDS, train_tokenizer
    from aigc.tokenizers.bpe import DEFAULT_VOCAB_SIZE, build_bpe_trainer

    cfg = resolve(
        DataConfig, base={**(to_dict(config) if config else {}), "source": source}, overrides=overrides
    )
    say = log or (lambda _msg: None)
    out = prepare_out_dir(out, overwrite=overwrite)
    if cfg.vocab_size is not None and cfg.tokenizer == "char":
        raise AigcError(
            "--vocab-size applies to --tokenizer bpe only; a char vocabulary is the data's characters"
        )
    if cfg.unknown != "error" and cfg.tokenizer == "bpe":
        raise AigcError("--unknown unk applies to --tokenizer char only; byte-level BPE encodes any text")
    if cfg.tokenizer == "bpe" and cfg.vocab_size is not None:
        build_bpe_trainer(cfg.vocab_size, [EOS])  # too small for the byte alphabet: fail before reading
    given, given_file = None, None  # a tokenizer to reuse, and its file
    if cfg.tokenizer not in KINDS:
        given, given_file = _given_tokenizer(cfg.tokenizer, cfg)
        cfg.tokenizer = str(given_file)  # config.json says which file, wherever it is read from
    src = open_source(source, field=cfg.field, glob=cfg.glob, blocks=cfg.blocks, download=download, url=url)
    # never read our own output back in (`prepare . --out ./data --overwrite`)
    src.files = [f for f in src.files if not f.resolve().is_relative_to(out.resolve())]
    cap = cfg.max_bytes if cfg.max_bytes is not None else getattr(BUILTINS.get(source), "max_bytes", None)
    corpus = _Corpus(src, cfg, cap)

    # 1. scan
    say(f"reading {src.description}")
    reuse_chars = given is not None and given.kind == "char"
    keep_whole = given.special_tokens if reuse_chars else None
    scan = _scan(corpus, cfg, chars=cfg.tokenizer == "char" or reuse_chars, specials=keep_whole)
    stats, truncated = corpus.cleaner.stats, corpus.truncated

    # 2. tokenizer: the given one as is; a char vocabulary from the scan; BPE trained on train only
    eos = not scan.single  # several documents: each ends with <|endoftext|>
    if given is not None:
        tok = given
        if reuse_chars:
            masked = stats.emails + stats.phones + stats.digit_runs > 0
            _check_charset(scan.charset, tok, given_file, src.description, say, masked)
        if eos and tok.eos_id is None:
            eos = False
            say(f"note: the tokenizer has no {EOS}: the {scan.documents} documents are joined without it")
    elif cfg.tokenizer == "char":
        specials = [] if scan.single else [EOS]
        tok = train_tokenizer("char", ["".join(scan.charset)], special_tokens=specials, unknown=cfg.unknown)
    else:
        say(f"training a byte-level BPE of {cfg.vocab_size or DEFAULT_VOCAB_SIZE} tokens")
        texts = (piece for _, text in _splits(corpus, scan, "train") for piece in _chunks(text))
        tok = train_tokenizer("bpe", texts, vocab_size=cfg.vocab_size, special_tokens=[EOS])
    # little-endian on every machine, as the format says; uint16 halves the file when the vocab fits
    dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")

    # 3. encode into a staging directory, moved into place when complete
    where = f" from {given_file}" if given_file else ""
    say(f"encoding {scan.chars:,} characters with a {tok.kind} tokenizer of {tok.vocab_size:,} tokens{where}")
    with building_dir(out) as stage:
        writers = {s: _BinWriter(stage / f"{s}.bin", dtype) for s in ("train", "val")}
        try:
            _encode(tok, _splits(corpus, scan), writers, eos=eos)
        finally:
            for w in writers.values():
                w.close()
        train, val = writers["train"], writers["val"]
        if train.tokens == 0:
            raise AigcError("the train split is empty; give more text or a smaller --val-fraction")
        meta = {
            "kind": "text",
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer": {
                "kind": tok.kind,
                "id": tok.id,
                "eos_id": tok.eos_id,
                "unknown": tok.unknown,
                **({"from": str(given_file)} if given_file else {}),  # reused, not trained here
            },
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_chars": train.chars,
            "val_chars": val.chars,
            "train_bytes": train.bytes,
            "val_bytes": val.bytes,
            "chars_per_token": round((train.chars + val.chars) / (train.tokens + val.tokens), 4),
            "documents": scan.documents,
            "train_documents": 1 if scan.single else train.documents,
            "val_documents": int(val.tokens > 0) if scan.single else val.documents,
            "split": (
                f"single document: first {1 - cfg.val_fraction:g} of its characters train, the rest val"
                if scan.single
                else f"by document: the {cfg.val_fraction:g} with the smallest seeded content hash are val"
            ),
            "source": source if source in BUILTINS else str(Path(source).resolve()),
            "source_description": src.description,
            "source_files": scan.files,
            "source_hash": scan.source_hash,
            "cleaning": {
                "newlines": "LF",
                "unicode": "NFC",
                "dedup": cfg.dedup,
                "scrub_pii": cfg.scrub_pii,
                **asdict(stats),
                "skipped_files": list(src.skipped),
                "max_bytes": cap,
                "truncated": truncated,
            },
        }
        tok.save_pretrained(stage)
        if given_file is not None:  # the very file: its id is what --init-from and eval compare
            shutil.copyfile(given_file, stage / "tokenizer.json")
        atomic_write_json(stage / "meta.json", meta)
        save_config(cfg, stage / "config.json")
    say(f"wrote {out}")
    return meta


def _given_tokenizer(value: str, cfg: DataConfig) -> tuple[Any, Path]:
    """(tokenizer, its resolved tokenizer.json) of `--tokenizer PATH`: a run directory or the file."""
    from aigc.tokenizers import KINDS
    from aigc.tokenizers.base import load_tokenizer
    from aigc.tokenizers.music import is_music_tokenizer_file

    allowed = f"give {' or '.join(KINDS)}, a run directory holding tokenizer.json, or a tokenizer.json file"
    path = Path(value).expanduser()
    if not path.exists():
        raise AigcError(f"--tokenizer {value}: no such file or directory; {allowed}")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise AigcError(f"--tokenizer {value}: the directory holds no tokenizer.json; {allowed}")
    if is_music_tokenizer_file(file):
        raise AigcError(f"--tokenizer {value} is a music tokenizer; text data needs a char or bpe one")
    try:
        tok = load_tokenizer(file)
    except AigcError as e:
        raise AigcError(f"--tokenizer {value}: {e}") from None
    if cfg.vocab_size is not None:
        raise AigcError(
            f"--vocab-size applies when training a BPE; the tokenizer from {file} is reused as is, with its "
            f"{tok.vocab_size:,} tokens: drop --vocab-size"
        )
    if cfg.unknown == "unk" and tok.unknown != "unk":
        raise AigcError(
            f"--unknown unk: the {tok.kind} tokenizer at {file} has no <unk> token and is reused as is; "
            "drop --unknown, or use --tokenizer char to build a new vocabulary"
        )
    return tok, file.resolve()


def _check_charset(
    charset: set[str], tok: Any, file: Path, source: str, say: Callable[[str], None], masked: bool = False
) -> None:
    """A reused char tokenizer meets the corpus: unseen characters map to <unk> or are an error.
    `masked`: PII masking put [EMAIL] / [PHONE] / [NUMBER] in the text (their letters count too)."""
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    unseen = sorted(c for c in charset if c not in vocab)
    if not unseen:
        return
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unseen[:UNSEEN_SHOWN])
    more = f" and {len(unseen) - UNSEEN_SHOWN} more" if len(unseen) > UNSEEN_SHOWN else ""
    if tok.unknown == "unk":
        say(f"{len(unseen)} character(s) not in the tokenizer's vocabulary map to <unk>: {shown}{more}")
        return
    raise AigcError(
        f"{len(unseen)} character(s) of {source} are not in the char tokenizer at {file}: {shown}{more}; "
        "remove them from the source, or prepare with --tokenizer char for a new vocabulary (a model "
        "trained on another vocabulary cannot be fine-tuned on it)"
        + (
            "; PII masks such as [NUMBER] count too: --no-scrub-pii keeps the text as written"
            if masked
            else ""
        )
    )


# ---------------------------------------------------------------------- load


@dataclass
class PreparedText:
    """A prepared text data set: token arrays (memory-mapped), tokenizer, meta and config."""

    path: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    train: np.ndarray
    val: np.ndarray
    tokenizer: Any  # aigc.tokenizers.Tokenizer


def _memmap(path: Path, dtype: np.dtype, expected: int) -> np.ndarray:
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        raise AigcError(
            f"{path} holds {size} bytes but meta.json says {expected} {dtype.name} tokens "
            f"({expected * dtype.itemsize} bytes); the data set is damaged: prepare it again"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # an empty file cannot be memory-mapped
    return np.memmap(path, dtype=dtype, mode="r")


def load_prepared(directory: str | Path, kind: str = "text") -> PreparedText:
    """Open a directory written by `prepare_text` (`aigc data prepare`); `kind` is the data kind
    expected in its meta.json (prepared music uses the same layout)."""
    from aigc.tokenizers import load_tokenizer

    path = Path(directory)
    if not path.is_dir():
        raise AigcError(f"{path} is not a directory; give the --out directory of `aigc data prepare`")
    missing = [name for name in TEXT_FILES if not (path / name).is_file()]
    if missing:
        raise AigcError(
            f"{path} is not a prepared {kind} data set: missing {', '.join(missing)}; "
            "create one with `aigc data prepare SOURCE --out DIR`"
        )
    try:
        meta = read_json(path / "meta.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AigcError(f"{path / 'meta.json'} is not valid JSON ({e}); prepare the data set again") from None
    if meta.get("kind") != kind:
        raise AigcError(f"{path} holds {meta.get('kind')!r} data, not {kind}; give a {kind} data set")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AigcError(
            f"{path} has format version {meta.get('format_version')}, this aigc reads {FORMAT_VERSION}; "
            "prepare the data set again"
        )
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise AigcError(
            f"{path / 'meta.json'}: dtype {meta.get('dtype')!r} is not uint16 or uint32; prepare again"
        )
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    return PreparedText(
        path=path,
        meta=meta,
        config=config,
        train=_memmap(path / "train.bin", dtype, meta["train_tokens"]),
        val=_memmap(path / "val.bin", dtype, meta["val_tokens"]),
        tokenizer=load_tokenizer(path / "tokenizer.json"),
    )


def describe(directory: str | Path, sample_tokens: int = 200) -> tuple[dict[str, Any], str]:
    """(meta, decoded text of the first `sample_tokens` train tokens) for `aigc data show`."""
    data = load_prepared(directory)
    sample = data.tokenizer.decode(np.asarray(data.train[:sample_tokens]).tolist())
    return data.meta, sample
