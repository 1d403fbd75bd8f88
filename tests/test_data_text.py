"""Text data preparation: sources, cleaning, split, streamed .bin output, built-ins, bad input."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from aigc.data import load_prepared, prepare_text
from aigc.data.clean import Cleaner, normalize, scrub_pii
from aigc.data.sources import (
    SHAKESPEARE_SHA256,
    builtin_status,
    download_builtin,
    read_lines,
    split_blocks,
    stdlib_files,
)
from aigc.data.text import _chunks
from aigc.errors import AigcError, ConfigError
from aigc.tokenizers import EOS, train_tokenizer


def read_back(out: Path) -> tuple[str, str]:
    data = load_prepared(out)
    return data.tokenizer.decode(data.train.tolist()), data.tokenizer.decode(data.val.tolist())


def nothing_written(out: Path) -> bool:
    """The output does not exist and no staging directory was left beside it."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def docs_dir(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(20):
        folder = root / "sub" if i % 2 else root
        (folder / f"doc{i:02d}.txt").write_text(
            f"Document number {i}.\nIt has two lines, {i * 7}.\n", encoding="utf-8"
        )
    (root / ".hidden.txt").write_text("hidden files are skipped\n", encoding="utf-8")
    (root / "notes.md").write_text("markdown, excluded by --glob\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------- real corpora (data_root)


def test_shakespeare_char_matches_nanogpt(data_root, tmp_path):
    path = data_root / "text" / "tinyshakespeare.txt"
    meta = prepare_text(str(path), tmp_path / "out")
    assert meta["vocab_size"] == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert meta["source_hash"] == SHAKESPEARE_SHA256 and meta["dtype"] == "uint16"
    # nanoGPT shakespeare_char/prepare.py, verbatim logic
    text = path.read_text(encoding="utf-8")
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    n = len(text)
    data = load_prepared(tmp_path / "out")
    assert np.array_equal(data.train, [stoi[c] for c in text[: int(n * 0.9)]])
    assert np.array_equal(data.val, [stoi[c] for c in text[int(n * 0.9) :]])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tokenizer"] == "char"


@pytest.mark.slow
def test_shakespeare_bpe_reports_chars_per_token(data_root, tmp_path):
    path = data_root / "text" / "tinyshakespeare.txt"
    meta = prepare_text(str(path), tmp_path / "out", overrides=["tokenizer=bpe", "vocab_size=1024"])
    assert meta["vocab_size"] == 1024 and meta["tokenizer"]["kind"] == "bpe"
    assert 2.0 < meta["chars_per_token"] < 4.0
    train, val = read_back(tmp_path / "out")
    text = path.read_text(encoding="utf-8")
    assert train + val == text and len(train) == int(len(text) * 0.9)
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode("utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_tang_poems_prepare_and_round_trip(data_root, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("AIGC_DATA_PATH", str(data_root))
    overrides = ["tokenizer=bpe", "vocab_size=2048"] if tokenizer == "bpe" else []
    meta = prepare_text("tang-poems", tmp_path / "out", overrides=overrides)
    assert meta["documents"] == 12_950
    assert meta["train_documents"] + meta["val_documents"] == 12_950 and meta["val_documents"] == 1295
    train, val = read_back(tmp_path / "out")
    poems = train.split(EOS)[:-1] + val.split(EOS)[:-1]
    text = (data_root / "text" / "tang-poems.txt").read_text(encoding="utf-8")
    expected = [unicodedata.normalize("NFC", b) for b in text.strip().split("\n\n")]
    assert sorted(poems) == sorted(expected)


def test_tang_poems_file_as_one_document(data_root, tmp_path):
    path = data_root / "text" / "tang-poems.txt"
    meta = prepare_text(str(path), tmp_path / "out")
    text = unicodedata.normalize("NFC", path.read_text(encoding="utf-8"))
    assert meta["documents"] == 1 and meta["vocab_size"] == len(set(text))  # NFC merges one variant char
    assert "".join(read_back(tmp_path / "out")) == text


# ---------------------------------------------------------------------- sources


def test_single_file_contiguous_split(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    meta = prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides={"val_fraction": 0.25})
    train, val = read_back(tmp_path / "out")
    assert train == text[: int(len(text) * 0.75)] and val == text[int(len(text) * 0.75) :]
    assert meta["documents"] == 1 and meta["tokenizer"]["eos_id"] is None
    assert meta["train_chars"] + meta["val_chars"] == len(text) and meta["chars_per_token"] == 1.0


def test_directory_glob_recursive_split_by_document(docs_dir, tmp_path):
    meta = prepare_text(str(docs_dir), tmp_path / "out", overrides={"glob": "**/*.txt"})
    assert meta["documents"] == 20 and meta["source_files"] == 20  # hidden and .md left out
    assert (meta["train_documents"], meta["val_documents"]) == (18, 2)
    train, val = read_back(tmp_path / "out")
    docs = train.split(EOS)[:-1] + val.split(EOS)[:-1]
    assert sorted(docs) == sorted(p.read_text() for p in docs_dir.rglob("doc*.txt"))
    assert "hidden" not in train + val and "markdown" not in train + val
    # deterministic: the same bytes again; another seed moves documents
    prepare_text(str(docs_dir), tmp_path / "again", overrides={"glob": "**/*.txt"})
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    prepare_text(str(docs_dir), tmp_path / "seed", overrides={"glob": "**/*.txt", "seed": 7})
    assert read_back(tmp_path / "seed")[1] != val


def test_output_inside_the_source_directory_is_not_read_back(docs_dir):
    first = prepare_text(str(docs_dir), docs_dir / "prepared", overrides={"glob": "**/*.txt"})
    again = prepare_text(str(docs_dir), docs_dir / "prepared", overrides={"glob": "**/*"}, overwrite=True)
    assert again["source_files"] == first["source_files"] + 1  # notes.md, not train.bin & co


def test_split_ignores_document_order(tmp_path):
    texts = [f"poem {i}\nline of verse {i * 3}\n" for i in range(30)]
    (tmp_path / "fwd.txt").write_text("\n".join(texts), encoding="utf-8")
    (tmp_path / "rev.txt").write_text("\n".join(reversed(texts)), encoding="utf-8")
    prepare_text(str(tmp_path / "fwd.txt"), tmp_path / "a", overrides={"blocks": True})
    prepare_text(str(tmp_path / "rev.txt"), tmp_path / "b", overrides={"blocks": True})
    val_a, val_b = read_back(tmp_path / "a")[1].split(EOS), read_back(tmp_path / "b")[1].split(EOS)
    assert sorted(val_a) == sorted(val_b) and len(val_a) == 4  # 3 poems + trailing ""


def test_jsonl_field_nested_and_list(tmp_path):
    rows = [
        {"text": f"row {i} text", "meta": {"body": f"nested {i}"}, "lines": ["a", f"b{i}"]} for i in range(10)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    prepare_text(str(tmp_path / "d.jsonl"), tmp_path / "o1", overrides={"field": "text"})
    train, val = read_back(tmp_path / "o1")
    assert sorted((train + val).split(EOS)[:-1]) == sorted(r["text"] for r in rows)
    prepare_text(str(tmp_path / "d.jsonl"), tmp_path / "o2", overrides={"field": "meta.body"})
    assert "nested 3" in "".join(read_back(tmp_path / "o2"))
    # a JSON array file, list-of-lines field (like tang-poems-300.json's `paragraphs`)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    prepare_text(str(tmp_path / "d.json"), tmp_path / "o3", overrides={"field": "lines"})
    assert "a\nb7" in "".join(read_back(tmp_path / "o3"))


def test_jsonl_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(AigcError, match=r"fields in the first record: text"):
        prepare_text(str(tmp_path / "d.jsonl"), tmp_path / "out")
    with pytest.raises(AigcError, match=r"d.jsonl:2: field 'text' is int, not text"):
        prepare_text(str(tmp_path / "d.jsonl"), tmp_path / "out", overrides={"field": "text"})
    with pytest.raises(AigcError, match=r"d.jsonl:1: no field 'body' \(fields there: text\)"):
        prepare_text(str(tmp_path / "d.jsonl"), tmp_path / "out", overrides={"field": "body"})
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(AigcError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_text(str(tmp_path / "bad.jsonl"), tmp_path / "out", overrides={"field": "text"})
    (tmp_path / "a.txt").write_text("plain\n", encoding="utf-8")
    with pytest.raises(AigcError, match="--field applies to JSON Lines"):
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides={"field": "text"})
    assert nothing_written(tmp_path / "out")


def test_read_lines_streams_in_blocks_with_exact_offsets(tmp_path):
    text = "短句\n" + "長" * 1000 + "\r\nend"  # a line much longer than the block, cut mid-character
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    digest = hashlib.sha256()
    lines = list(read_lines(path, digest, block=64))
    assert lines == ["短句\n", "長" * 1000 + "\r\n", "end"] and "".join(lines) == text
    assert digest.hexdigest() == hashlib.sha256(text.encode("utf-8")).hexdigest()
    bad = "長" * 100 + "x"
    path.write_bytes(bad.encode("utf-8").replace(b"x", b"\xc3("))  # bad sequence at byte 300
    with pytest.raises(AigcError, match="invalid byte 0xc3 at byte offset 300"):
        list(read_lines(path, block=64))
    path.write_bytes(b"ok\n" + "長".encode()[:2])  # file ends inside a character
    with pytest.raises(AigcError, match="invalid byte 0xe9 at byte offset 3"):
        list(read_lines(path, block=2))
    path.write_bytes(b"x" * 100 + b"\x00")
    with pytest.raises(AigcError, match="NUL byte at byte offset 100"):
        list(read_lines(path, block=16))


def test_split_blocks_streams_documents():
    lines = ["a\n", "b\r\n", "\r\n", "\n", "  \n", "\n", "c\n"]
    assert list(split_blocks(iter(lines))) == ["a\nb", "c"]


# ---------------------------------------------------------------------- cleaning


def test_normalize_newlines_nfc_bom():
    assert normalize("\ufeffa\r\nb\rc\n") == "a\nb\nc\n"
    assert normalize("e\u0301") == "\u00e9"
    assert normalize("已經 😀") == "已經 😀"


def test_scrub_pii_counts_and_masks():
    text = "Mail bob.smith@example.co.uk or call 555-123-4567 / +44 20 7946 0958; card 4111111111111111."
    out, counts = scrub_pii(text)
    assert counts == {"emails": 1, "phones": 2, "digit_runs": 1}
    assert "example" not in out and "4567" not in out and "4111" not in out
    kept = "On 2024-01-15 Python 3.11.7 sold 12345678 copies at 10 20 30."
    assert scrub_pii(kept) == (kept, {"emails": 0, "phones": 0, "digit_runs": 0})


def test_dedup_and_pii_reported_in_meta(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.txt").write_text(
            "same text\r\n" if i < 3 else f"write to u{i}@mail.org\n", encoding="utf-8"
        )
    (root / "blank.txt").write_text("  \n\n", encoding="utf-8")
    meta = prepare_text(str(root), tmp_path / "out", overrides={"dedup": True, "scrub_pii": True})
    c = meta["cleaning"]
    assert (c["duplicates_removed"], c["empty_removed"], c["emails"], meta["documents"]) == (2, 1, 3, 4)
    train, val = read_back(tmp_path / "out")
    assert "\r" not in train + val and "@mail.org" not in train + val and "[EMAIL]" in train + val
    assert Cleaner(dedup=False)("x") == "x"


# ---------------------------------------------------------------------- output format


def test_uint32_when_the_vocab_needs_it(tmp_path):
    # 70,000 distinct code points from planes 3-4 (no NFC decompositions there)
    text = "".join(chr(0x30000 + i) for i in range(70_000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    meta = prepare_text(str(tmp_path / "big.txt"), tmp_path / "out")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    data = load_prepared(tmp_path / "out")
    assert data.val.dtype == np.uint32 and int(data.val.max()) == 69_999
    assert "".join(read_back(tmp_path / "out")) == text


def test_bpe_chunking_gives_the_same_ids_as_whole_text():
    text = "".join(f"Line {i}:  spaced \n\n  indented {i}\t\n word{i}.\nNext\n" for i in range(300))
    tok = train_tokenizer("bpe", [text], vocab_size=300)
    pieces = _chunks(text, size=97)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_max_bytes_caps_the_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(1000)), encoding="utf-8")
    meta = prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides={"max_bytes": 500})
    assert meta["cleaning"]["truncated"] and 400 < meta["train_bytes"] + meta["val_bytes"] <= 500
    train, val = read_back(tmp_path / "out")
    assert (train + val).endswith("\n")
    again = prepare_text(str(tmp_path / "a.txt"), tmp_path / "again", overrides={"max_bytes": 500})
    assert again["source_hash"] == meta["source_hash"] and again["source_files"] == 1


def test_load_prepared_errors(tmp_path):
    with pytest.raises(AigcError, match="not a directory"):
        load_prepared(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text("{}", encoding="utf-8")
    with pytest.raises(AigcError, match="missing train.bin, val.bin, tokenizer.json"):
        load_prepared(tmp_path / "d")
    (tmp_path / "a.txt").write_text("some text here\n" * 20, encoding="utf-8")
    prepare_text(str(tmp_path / "a.txt"), tmp_path / "ok")
    with open(tmp_path / "ok" / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(AigcError, match="damaged"):
        load_prepared(tmp_path / "ok")


# ---------------------------------------------------------------------- built-ins


def test_python_stdlib_builtin_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_DATA_PATH", "")
    root, files = stdlib_files()
    assert files and not any("test" in p.relative_to(root).parts[:-1] for p in files)
    meta = prepare_text("python-stdlib", tmp_path / "out", overrides={"max_bytes": 300_000})
    assert meta["documents"] > 5 and meta["val_documents"] >= 1 and meta["cleaning"]["truncated"]
    train, _ = read_back(tmp_path / "out")
    assert "def " in train and "import " in train
    rows = {r["name"]: r for r in builtin_status()}
    assert rows["python-stdlib"]["available"] and not rows["shakespeare"]["available"]
    assert "tinyshakespeare.txt" in rows["shakespeare"]["where"]


def test_missing_builtin_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_DATA_PATH", str(tmp_path / "empty"))
    with pytest.raises(AigcError, match=r"'shakespeare' not found .*AIGC_DATA_PATH.*--download"):
        prepare_text("shakespeare", tmp_path / "out")
    with pytest.raises(AigcError, match=r"'tang-poems' not found"):
        prepare_text("tang-poems", tmp_path / "out")


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checksum_mismatch_saves_nothing(http_dir, tmp_path):
    www, base = http_dir
    (www / "input.txt").write_text("not shakespeare\n", encoding="utf-8")
    with pytest.raises(AigcError, match=r"sha256 .* expected 86c4e6aa.*nothing was saved"):
        download_builtin("shakespeare", url=f"{base}/input.txt")
    cache = tmp_path / "aigc-home" / "data" / "text"
    assert not cache.exists() or not any(cache.iterdir())
    with pytest.raises(AigcError, match="could not download shakespeare"):
        download_builtin("shakespeare", url=f"{base}/missing.txt")


def test_download_then_prepare_from_cache(http_dir, data_root, tmp_path, monkeypatch):
    www, base = http_dir
    monkeypatch.setenv("AIGC_DATA_PATH", "")
    (www / "input.txt").write_bytes((data_root / "text" / "tinyshakespeare.txt").read_bytes())
    meta = prepare_text("shakespeare", tmp_path / "out", download=True, url=f"{base}/input.txt")
    cached = tmp_path / "aigc-home" / "data" / "text" / "tinyshakespeare.txt"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    assert meta["vocab_size"] == 65 and meta["source_hash"] == SHAKESPEARE_SHA256
    (www / "input.txt").unlink()  # the second time the cache answers, no download
    prepare_text("shakespeare", tmp_path / "again", download=True, url=f"{base}/input.txt")


# ---------------------------------------------------------------------- bad input: one clear error, nothing on disk


def test_missing_path(tmp_path):
    with pytest.raises(AigcError, match="not found: no such file or directory"):
        prepare_text(str(tmp_path / "nope.txt"), tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_unknown_builtin_lists_valid_ones(tmp_path):
    with pytest.raises(
        AigcError, match="unknown built-in corpus 'shakspeare'; built-ins: python-stdlib, shakespeare"
    ):
        prepare_text("shakspeare", tmp_path / "out")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(AigcError, match="the corpus is empty"):
        prepare_text(str(tmp_path / "empty.txt"), tmp_path / "out")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(AigcError, match=r"the corpus is empty.*1 empty"):
        prepare_text(str(tmp_path / "d"), tmp_path / "out")
    with pytest.raises(
        AigcError, match=r"no files in .* match --glob '\*\.md'; .* end in \.txt: try --glob '\*\*/\*\.txt'"
    ):
        prepare_text(str(tmp_path / "d"), tmp_path / "out", overrides={"glob": "*.md"})
    (tmp_path / "e").mkdir()
    with pytest.raises(AigcError, match="holds no other files"):  # the hint never repeats the glob given
        prepare_text(str(tmp_path / "e"), tmp_path / "out", overrides={"glob": "**/*.txt"})
    assert nothing_written(tmp_path / "out")


def test_binary_and_non_utf8_files_name_file_and_offset(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"hello\x00world")
    with pytest.raises(AigcError, match=r"bin.dat looks binary: NUL byte at byte offset 5"):
        prepare_text(str(tmp_path / "bin.dat"), tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(AigcError, match=r"latin1.txt is not UTF-8 text: invalid byte 0xe9 at byte offset 3"):
        prepare_text(str(tmp_path / "latin1.txt"), tmp_path / "out")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("fine\n", encoding="utf-8")
    (d / "b.txt").write_bytes(b"ok\n" * 10 + b"\xff")
    with pytest.raises(AigcError, match=r"dir/b.txt is not UTF-8 text: invalid byte 0xff at byte offset 30"):
        prepare_text(str(d), tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_vocab_size_out_of_range(tmp_path):
    (tmp_path / "a.txt").write_text("tiny text, tiny text\n", encoding="utf-8")
    with pytest.raises(AigcError, match="smaller than the byte alphabet"):
        prepare_text(
            str(tmp_path / "a.txt"), tmp_path / "out", overrides={"tokenizer": "bpe", "vocab_size": 200}
        )
    with pytest.raises(AigcError, match=r"larger than the data supports.*--vocab-size \d+ or less"):
        prepare_text(
            str(tmp_path / "a.txt"), tmp_path / "out", overrides={"tokenizer": "bpe", "vocab_size": 5000}
        )
    with pytest.raises(AigcError, match="applies to --tokenizer bpe only"):
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides={"vocab_size": 100})
    assert nothing_written(tmp_path / "out")


def test_non_empty_out_dir_refused_unless_overwrite(tmp_path):
    (tmp_path / "a.txt").write_text("some text here\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(AigcError, match="exists and is not empty; pass --overwrite"):
        prepare_text(str(tmp_path / "a.txt"), out)
    assert (out / "keep.txt").exists()
    prepare_text(str(tmp_path / "a.txt"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "train.bin").exists()


def test_bad_config_keys_and_types(tmp_path):
    (tmp_path / "a.txt").write_text("some text here\n" * 20, encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown config key vocab; valid keys: blocks, dedup"):
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides=["vocab=3"])
    with pytest.raises(ConfigError, match="val_fraction: expected float"):
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides=["val_fraction=lots"])
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides=["val_fraction=1.5"])
    with pytest.raises(
        AigcError, match="--tokenizer word: no such file or directory; give char or bpe, a run"
    ):
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides=["tokenizer=word"])
    assert nothing_written(tmp_path / "out")


def test_unseen_character_policy_is_recorded(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc\n" * 20, encoding="utf-8")
    prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides={"unknown": "unk"})
    tok = load_prepared(tmp_path / "out").tokenizer
    assert tok.unknown == "unk" and tok.encode("z")[0] == tok.vocab_size - 1
    with pytest.raises(AigcError, match="applies to --tokenizer char only"):
        prepare_text(
            str(tmp_path / "a.txt"), tmp_path / "x", overrides={"unknown": "unk", "tokenizer": "bpe"}
        )


# ---------------------------------------------------------------------- reusing a tokenizer


def test_reused_tokenizer_is_copied_as_is_and_recorded(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    (tmp_path / "b.txt").write_text(
        "a lazy dog, a quick fox; nothing new under the sun\n" * 9, encoding="utf-8"
    )
    base = prepare_text(
        str(tmp_path / "a.txt"), tmp_path / "a", overrides=["tokenizer=bpe", "vocab_size=270"]
    )
    assert "from" not in base["tokenizer"]  # trained here: nothing to point at
    assert json.loads((tmp_path / "a" / "config.json").read_text())["tokenizer"] == "bpe"

    file = tmp_path / "a" / "tokenizer.json"
    meta = prepare_text(str(tmp_path / "b.txt"), tmp_path / "b", overrides={"tokenizer": str(file)})
    assert meta["tokenizer"] == {**base["tokenizer"], "from": str(file.resolve())}
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == file.read_bytes()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["tokenizer"] == str(file.resolve())
    data = load_prepared(tmp_path / "b")
    text = unicodedata.normalize("NFC", (tmp_path / "b.txt").read_text(encoding="utf-8"))
    assert data.tokenizer.id == base["tokenizer"]["id"]
    assert "".join(read_back(tmp_path / "b")) == text and data.train.tolist() == data.tokenizer.encode(
        text[: meta["train_chars"]]
    )


def test_reused_char_tokenizer_follows_its_unknown_policy(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc\n" * 20, encoding="utf-8")
    (tmp_path / "b.txt").write_text("abz cab\n" * 20, encoding="utf-8")
    prepare_text(str(tmp_path / "a.txt"), tmp_path / "strict")
    with pytest.raises(AigcError) as e:
        prepare_text(
            str(tmp_path / "b.txt"), tmp_path / "out", overrides={"tokenizer": str(tmp_path / "strict")}
        )
    assert re.search(
        r"^1 character\(s\) of file .*b.txt are not in the char tokenizer at .*strict", str(e.value)
    )
    assert "'z' (U+007A)" in str(e.value) and "\n" not in str(e.value)
    assert nothing_written(tmp_path / "out")
    with pytest.raises(AigcError, match="--unknown unk: the char tokenizer at .* has no <unk> token"):
        prepare_text(
            str(tmp_path / "b.txt"),
            tmp_path / "out",
            overrides={"tokenizer": str(tmp_path / "strict"), "unknown": "unk"},
        )

    prepare_text(str(tmp_path / "a.txt"), tmp_path / "lenient", overrides={"unknown": "unk"})
    logs: list[str] = []
    meta = prepare_text(
        str(tmp_path / "b.txt"),
        tmp_path / "out",
        overrides={"tokenizer": str(tmp_path / "lenient")},
        log=logs.append,
    )
    tok = load_prepared(tmp_path / "out").tokenizer
    assert (
        meta["tokenizer"]["unknown"] == "unk" and tok.vocab_size - 1 in load_prepared(tmp_path / "out").train
    )
    assert any("1 character(s) not in the tokenizer's vocabulary map to <unk>: 'z'" in m for m in logs)


def test_reused_tokenizer_without_eos_joins_documents(docs_dir, tmp_path):
    train_tokenizer("char", ["Document number 0123456789.\nIt has two lines, "]).save(tmp_path / "tok.json")
    logs: list[str] = []
    meta = prepare_text(
        str(docs_dir),
        tmp_path / "out",
        overrides={"tokenizer": str(tmp_path / "tok.json"), "glob": "**/*.txt"},
        log=logs.append,
    )
    assert meta["documents"] == 20 and meta["tokenizer"]["eos_id"] is None
    assert (
        meta["train_tokens"] + meta["val_tokens"] == meta["train_chars"] + meta["val_chars"]
    )  # no separators
    assert any("no <|endoftext|>: the 20 documents are joined without it" in m for m in logs)


def test_reused_char_tokenizer_reads_special_tokens_whole(tmp_path):
    train_tokenizer("char", ["abc \n"], special_tokens=[EOS]).save(tmp_path / "tok.json")
    (tmp_path / "a.txt").write_text(f"abc cab{EOS}bca\n" * 10, encoding="utf-8")  # '<', '|' are not in it
    prepare_text(
        str(tmp_path / "a.txt"), tmp_path / "out", overrides={"tokenizer": str(tmp_path / "tok.json")}
    )
    assert "".join(read_back(tmp_path / "out")) == f"abc cab{EOS}bca\n" * 10


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "{tmp}/nope",
            "--tokenizer {tmp}/nope: no such file or directory; give char or bpe, a run directory",
        ),
        ("{tmp}/empty", "--tokenizer {tmp}/empty: the directory holds no tokenizer.json; give char or bpe"),
        ("{tmp}/a.txt", "--tokenizer {tmp}/a.txt: {tmp}/a.txt is not a valid tokenizer.json"),
    ],
)
def test_reused_tokenizer_bad_paths(tmp_path, value, message):
    (tmp_path / "a.txt").write_text("abc abc\n" * 20, encoding="utf-8")
    (tmp_path / "empty").mkdir()
    value, message = value.replace("{tmp}", str(tmp_path)), message.replace("{tmp}", str(tmp_path))
    with pytest.raises(AigcError) as e:
        prepare_text(str(tmp_path / "a.txt"), tmp_path / "out", overrides={"tokenizer": value})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert nothing_written(tmp_path / "out")


def test_reused_tokenizer_keeps_its_vocab_size(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc\n" * 20, encoding="utf-8")
    prepare_text(str(tmp_path / "a.txt"), tmp_path / "a")
    with pytest.raises(
        AigcError, match="--vocab-size applies when training a BPE; .* is reused as is, with its 5"
    ):
        prepare_text(
            str(tmp_path / "a.txt"),
            tmp_path / "out",
            overrides={"tokenizer": str(tmp_path / "a"), "vocab_size": 300},
        )
    assert nothing_written(tmp_path / "out")
