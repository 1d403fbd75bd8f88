"""Streaming detokenizer (never half a character) and stop-string matching."""

from __future__ import annotations

import random

import pytest

from aigc.generation.stream import REPLACEMENT, Detokenizer, StopMatcher, truncate_at_stop

TEXT = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。🌸🌧️ Spring sleep 😴 ends — ça va? 床前明月光"


@pytest.fixture(scope="module")
def bpe():
    from aigc.tokenizers import train_tokenizer

    # small vocab: most CJK characters and emoji stay split across several byte tokens
    return train_tokenizer("bpe", [TEXT * 3, "hello world " * 20], vocab_size=300)


def test_byte_level_tokens_do_split_characters(bpe):
    ids = bpe.encode(TEXT)
    assert any(REPLACEMENT in bpe.decode([t]) for t in ids), "test needs tokens holding partial characters"


def test_stream_never_splits_a_character(bpe):
    ids = bpe.encode(TEXT)
    det = Detokenizer(bpe.decode)
    deltas = [det.push(t) for t in ids] + [det.flush()]
    assert "".join(deltas) == TEXT
    assert not any(REPLACEMENT in d for d in deltas)
    assert sum(1 for d in deltas if d) > 10  # it does stream, not hold everything to the end


def test_stream_with_prompt_context(bpe):
    prompt, cont = bpe.encode("春眠不觉晓，"), bpe.encode("处处闻啼鸟。🌸")
    det = Detokenizer(bpe.decode, prompt)
    out = "".join(det.push(t) for t in cont) + det.flush()
    assert out == bpe.decode(prompt + cont)[len(bpe.decode(prompt)) :]


def test_flush_releases_an_incomplete_character(bpe):
    ids = bpe.encode("好")
    det = Detokenizer(bpe.decode)
    assert det.push(ids[0]) == "" if len(ids) > 1 else True
    rest = "".join(det.push(t) for t in ids[1:]) + det.flush()
    assert rest.endswith("好")


@pytest.mark.parametrize("seed", range(5))
def test_stop_matcher_equals_truncation(seed):
    rng = random.Random(seed)
    text = "abc STOP def\nUser: x" * 2
    stops = ["STOP", "\nUser:", "zz"]
    m = StopMatcher(stops)
    shown, i = [], 0
    while i < len(text) and not m.stopped:
        k = rng.randint(1, 4)
        shown.append(m.feed(text[i : i + k]))
        i += k
    shown.append(m.flush())
    expected, hit = truncate_at_stop(text, stops)
    assert "".join(shown) == expected == m.final_text and hit and m.stopped


def test_stop_matcher_holds_back_partial_stop():
    m = StopMatcher(["\nUser:"])
    assert m.feed("hello\nUs") == "hello"  # "\nUs" could still become the stop string
    assert m.feed("ually") == "\nUsually"
    assert m.flush() == ""
    assert m.final_text == "hello\nUsually"
