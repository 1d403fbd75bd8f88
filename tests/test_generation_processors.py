"""Logits processors and sampling: oracle tests against transformers' processors of the same name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aigc.errors import AigcError
from aigc.generation import processors as P
from aigc.generation.params import GenerationParams, make_params
from aigc.generation.sampling import make_generator, sample_next, token_logprobs

lp = pytest.importorskip("transformers.generation.logits_process")

B, V = 6, 50


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


def _history(seed: int = 0, T: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, 12, (B, T), generator=g)  # small id range: plenty of repeats


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("t", [0.3, 0.7, 1.5])
def test_temperature_matches_hf(seed, t):
    x = _logits(seed)
    _same(P.temperature(x, torch.full((B,), t)), lp.TemperatureLogitsWarper(t)(None, x.clone()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 17, V])
def test_top_k_matches_hf(seed, k):
    x = _logits(seed)
    _same(P.top_k(x, torch.full((B,), k)), lp.TopKLogitsWarper(k)(None, x.clone()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(seed, p):
    x = _logits(seed)
    _same(P.top_p(x, torch.full((B,), p)), lp.TopPLogitsWarper(p)(None, x.clone()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("m", [0.0, 0.05, 0.3, 0.9])
def test_min_p_matches_hf(seed, m):
    x = _logits(seed)
    _same(P.min_p(x, torch.full((B,), m)), lp.MinPLogitsWarper(m)(None, x.clone()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mass", [0.2, 0.5, 0.95])
def test_typical_matches_hf(seed, mass):
    x = _logits(seed)
    _same(P.typical_p(x, torch.full((B,), mass)), lp.TypicalLogitsWarper(mass)(None, x.clone()))


def _seen(hist: torch.Tensor) -> torch.Tensor:
    return torch.zeros(B, V, dtype=torch.bool).scatter_(1, hist, True)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pen", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(seed, pen):
    x, h = _logits(seed), _history(seed)
    ours = P.repetition_penalty(x, _seen(h), torch.full((B,), pen))
    _same(ours, lp.RepetitionPenaltyLogitsProcessor(pen)(h, x.clone()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_hf(seed, n):
    x, h = _logits(seed), _history(seed, T=20)
    banned = [P.no_repeat_ngram_banned(row, n) for row in h.tolist()]
    _same(P.ban_tokens(x, banned), lp.NoRepeatNGramLogitsProcessor(n)(h, x.clone()))


def test_ngram_index_incremental_equals_pure():
    h = _history(3, T=30)[0].tolist()
    ix = P.NGramIndex(3)
    for i, t in enumerate(h):
        ix.add(t)
        assert ix.banned() == P.no_repeat_ngram_banned(h[: i + 1], 3)


def test_bad_words_match_hf():
    x, h = _logits(1), _history(1)
    last = h[0, -1].item()
    bad = [[7], [last, 3], [99 % V, 4, 5]]  # single token, a prefix that matches row 0, one that does not
    ours = P.ban_tokens(x, [P.bad_words_banned(row, bad) for row in h.tolist()])
    _same(ours, lp.NoBadWordsLogitsProcessor(bad, eos_token_id=None)(h, x.clone()))


def test_mixed_rows_equal_each_row_alone():
    """One batch, six different requests: each row equals HF's processors run with that row's values."""
    x, h = _logits(5), _history(5)
    rows = [
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(min_p=0.2, repetition_penalty=1.4),
        dict(typical_p=0.6),
        dict(temperature=0.0, repetition_penalty=1.2),  # greedy: penalty yes, warpers no
        dict(top_k=3, top_p=0.5, min_p=0.1, temperature=0.9),
    ]
    params = [GenerationParams(**r) for r in rows]
    rp = P.RowParams.from_params(params, V)
    ours = P.process(x, rp, seen=_seen(h))
    for r, kw in enumerate(rows):
        procs = []
        if kw.get("repetition_penalty", 1.0) != 1.0:
            procs.append(lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
        if kw.get("temperature", 1.0) > 0:
            if kw.get("temperature", 1.0) != 1.0:
                procs.append(lp.TemperatureLogitsWarper(kw["temperature"]))
            if kw.get("top_k"):
                procs.append(lp.TopKLogitsWarper(kw["top_k"]))
            if kw.get("top_p"):
                procs.append(lp.TopPLogitsWarper(kw["top_p"]))
            if kw.get("min_p"):
                procs.append(lp.MinPLogitsWarper(kw["min_p"]))
            if kw.get("typical_p"):
                procs.append(lp.TypicalLogitsWarper(kw["typical_p"]))
        ref = lp.LogitsProcessorList(procs)(h[r : r + 1], x[r : r + 1].clone())
        _same(ours[r : r + 1], ref)


def test_presence_frequency_penalty():
    x = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = P.presence_frequency_penalty(x, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_logit_bias_forces_token():
    x = _logits(2)
    rp = P.RowParams.from_params([GenerationParams(temperature=0, logit_bias={3: 100.0})] * B, V)
    assert P.process(x, rp).argmax(-1).tolist() == [3] * B


# ---------------------------------------------------------------------------- sampling


def test_sampling_per_row_generators_independent_of_neighbours():
    x = _logits(0)
    sample = torch.ones(B, dtype=torch.bool)
    a = [sample_next(x, sample, [make_generator(s) for s in range(B)]) for _ in range(1)][0]
    # row 2 alone, same seed, same logits -> same token
    alone = sample_next(x[2:3], sample[2:3], [make_generator(2)])
    assert alone.item() == a[2].item()
    # a different neighbour seed changes nothing for row 2
    b = sample_next(x, sample, [make_generator(s + 50) if s != 2 else make_generator(2) for s in range(B)])
    assert b[2].item() == a[2].item()


def test_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = make_generator(0)
    draws = [sample_next(logits, torch.tensor([True]), [g]).item() for _ in range(3000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.04 and abs(freq[1] - 0.2) < 0.04


def test_sampling_never_picks_filtered_tokens_and_mixes_greedy_rows():
    # top-k style filtering (-inf) around the edges of the vocabulary: the inverse-CDF draw must
    # land only on finite-logit tokens, whatever the uniform; greedy rows keep their argmax
    x = torch.full((3, 10), float("-inf"))
    x[0, 0] = 0.0  # only the first token allowed
    x[1, 9] = 0.0  # only the last one
    x[2, [3, 5]] = torch.tensor([1.0, 2.0])
    sample = torch.tensor([True, True, False])
    gens = [make_generator(s) for s in (0, 1)] + [None]
    for _ in range(200):
        t = sample_next(x, sample, gens).tolist()
        assert t[0] == 0 and t[1] == 9 and t[2] == 5


def test_draw_picks_the_first_token_whose_cdf_passes_each_rows_uniform():
    from aigc.generation.sampling import _draw

    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.5]])
    for u0, u1, want in ((0.05, 0.49, [0, 0]), (0.1, 0.5, [1, 3]), (0.59, 0.99, [2, 3]), (0.6, 0.0, [3, 0])):
        assert _draw(probs.log(), [u0, u1]).tolist() == want
    assert _draw(torch.zeros(0, 4), []).tolist() == []  # no sampling rows (an empty buffer)


def test_greedy_rows_take_argmax():
    x = _logits(4)
    tok = sample_next(x, torch.zeros(B, dtype=torch.bool), [None] * B)
    assert tok.tolist() == x.argmax(-1).tolist()


def test_token_logprobs_top_alternatives():
    x = _logits(0)
    tokens = x.argmax(-1)
    chosen, top = token_logprobs(x, tokens, 3)
    ref = torch.log_softmax(x, -1)
    assert chosen == pytest.approx(ref.max(-1).values.tolist(), abs=1e-6)
    assert [t[0][0] for t in top] == tokens.tolist() and all(len(t) == 3 for t in top)


# ---------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=3, top_p=0.9), "num_beams=3 cannot be combined with top_p"),
        (dict(num_beams=3, do_sample=True), "do_sample"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=-5), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(n=0), "n="),
        (dict(temperature=0.0, do_sample=True), "do_sample"),
    ],
)
def test_invalid_params_name_the_parameter(kw, word):
    with pytest.raises(AigcError, match=word):
        GenerationParams(**kw)


def test_params_roundtrip_and_seed():
    p = make_params({"temperature": 0.5}, top_k=3, seed=None).resolved()
    assert isinstance(p.seed, int)
    q = GenerationParams.from_dict(p.to_dict() | {"logit_bias": {}})
    assert q == p
    # to_dict is dataclasses.asdict (fresh lists: changing one leaves the params alone) with JSON keys
    r = make_params(stop=["a"], bad_words_ids=[[1, 2]], logit_bias={5: 1.5}, seed=3)
    d = r.to_dict()
    assert d == {**dataclasses.asdict(r), "logit_bias": {"5": 1.5}} and list(d) == list(dataclasses.asdict(r))
    d["stop"].append("b"), d["bad_words_ids"][0].append(3)
    assert r.stop == ["a"] and r.bad_words_ids == [[1, 2]]
    with pytest.raises(AigcError, match="unknown generation parameter"):
        GenerationParams.from_dict({"temprature": 1.0})


def test_row_params_flags_follow_the_rows_a_select_keeps():
    """Flags come from the rows' own values (warpers from sampling rows only), after every select,
    and the tensors built on first use hold each row's values in row order."""
    params = [
        GenerationParams(temperature=0.0, top_k=5, repetition_penalty=1.3),  # greedy: top_k unused
        GenerationParams(temperature=0.7, logit_bias={2: 5.0}),
        GenerationParams(top_p=0.9, presence_penalty=0.5, no_repeat_ngram_size=2),
    ]
    rp = P.RowParams.from_params(params, V)
    flags = (
        "any_sample",
        "all_sample",
        "use_rep",
        "use_pf",
        "use_temp",
        "use_top_k",
        "use_top_p",
        "use_ngram",
    )
    assert [getattr(rp, f) for f in flags] == [True, False, True, True, True, False, True, True]
    assert rp.sample.tolist() == [False, True, True] and rp.top_k.tolist() == [5, 0, 0]
    assert rp.temperature.tolist() == pytest.approx([1.0, 0.7, 1.0])  # greedy rows keep the raw logits
    assert rp.logit_bias[1, 2] == 5.0 and rp.logit_bias.sum() == 5.0
    only_greedy = rp.select(torch.tensor([0]))
    assert [getattr(only_greedy, f) for f in flags] == [False, False, True, False, False, False, False, False]
    assert only_greedy.logit_bias is None
    last_two = rp.select(torch.tensor([2, 1]))
    assert [getattr(last_two, f) for f in flags] == [True, True, False, True, True, False, True, True]
    assert last_two.top_p.tolist() == pytest.approx([0.9, 1.0]) and last_two.ngram == [2, 0]
    assert last_two.logit_bias[1, 2] == 5.0
