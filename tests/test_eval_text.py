"""Text metrics: BLEU against nltk, suffix-array memorization against brute force, loops, losses."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from aigc.evaluation.text import (
    TrainingIndex,
    bits_per_byte,
    corpus_bleu,
    distinct_n,
    find_loop,
    lm_loss,
    memorization,
    ngram_hashes,
    perplexity,
    repetition_rate,
    self_bleu,
    sentence_bleu,
    suffix_array,
)


def _random_sentences(rng: np.random.Generator, n: int, vocab: int = 12) -> list[list[str]]:
    return [[f"w{t}" for t in rng.integers(0, vocab, rng.integers(1, 14))] for _ in range(n)]


# ----------------------------------------------------------------------------- diversity


def test_distinct_n_by_hand():
    samples = [["a", "b", "a", "b"], ["a", "c"]]
    # unigrams: a b a b a c -> 3 unique / 6; bigrams: ab ba ab ac -> 3 unique / 4
    assert distinct_n(samples, 1) == pytest.approx(3 / 6)
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)
    assert distinct_n(samples, 3) == pytest.approx(2 / 2)
    assert distinct_n([["a"]], 2) == 0.0


# ----------------------------------------------------------------------------- BLEU vs nltk


def test_sentence_and_corpus_bleu_match_nltk():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk_bleu.SmoothingFunction(epsilon=0.1).method1
    rng = np.random.default_rng(0)
    hyps = _random_sentences(rng, 40, vocab=6)
    refs = [_random_sentences(rng, int(rng.integers(1, 4)), vocab=6) for _ in hyps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram overlaps
        for h, r in zip(hyps, refs, strict=True):
            ours = sentence_bleu(r, h, smoothing="epsilon")
            assert ours == pytest.approx(nltk_bleu.sentence_bleu(r, h, smoothing_function=smooth), rel=1e-9)
            # unsmoothed: nltk returns ~1e-77 where BLEU is 0, we return exactly 0
            assert sentence_bleu(r, h) == pytest.approx(nltk_bleu.sentence_bleu(r, h), abs=1e-12)
        # corpus level: nltk counts max(1, n-grams) per hypothesis, we sum the real counts (as
        # sacrebleu); the two agree when every hypothesis has at least max_n tokens
        long_hyps = [h + ["w0", "w1", "w2", "w3"] for h in hyps]
        assert corpus_bleu(refs, long_hyps) == pytest.approx(nltk_bleu.corpus_bleu(refs, long_hyps), rel=1e-9)
        for n in (1, 2, 3):
            w = tuple([1 / n] * n)
            assert corpus_bleu(refs, long_hyps, max_n=n) == pytest.approx(
                nltk_bleu.corpus_bleu(refs, long_hyps, weights=w), rel=1e-9
            )


def test_self_bleu_equals_leave_one_out_sentence_bleu():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk_bleu.SmoothingFunction(epsilon=0.1).method1
    rng = np.random.default_rng(1)
    samples = _random_sentences(rng, 30, vocab=5)
    expected = np.mean(
        [
            nltk_bleu.sentence_bleu(samples[:i] + samples[i + 1 :], s, smoothing_function=smooth)
            for i, s in enumerate(samples)
        ]
    )
    assert self_bleu(samples) == pytest.approx(expected, rel=1e-9)


def test_self_bleu_orders_diversity():
    same = [["the", "cat", "sat", "on", "the", "mat"]] * 5
    rng = np.random.default_rng(2)
    varied = _random_sentences(rng, 5, vocab=200)
    assert self_bleu(same) == pytest.approx(1.0)
    assert self_bleu(varied) < 0.2
    with pytest.raises(ValueError):
        self_bleu(same[:1])


# ----------------------------------------------------------------------------- loops


def test_find_loop_definition():
    assert find_loop("the cat sat on the mat") is None
    assert find_loop("aaaaaaa") is None  # 7 < min_span 8
    loop = find_loop("xx aaaaaaaa yy")
    assert loop is not None and loop.period == 1 and loop.start == 3 and loop.span == 8
    loop = find_loop([5, 1, 2, 3, 1, 2, 3, 1, 2, 3, 9])  # trigram x3 = 9 tokens
    assert loop is not None and loop.period == 3 and loop.repeats == pytest.approx(3.0)
    assert find_loop([1, 2, 3, 1, 2, 3, 9]) is None  # only twice
    assert find_loop("I am I am I am I am ") is not None  # "I am " (period 5) four times
    # the longest periodic stretch wins
    loop = find_loop("ab" * 5 + "xyz" + "abcd" * 6)
    assert loop.period == 4 and loop.span == 24


def test_repetition_rate():
    samples = ["a normal sentence", "la la la la la la la la", "ok", "ha" * 10]
    assert repetition_rate(samples) == pytest.approx(0.5)
    assert repetition_rate([]) == 0.0


# ----------------------------------------------------------------------------- memorization


def _naive_lcs(a: list[int], b: list[int]) -> int:
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                best = max(best, cur[j + 1])
        prev = cur
    return best


def test_suffix_array_against_sorting():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 64, 500):
        t = rng.integers(0, 3, n)
        assert suffix_array(t).tolist() == sorted(range(n), key=lambda i: t[i:].tolist())


def test_longest_match_and_ngram_overlap_against_brute_force():
    rng = np.random.default_rng(4)
    train = rng.integers(0, 4, 400)
    index = TrainingIndex.build(train, n=3)
    train_grams = {tuple(train[i : i + 3]) for i in range(len(train) - 2)}
    for _ in range(25):
        sample = rng.integers(0, 5, int(rng.integers(0, 40))).tolist()
        length, start = index.longest_match(sample)
        assert length == _naive_lcs(sample, train.tolist())
        if length:  # the reported stretch really occurs in the training data
            piece = sample[start : start + length]
            assert any(train[i : i + length].tolist() == piece for i in range(len(train)))
        grams = [tuple(sample[i : i + 3]) for i in range(len(sample) - 2)]
        assert index.ngram_overlap(sample) == (sum(g in train_grams for g in grams), len(grams))


def test_memorization_report_and_cache_roundtrip(tmp_path):
    train = np.arange(1000) % 97  # a repeating ramp
    copied = list(range(10, 60))  # 50 tokens straight from the ramp
    novel = [5, 3, 5, 3, 5, 3, 1, 1, 1, 2, 2, 2]
    index = TrainingIndex.build(train)
    report = memorization([copied, novel], index)
    assert report["lcs"] == [50, 2]  # the ramp holds only consecutive pairs: "1 2"
    assert report["ngram_overlap"] == pytest.approx(43 / (43 + 5))
    assert report["samples_with_copied_ngram"] == 0.5
    path = index.save(tmp_path / "index.safetensors")
    again = TrainingIndex.load(path)
    assert again.n == 8 and np.array_equal(again.sa, index.sa)
    assert memorization([copied, novel], again) == report


def test_cached_index_reuses_and_rebuilds(tmp_path):
    from aigc.evaluation.text import cached_index

    tokens = np.arange(300) % 17
    first = cached_index(tokens, "data/abc 123")
    files = list((tmp_path / "aigc-home" / "cache" / "memorization").iterdir())
    assert [f.name for f in files] == ["data_abc_123-n8.safetensors"]
    again = cached_index(tokens, "data/abc 123")
    assert np.array_equal(again.sa, first.sa) and again.n == 8
    other = cached_index(tokens[:200], "data/abc 123")  # stale cache entry: rebuilt
    assert len(other.tokens) == 200


def test_ngram_hashes_distinguish_and_agree():
    a = ngram_hashes(np.array([1, 2, 3, 1, 2, 3]), 3)
    assert a[0] == a[3] and len(set(a.tolist())) == 3
    assert ngram_hashes(np.array([0, 0]), 1)[0] != ngram_hashes(np.array([0, 0]), 2)[0]
    assert len(ngram_hashes(np.array([1]), 2)) == 0


@pytest.mark.slow
def test_memorization_scales_to_a_million_tokens(data_root):
    import time

    text = (data_root / "text" / "tinyshakespeare.txt").read_bytes()
    ids = np.frombuffer(text, np.uint8).astype(np.int64)  # 1.1M byte tokens
    t0 = time.perf_counter()
    index = TrainingIndex.build(ids)
    samples = [ids[i : i + 256].tolist() for i in range(0, 256 * 500, 256)]
    rng = np.random.default_rng(0)
    samples += [rng.integers(97, 123, 256).tolist() for _ in range(500)]
    report = memorization(samples, index)
    assert time.perf_counter() - t0 < 60
    assert report["lcs"][:500] == [256] * 500  # copies are found whole
    assert max(report["lcs"][500:]) < 12  # random letters match only short stretches
    assert report["ngram_overlap"] == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------- likelihood


class _Uniform(torch.nn.Module):
    """A language model that predicts every token with probability 1/V: loss = ln V exactly."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.vocab)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), targets.view(-1))
        return logits, loss


