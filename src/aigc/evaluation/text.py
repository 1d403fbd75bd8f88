"""Text metrics: likelihood, diversity, degeneration and memorization.

Pure functions over token-id sequences (any hashable tokens work for the n-gram metrics, so
word lists and character strings are fine too). Nothing here knows about models or tokenizers,
except `lm_loss`, which only needs the language-model forward contract of docs/internals.md.

References:
- distinct-n: Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models" (corpus level: distinct n-grams / all n-grams).
- BLEU: Papineni et al. 2002; smoothing "epsilon" = method 1 of Chen & Cherry 2014, as in
  `nltk.translate.bleu_score.SmoothingFunction().method1`.
- self-BLEU: Zhu et al. 2018, "Texygen" (each sample scored against all the others).
- memorization: Carlini et al. 2021/2023 (verbatim n-gram overlap with the training data);
  the longest common substring uses a suffix array (Manber & Myers 1993).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aigc.utils.paths import aigc_home

Tokens = Sequence[Hashable]

# ----------------------------------------------------------------------------- likelihood


def perplexity(loss_nats: float) -> float:
    """exp(mean cross-entropy per token in nats)."""
    return math.exp(loss_nats)


def bits_per_token(loss_nats: float) -> float:
    return loss_nats / math.log(2)


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte: total nats over the split / (bytes * ln 2). Comparable across tokenizers."""
    if n_bytes <= 0:
        raise ValueError("n_bytes must be positive")
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def lm_loss(
    model: Any,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> tuple[float, int]:
    """Mean next-token loss (nats) of a language model over `tokens`, in non-overlapping windows.

    `model(idx (B, T), targets (B, T)) -> (logits, loss)` as in docs/internals.md. Every token after
    the first is predicted once (the last window may be shorter). Returns (mean loss, tokens scored).
    """
    import torch

    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1  # number of (input, target) pairs
    if n < 1:
        raise ValueError("need at least 2 tokens to compute a loss")
    starts = list(range(0, n, block_size))
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    total, count = 0.0, 0
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    with torch.no_grad():
        # windows of equal length batch together; the short tail window goes alone
        full = [s for s in starts if s + block_size <= n]
        tail = [s for s in starts if s + block_size > n]
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
        for group in groups:
            t = min(block_size, n - group[0])
            x = torch.from_numpy(np.stack([tokens[s : s + t] for s in group]))  # (B, T)
            y = torch.from_numpy(np.stack([tokens[s + 1 : s + 1 + t] for s in group]))  # (B, T)
            _, loss = model(x, y)
            total += float(loss) * x.numel()
            count += x.numel()
    if was_training and hasattr(model, "train"):
        model.train()
    return total / count, count


# ----------------------------------------------------------------------------- n-grams, diversity


def ngrams(seq: Tokens, n: int) -> list[tuple]:
    """All contiguous n-grams of `seq` as tuples (empty when len(seq) < n)."""
    seq = list(seq)
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(samples: Sequence[Tokens], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams over all samples (0 if none)."""
    total, unique = 0, set()
    for s in samples:
        grams = ngrams(s, n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


# ----------------------------------------------------------------------------- BLEU

Smoothing = Literal["none", "epsilon"]


def _bleu_from_stats(
    matches: Sequence[int],
    totals: Sequence[int],
    hyp_len: int,
    ref_len: int,
    weights: Sequence[float],
    smoothing: Smoothing,
    epsilon: float,
) -> float:
    """BLEU = BP * exp(sum_n w_n log p_n) from clipped n-gram match counts (Papineni eq. 1-2)."""
    if matches[0] == 0 or hyp_len == 0:
        return 0.0
    log_p = 0.0
    for m, t, w in zip(matches, totals, weights, strict=True):
        t = max(t, 1)  # as nltk: a hypothesis shorter than n counts one (empty) n-gram
        if m == 0:
            if smoothing == "none":
                return 0.0  # one zero precision makes the geometric mean zero
            m = epsilon  # Chen & Cherry 2014 method 1
        log_p += w * math.log(m / t)
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _closest_ref_len(ref_lens: Sequence[int], hyp_len: int) -> int:
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))  # ties go to the shorter reference


def _clipped_matches(refs: Sequence[Tokens], hyp: Tokens, max_n: int) -> tuple[list[int], list[int]]:
    matches, totals = [], []
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hyp, n))
        max_ref: Counter = Counter()
        for r in refs:
            for g, c in Counter(ngrams(r, n)).items():
                if c > max_ref[g]:
                    max_ref[g] = c
        matches.append(sum(min(c, max_ref[g]) for g, c in counts.items()))
        totals.append(sum(counts.values()))
    return matches, totals


def sentence_bleu(
    references: Sequence[Tokens],
    hypothesis: Tokens,
    max_n: int = 4,
    smoothing: Smoothing = "none",
    epsilon: float = 0.1,
) -> float:
    """BLEU of one hypothesis against its references, uniform weights 1/max_n (0..1 scale)."""
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    matches, totals = _clipped_matches(references, hypothesis, max_n)
    ref_len = _closest_ref_len([len(r) for r in references], len(hypothesis))
    weights = [1.0 / max_n] * max_n
    return _bleu_from_stats(matches, totals, len(hypothesis), ref_len, weights, smoothing, epsilon)


def corpus_bleu(
    list_of_references: Sequence[Sequence[Tokens]],
    hypotheses: Sequence[Tokens],
    max_n: int = 4,
    smoothing: Smoothing = "none",
    epsilon: float = 0.1,
) -> float:
    """Corpus BLEU: match counts and lengths summed over all hypotheses before the ratio.

    The n-gram totals are the real counts (as sacrebleu); nltk counts at least 1 per hypothesis,
    so the two differ only when some hypothesis is shorter than `max_n` tokens.
    """
    if len(list_of_references) != len(hypotheses):
        raise ValueError("one list of references per hypothesis is needed")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for refs, hyp in zip(list_of_references, hypotheses, strict=True):
        m, t = _clipped_matches(refs, hyp, max_n)
        matches = [a + b for a, b in zip(matches, m, strict=True)]
        totals = [a + b for a, b in zip(totals, t, strict=True)]
        hyp_len += len(hyp)
        ref_len += _closest_ref_len([len(r) for r in refs], len(hyp))
    weights = [1.0 / max_n] * max_n
    return _bleu_from_stats(matches, totals, hyp_len, ref_len, weights, smoothing, epsilon)


def self_bleu(
    samples: Sequence[Tokens],
    max_n: int = 4,
    smoothing: Smoothing = "epsilon",
    epsilon: float = 0.1,
) -> float:
    """Mean sentence BLEU of each sample against all the other samples (higher = less diverse).

    Exactly `mean(sentence_bleu(others, s))`, but in O(total n-grams) rather than O(N^2): for every
    n-gram we keep its largest and second-largest count over the samples, so "the largest count in
    any *other* sample" (the BLEU clip) is known without looping over the references.
    """
    samples = [list(s) for s in samples]
    if len(samples) < 2:
        raise ValueError("self-BLEU needs at least 2 samples")
    # 1. per order n: each sample's n-gram counts, and the top-2 counts of each n-gram over samples
    counts = [[Counter(ngrams(s, n)) for s in samples] for n in range(1, max_n + 1)]
    tops: list[dict[tuple, tuple[int, int, int]]] = []  # gram -> (best count, its sample, second count)
    for per_sample in counts:
        top: dict[tuple, tuple[int, int, int]] = {}
        for i, cnt in enumerate(per_sample):
            for g, c in cnt.items():
                best, who, second = top.get(g, (0, -1, 0))
                if c > best:
                    top[g] = (c, i, best)
                elif c > second:
                    top[g] = (best, who, c)
        tops.append(top)
    # 2. reference lengths: the closest length among the others, from a sorted list without oneself
    lens = [len(s) for s in samples]
    sorted_lens = sorted(lens)
    weights = [1.0 / max_n] * max_n
    scores = []
    for i, s in enumerate(samples):
        matches, totals = [], []
        for n_idx in range(max_n):
            m = 0
            for g, c in counts[n_idx][i].items():
                best, who, second = tops[n_idx][g]
                m += min(c, second if who == i else best)
            matches.append(m)
            totals.append(sum(counts[n_idx][i].values()))
        others = list(sorted_lens)
        del others[bisect.bisect_left(others, lens[i])]
        j = bisect.bisect_left(others, lens[i])
        near = others[max(0, j - 1) : j + 1]
        ref_len = _closest_ref_len(near, lens[i])
        scores.append(_bleu_from_stats(matches, totals, len(s), ref_len, weights, smoothing, epsilon))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- degeneration


@dataclass
class Loop:
    """A repeated n-gram loop: `period` tokens repeated `repeats` times from `start`."""

    start: int
    period: int
    repeats: float

    @property
    def span(self) -> int:
        return round(self.period * self.repeats)


def find_loop(tokens: Tokens, max_period: int = 16, min_repeats: int = 3, min_span: int = 8) -> Loop | None:
    """The longest "repeated n-gram loop" in `tokens`, or None.

    Definition: a loop is a stretch of consecutive tokens that is periodic with a period p in
    [1, max_period] (tokens[j] == tokens[j + p] throughout), long enough to hold the same p-gram
    at least `min_repeats` times in a row, and at least `min_span` tokens long. The span rule
    keeps natural short repeats ("no no", "  ", "...") from counting; e.g. with the defaults a
    single token must repeat 8 times, a bigram 4 times, a trigram or longer 3 times.
    """
    arr = np.asarray(_as_ids(tokens))
    best: Loop | None = None
    for p in range(1, max_period + 1):
        if len(arr) <= p:
            break
        eq = arr[p:] == arr[:-p]  # eq[j]: tokens[j] == tokens[j + p]
        # runs of True in eq of length L -> a p-periodic stretch of L + p tokens
        padded = np.concatenate([[False], eq, [False]])
        edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
        for a, b in zip(edges[0::2], edges[1::2], strict=True):
            span = (b - a) + p
            if span >= max(min_repeats * p, min_span) and (best is None or span > best.span):
                best = Loop(start=int(a), period=p, repeats=span / p)
    return best


def repetition_rate(
    samples: Sequence[Tokens], max_period: int = 16, min_repeats: int = 3, min_span: int = 8
) -> float:
    """Share of samples that contain a repeated n-gram loop (see `find_loop` for the definition)."""
    if not samples:
        return 0.0
    flags = [find_loop(s, max_period, min_repeats, min_span) is not None for s in samples]
    return sum(flags) / len(flags)


def _as_ids(tokens: Tokens) -> list:
    """Token ids as-is; a str becomes its code points (so strings work as char sequences)."""
    if isinstance(tokens, str):
        return [ord(c) for c in tokens]
    return list(tokens)


# ----------------------------------------------------------------------------- memorization

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio); arithmetic wraps mod 2^64


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hashes of every n-gram of an id array: h = sum_j (t_{i+j} + 1) * M^(n-1-j).

    Collisions between distinct n-grams have probability ~ 2^-64 per pair: negligible at 1e6-1e7
    n-grams (birthday bound ~ 1e-6).
    """
    t = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)  # +1 so a 0 token still counts
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _HASH_MULT + t[j : len(t) - n + 1 + j]
    return h


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Suffix array of an id array by prefix doubling (numpy argsort per round, O(n log^2 n))."""
    t = np.asarray(tokens, dtype=np.int64)
    n = len(t)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, rank = np.unique(t, return_inverse=True)
    rank = rank.astype(np.int64)
    k = 1
    while True:
        # sort by (rank[i], rank[i + k]), with -1 past the end (a shorter suffix sorts first)
        second = np.full(n, -1, dtype=np.int64)
        if k < n:
            second[: n - k] = rank[k:]
        key = rank * (n + 1) + (second + 1)
        sa = np.argsort(key)  # ties have equal keys, so their order does not matter
        sorted_key = key[sa]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[sa] = np.concatenate([[0], np.cumsum(sorted_key[1:] != sorted_key[:-1])])
        rank = new_rank
        if rank.max() == n - 1 or k >= n:
            return sa
        k *= 2


class TrainingIndex:
    """The training tokens indexed for memorization checks: suffix array + sorted n-gram hashes.

    Built once (about 2 s per million tokens) and saved as safetensors, so an evaluation can
    reuse it (`save` / `load`, keyed by the caller, e.g. by the prepared data's source hash).
    """

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, hashes: np.ndarray, n: int):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.sa = sa
        self.hashes = hashes  # sorted unique uint64 hashes of the training n-grams
        self.n = n
        # big-endian fixed-width bytes: byte order == token order, so slices compare in C
        self._bytes = self.tokens.astype(">u4").tobytes()

    @classmethod
    def build(cls, tokens: np.ndarray, n: int = 8) -> TrainingIndex:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**32):
            raise ValueError("token ids must be in [0, 2^32)")
        return cls(tokens, suffix_array(tokens), np.unique(ngram_hashes(tokens, n)), n)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        from aigc.utils.io import atomic_write

        tensors = {"tokens": self.tokens, "sa": self.sa.astype(np.int64), "hashes": self.hashes}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"n": str(self.n)}))

    @classmethod
    def load(cls, path: str | Path) -> TrainingIndex:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), framework="numpy") as f:
            n = int(f.metadata()["n"])
        d = load_file(str(path))
        return cls(d["tokens"], d["sa"], d["hashes"], n)

    # --- queries

    def _occurs(self, qb: bytes) -> bool:
        """Does the token string `qb` (big-endian u4 bytes) occur in the training tokens?

        Binary search for the first suffix whose prefix is >= qb, then compare; bytes slices
        compare in C, so each probe costs one short memcmp.
        """
        m = len(qb)
        buf, sa = self._bytes, self.sa
        lo, hi = 0, len(sa)
        while lo < hi:
            mid = (lo + hi) // 2
            s = 4 * int(sa[mid])
            if buf[s : s + m] < qb:
                lo = mid + 1
            else:
                hi = mid
        if lo == len(sa):
            return False
        s = 4 * int(sa[lo])
        return buf[s : s + m] == qb

    def longest_match(self, sample: Sequence[int]) -> tuple[int, int]:
        """Longest common substring of `sample` with the training tokens: (length, start in sample).

        Scans start positions; at each only checks for a match one longer than the best so far,
        so the cost is O((len(sample) + best) * log(train tokens)) probes.
        """
        ids = np.asarray(sample, dtype=np.int64)
        if len(ids) == 0:
            return 0, 0
        if ids.min() < 0 or ids.max() >= 2**32:
            raise ValueError("token ids must be in [0, 2^32)")
        qb = ids.astype(">u4").tobytes()
        n = len(ids)
        best, where = 0, 0
        for i in range(n):
            if n - i <= best:
                break  # no longer match can start here
            while i + best < n and self._occurs(qb[4 * i : 4 * (i + best + 1)]):
                best += 1
                where = i
        return best, where

    def ngram_overlap(self, sample: Sequence[int]) -> tuple[int, int]:
        """(n-grams of `sample` found verbatim in the training data, n-grams in `sample`)."""
        h = ngram_hashes(np.asarray(sample, dtype=np.int64), self.n)
        if len(h) == 0 or len(self.hashes) == 0:
            return 0, len(h)
        pos = np.searchsorted(self.hashes, h)
        found = self.hashes[np.minimum(pos, len(self.hashes) - 1)] == h
        return int(found.sum()), len(h)


def cached_index(
    tokens: np.ndarray, key: str, n: int = 8, cache_dir: str | Path | None = None
) -> TrainingIndex:
    """`TrainingIndex` of `tokens`, saved under `$AIGC_HOME/cache/memorization/` and reused by `key`.

    `key` must identify the tokens (e.g. the prepared data's `source_hash` + tokenizer id); a
    cached index whose token count differs is rebuilt.
    """
    import re

    if cache_dir is not None:
        root = Path(cache_dir)
    else:
        root = aigc_home() / "cache" / "memorization"
    path = root / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}-n{n}.safetensors"
    if path.is_file():
        index = TrainingIndex.load(path)
        if len(index.tokens) == len(tokens) and index.n == n:
            return index
    index = TrainingIndex.build(tokens, n)
    index.save(path)
    return index


def memorization(samples: Sequence[Sequence[int]], index: TrainingIndex) -> dict[str, Any]:
    """Memorization of generated samples against a `TrainingIndex`.

    Returns: `lcs` (per-sample longest common substring length, in tokens), `lcs_mean`, `lcs_max`,
    `ngram_n`, `ngram_overlap` (share of all generated n-grams found verbatim in the training
    data) and `samples_with_copied_ngram` (share of samples with at least one).
    """
    lcs = [index.longest_match(s)[0] for s in samples]
    found = total = with_copy = 0
    for s in samples:
        f, t = index.ngram_overlap(s)
        found, total, with_copy = found + f, total + t, with_copy + (f > 0)
    return {
        "lcs": lcs,
        "lcs_mean": float(np.mean(lcs)) if lcs else 0.0,
        "lcs_max": int(max(lcs)) if lcs else 0,
        "ngram_n": index.n,
        "ngram_overlap": found / total if total else 0.0,
        "samples_with_copied_ngram": with_copy / len(samples) if samples else 0.0,
    }


__all__ = [
    "Loop",
    "TrainingIndex",
    "bits_per_byte",
    "bits_per_token",
    "cached_index",
    "corpus_bleu",
    "distinct_n",
    "find_loop",
    "lm_loss",
    "memorization",
    "ngram_hashes",
    "ngrams",
    "perplexity",
    "repetition_rate",
    "self_bleu",
    "sentence_bleu",
    "suffix_array",
]
