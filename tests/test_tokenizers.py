"""Tokenizers: char and byte-level BPE, checked against HF `tokenizers` and `transformers`."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc.errors import AigcError
from aigc.tokenizers import EOS, UNK, Tokenizer, load_tokenizer, train_tokenizer

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n    pass\n",
    "秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。\n",
    "Emoji 😀🎉 and tabs\tand CRs\r\n and  double  spaces  ",
] * 20
TRICKY = [
    "",
    "a",
    "hello\n world",
    "  leading and trailing  \n\n",
    "tab\there\r\nwindows",
    "中文测试，你好！",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    f"doc one{EOS}doc two",
    "é vs e\u0301 (not normalised)",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer("bpe", iter(CORPUS), vocab_size=300)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_tokenizer("char", CORPUS + TRICKY, special_tokens=[EOS])


# ---------------------------------------------------------------------- char


def test_char_vocab_is_the_sorted_characters_like_nanogpt():
    text = "hello world\nzebra"
    tok = train_tokenizer("char", [text])
    chars = sorted(set(text))
    assert tok.kind == "char" and tok.vocab_size == len(chars) and tok.eos_id is None
    stoi = {c: i for i, c in enumerate(chars)}
    assert tok.encode(text) == [stoi[c] for c in text]
    assert tok.decode(tok.encode(text)) == text


def test_char_special_tokens_and_unk_come_after_the_characters():
    tok = train_tokenizer("char", ["ab"], special_tokens=[EOS], unknown="unk")
    assert tok.vocab_size == 4 and tok.eos_id == 2 and tok.hf.token_to_id(UNK) == 3
    assert tok.unknown == "unk"
    assert tok.encode(f"a{EOS}b") == [0, 2, 1]


@pytest.mark.parametrize("text", TRICKY)
def test_char_fast_path_matches_hf_tokenizers(char, text):
    assert char.encode(text) == char.hf.encode(text).ids
    assert char.decode(char.encode(text)) == text


def test_char_long_texts_take_the_array_path_with_the_same_ids(char):
    from aigc.tokenizers.char import SHORT_TEXT

    text = "".join(CORPUS)  # past SHORT_TEXT: numpy, not the dict lookup
    assert len(text) > SHORT_TEXT and char.encode(text) == char.hf.encode(text).ids
    short = text[:SHORT_TEXT]
    assert char.encode(short) == char.encode_array(short).tolist() == char.hf.encode(short).ids


def test_char_decode_joins_pieces_as_hf_decodes_them():
    """The char decode is a join of each id's string (the Fuse decoder): the same text as HF's for
    any ids, the special <unk> included, and the same error for an id out of range."""
    import random

    tok = train_tokenizer("char", ["abc \n中文😀<>"], unknown="unk")
    assert tok._table.pieces is not None and UNK in tok.special_tokens
    V, rng = tok.vocab_size, random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(V) for _ in range(rng.randrange(0, 10))]
        assert tok.decode(ids) == tok.hf.decode(ids, skip_special_tokens=False)
    assert tok.decode([tok.hf.token_to_id(UNK), 0]) == UNK + tok.hf.id_to_token(0)
    for bad in ([V], [-1], [0, V + 5]):
        with pytest.raises(AigcError, match=f"token id {bad[-1]} is out of range"):
            tok.decode(bad)
    assert tok.decode(iter([1, 2])) == tok.hf.decode([1, 2])  # (not a list: the checked path)


def test_char_unknown_error_names_the_character_and_position():
    tok = train_tokenizer("char", ["abc"])
    with pytest.raises(AigcError, match=r"'z' \(U\+007A\) at position 2 .*--unknown unk"):
        tok.encode("abz")
    with pytest.raises(AigcError, match=r"'z' \(U\+007A\) at position 600 "):
        tok.encode("a" * 600 + "z")


def test_char_unknown_unk_maps_unseen_characters():
    tok = train_tokenizer("char", ["abc<>knu"], unknown="unk")
    unk = tok.hf.token_to_id(UNK)
    a, b = tok.hf.token_to_id("a"), tok.hf.token_to_id("b")
    assert tok.encode("aZb😀") == [a, unk, b, unk]
    assert tok.encode("aZb😀") == tok.hf.encode("aZb😀").ids
    # a literal "<unk>" is the unk token everywhere (transformers registers it as special)
    assert tok.encode("<unk>") == tok.hf.encode("<unk>").ids == [unk]


def test_char_rejects_vocab_size_and_empty_data():
    with pytest.raises(AigcError, match="applies to --tokenizer bpe"):
        train_tokenizer("char", ["abc"], vocab_size=10)
    with pytest.raises(AigcError, match="empty"):
        train_tokenizer("char", [""])


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trip_any_text(text):
    tok = train_tokenizer("char", [text])
    ids = tok.encode(text)
    assert ids == tok.hf.encode(text).ids
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------- bpe


def test_bpe_is_byte_level_without_normalizer(bpe):
    spec = json.loads(bpe.hf.to_str())
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert bpe.kind == "bpe" and bpe.vocab_size == 300 and bpe.eos_id == 0 and bpe.eos_token == EOS


def test_bpe_learns_merges(bpe):
    text = "Before we proceed any further"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip_tricky(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_bpe_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocab_size_bounds():
    with pytest.raises(AigcError, match="smaller than the byte alphabet.*at least 257"):
        train_tokenizer("bpe", CORPUS, vocab_size=256)
    with pytest.raises(AigcError, match="larger than the data supports"):
        train_tokenizer("bpe", ["abcabc"], vocab_size=1000)
    with pytest.raises(AigcError, match="char only"):
        train_tokenizer("bpe", CORPUS, vocab_size=300, unknown="unk")


def test_unknown_kind():
    with pytest.raises(AigcError, match="valid tokenizers: char, bpe"):
        train_tokenizer("wordpiece", CORPUS)


# ---------------------------------------------------------------------- save / load / transformers


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_restores_kind_policy_and_id(tmp_path, kind, bpe):
    tok = bpe if kind == "bpe" else train_tokenizer("char", CORPUS, special_tokens=[EOS], unknown="unk")
    path = tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path)  # a directory holding tokenizer.json works too
    assert (back.kind, back.unknown, back.id, back.eos_id, back.vocab_size) == (
        tok.kind,
        tok.unknown,
        tok.id,
        tok.eos_id,
        tok.vocab_size,
    )
    assert load_tokenizer(path).encode(CORPUS[2]) == tok.encode(CORPUS[2])


def test_id_is_a_content_hash():
    a = train_tokenizer("char", ["abc"])
    assert a.id == train_tokenizer("char", ["cab"]).id
    assert a.id != train_tokenizer("char", ["abd"]).id
    assert a.id != train_tokenizer("char", ["abc"], unknown="unk").id


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_transformers_loads_save_pretrained_and_encodes_identically(tmp_path, kind, bpe):
    transformers = pytest.importorskip("transformers")
    if kind == "bpe":
        tok = bpe
    else:
        tok = train_tokenizer("char", CORPUS + TRICKY + ["<unk>"], special_tokens=[EOS], unknown="unk")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == EOS and hf.eos_token_id == tok.eos_id
    for text in TRICKY + CORPUS[:4] + ["<unk> literal", "unseen ✓ char"]:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=True)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids)


def test_load_errors(tmp_path):
    with pytest.raises(AigcError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(AigcError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(AigcError, match="neither an AIGC char tokenizer"):
        load_tokenizer(tmp_path)


def test_decode_rejects_out_of_range_ids(bpe):
    with pytest.raises(AigcError, match="out of range; this tokenizer has ids 0..299"):
        bpe.decode([1, 300])