def test_lm_loss_perplexity_bits_per_byte():
    tokens = np.arange(103) % 50
    loss, count = lm_loss(_Uniform(50), tokens, block_size=16, batch_size=3)
    assert count == 102  # every token after the first, once
    assert loss == pytest.approx(math.log(50), rel=1e-6)
    assert perplexity(loss) == pytest.approx(50, rel=1e-6)
    assert bits_per_byte(math.log(2), n_tokens=100, n_bytes=200) == pytest.approx(0.5)
    _, count = lm_loss(_Uniform(50), tokens, block_size=16, batch_size=2, max_batches=1)
    assert count == 32


# ----------------------------------------------------------------------------- reports


def test_text_report_floor_protocol_and_card_link(tmp_path):
    from aigc.errors import AigcError
    from aigc.evaluation.report import check_same_tokenizer, link_in_card, text_report, write_report

    rng = np.random.default_rng(5)
    train = rng.integers(0, 50, 5000)
    val = rng.integers(0, 50, 1000)
    copies = [train[i : i + 40].tolist() for i in range(0, 400, 40)]  # a model that recites
    loops = [[7, 8] * 20 for _ in range(10)]  # a model stuck in a loop
    report = text_report(
        copies + loops, train, val, seed=3, sampler={"temperature": 0.8}, extra={"val_loss": 2.5}
    )
    proto = report["protocol"]
    assert (
        proto["samples"] == 20 and proto["sample_tokens"] == 40 and proto["sampler"] == {"temperature": 0.8}
    )
    assert report["model"]["val_loss"] == 2.5 and report["model"]["repetition_rate"] == 0.5
    assert report["model"]["lcs_max"] == 40 and report["real"]["lcs_max"] < 10  # real text is not memorized
    assert report["real"]["repetition_rate"] == 0.0
    assert report["model"]["distinct_2"] < report["real"]["distinct_2"]
    # more samples than the real set holds: capped with a warning
    with pytest.warns(UserWarning, match="using 16"):
        capped = text_report([[1, 2, 3] * 20] * 30, train, val[:1500])
    assert capped["protocol"]["samples"] == 16  # 1000 tokens / 60 per window
    with pytest.raises(AigcError, match="tokenizer .* differs"):
        check_same_tokenizer("bpe-1234", "char-9999")
    run = tmp_path / "run"
    run.mkdir()
    (run / "card.md").write_text("# run\n\n## Data\n\nx\n", encoding="utf-8")
    path = write_report(run / "report.json", report)
    assert json.loads(path.read_text())["model"]["lcs_max"] == 40
    assert "| repetition_rate | 0.5 | 0 |" in (run / "report.md").read_text()
    link_in_card(run, path)
    link_in_card(run, path)  # idempotent: one section
    card = (run / "card.md").read_text()
    assert card.count("## Evaluation") == 1 and "[report.json](report.json)" in card and "## Data" in card
