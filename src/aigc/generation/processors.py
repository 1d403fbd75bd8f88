"""Logits processors: pure functions of (logits (B, V), history, per-row parameters).

Every parameter is a tensor with one value per row, so one batch can mix requests (one row at
temperature 0.7 with top-p 0.9 next to a greedy one). A row whose value is the neutral one
(top_k 0, top_p 1, min_p 0, ...) passes through unchanged. Semantics match the processors of the
same name in `transformers.generation.logits_process` (the oracle tests check it), applied in the
same order as `GenerationMixin._get_logits_processor`:

  logit bias, repetition penalty, presence/frequency penalty, no-repeat-ngram, bad words   (all rows)
  temperature, top-k, top-p, min-p, typical-p                                 (sampling rows only)
  green-list watermark (aigc.safety.watermark_text)                   (rows with watermark=True)

History is passed in the form that is cheap to keep up to date during decoding: `seen` (B, V)
bool (token occurs in prompt + generated), `counts` (B, V) (occurrences among generated tokens),
and per-row token lists for the n-gram and bad-word rules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from aigc.generation.params import GenerationParams

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- penalties (all rows)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL repetition penalty: a seen token's logit is divided by `penalty` (multiplied if negative)."""
    p = penalty[:, None]  # (B, 1)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI penalties: logit - presence * [count > 0] - frequency * count."""
    return (
        logits
        - presence[:, None] * (counts > 0).to(logits.dtype)
        - frequency[:, None] * counts.to(logits.dtype)
    )


def ban_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """Set the listed token ids of each row to -inf (n-gram and bad-word rules end here)."""
    rows = [r for r, ids in enumerate(banned) for _ in ids]
    if not rows:
        return logits
    cols = [t for ids in banned for t in ids]
    out = logits.clone()
    out[torch.tensor(rows), torch.tensor(cols)] = NEG_INF
    return out


class NGramIndex:
    """The n-grams of one row's history, kept up to date token by token.

    `banned()` lists the tokens that would complete an n-gram already present (transformers'
    `NoRepeatNGramLogitsProcessor`: prompt tokens count too).
    """

    def __init__(self, n: int, tokens: Sequence[int] = ()) -> None:
        self.n = n
        self.tokens: list[int] = []
        self.next: dict[tuple[int, ...], set[int]] = {}
        for t in tokens:
            self.add(t)

    def add(self, token: int) -> None:
        self.tokens.append(int(token))
        if len(self.tokens) >= self.n:
            gram = self.tokens[len(self.tokens) - self.n :]
            self.next.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> list[int]:
        if self.n <= 0 or len(self.tokens) < self.n:
            return []
        prefix = tuple(self.tokens[len(self.tokens) - self.n + 1 :]) if self.n > 1 else ()
        return sorted(self.next.get(prefix, ()))


def no_repeat_ngram_banned(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `tokens` (pure form of NGramIndex)."""
    return NGramIndex(n, tokens).banned() if n > 0 else []


def bad_words_banned(tokens: Sequence[int], bad_words_ids: Sequence[Sequence[int]]) -> list[int]:
    """Last tokens of bad sequences whose prefix ends the history (single tokens: always banned)."""
    out = []
    for seq in bad_words_ids:
        k = len(seq) - 1
        if k == 0 or (len(tokens) >= k and list(tokens[len(tokens) - k :]) == list(seq[:-1])):
            out.append(seq[-1])
    return out


# ---------------------------------------------------------------------------- warpers (sampling rows)


def temperature(logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (> 0)."""
    return logits / temp[:, None]


def top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k highest logits (ties with the k-th kept); k == 0 leaves the row alone."""
    V = logits.shape[-1]
    k = k.clamp(max=V)
    kmax = int(k.max())
    if kmax == 0:
        return logits
    kth = torch.topk(logits, kmax, dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])  # (B, 1)
    remove = (logits < kth) & (k > 0)[:, None]
    return logits.masked_fill(remove, NEG_INF)


def top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p; p == 1 is off."""
    sorted_logits, idx = torch.sort(logits, descending=False)  # (B, V) ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)[:, None]
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove_sorted &= (p < 1)[:, None]
    remove = remove_sorted.scatter(1, idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below m * (probability of the most likely token)."""
    probs = logits.softmax(dim=-1)
    remove = probs < m[:, None] * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def typical_p(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): keep tokens whose surprisal is closest to the
    entropy until their probability mass reaches `mass`; mass == 1 is off."""
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)  # (B, 1)
    shifted = (-logp - ent).abs()  # distance of each token's surprisal from the entropy
    sorted_shift, idx = torch.sort(shifted, descending=False)
    cum = logits.gather(-1, idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass[:, None]).sum(dim=1).clamp(max=logits.shape[-1] - 1)  # (B,)
    remove_sorted = sorted_shift > sorted_shift.gather(1, last[:, None])
    remove_sorted[:, 0] = False
    remove_sorted &= (mass < 1)[:, None]
    remove = remove_sorted.scatter(1, idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


# ---------------------------------------------------------------------------- a batch of rows


FLOAT_PARAMS = (
    "temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip


# what a row needs (`row_flags`): one bit per processor, so a batch's flags are the OR of its rows'
SAMPLE, REP, PF, TEMP, TOP_K, TOP_P, MIN_P, TYPICAL, BIAS, NGRAM, BAD, WATERMARK = (1 << i for i in range(12))


def row_flags(p: GenerationParams) -> int:
    """The processors one row's parameters use, as bits (the warpers only for sampling rows)."""
    f = (
        (REP if p.repetition_penalty != 1 else 0)
        | (PF if p.presence_penalty or p.frequency_penalty else 0)
        | (BIAS if p.logit_bias else 0)
        | (NGRAM if p.no_repeat_ngram_size else 0)
        | (BAD if p.bad_words_ids else 0)
        | (WATERMARK if p.watermark else 0)
    )
    if p.sampling:
        f |= (
            SAMPLE
            | (TEMP if p.temperature != 1 else 0)
            | (TOP_K if p.top_k > 0 else 0)
            | (TOP_P if p.top_p < 1 else 0)
            | (MIN_P if p.min_p > 0 else 0)
            | (TYPICAL if p.typical_p < 1 else 0)
        )
    return f


class RowParams:
    """Per-row parameter tensors for a batch, plus flags that skip processors no row uses.

    The flags are the OR of the rows' `row_flags` (a server keeps each row's and passes them as
    `flags`, so a join or a leave costs one OR per row); the tensors (`sample`, `temperature`,
    `top_k`, ... `logit_bias`) are built on first use. Most batches use no processor at all, and
    rows join and leave a server's batch every few steps: building a dozen tensors for 16 rows each
    time (and reading them back for the flags) was 45 us a join and 33 a leave.
    """

    def __init__(
        self, params: Sequence[GenerationParams], vocab_size: int, flags: Sequence[int] | None = None
    ) -> None:
        self.params = list(params)
        self.vocab_size = vocab_size
        self.flags = [row_flags(p) for p in self.params] if flags is None else list(flags)
        every, some = -1, 0
        for f in self.flags:
            every &= f
            some |= f
        self.any_sample, self.all_sample = bool(some & SAMPLE), bool(every & SAMPLE)
        self.use_rep = bool(some & REP)
        self.use_pf = bool(some & PF)
        self.use_temp = bool(some & TEMP)
        self.use_top_k = bool(some & TOP_K)
        self.use_top_p = bool(some & TOP_P)
        self.use_min_p = bool(some & MIN_P)
        self.use_typical = bool(some & TYPICAL)
        self.use_bias = bool(some & BIAS)
        self.use_ngram = bool(some & NGRAM)
        self.use_bad = bool(some & BAD)
        self.ngram: list[int] = [p.no_repeat_ngram_size for p in self.params]
        self.bad_words_ids: list[list[list[int]]] = [p.bad_words_ids for p in self.params]
        self.watermark: list | None = None  # per row: a safety.watermark_text.WatermarkConfig or None
        if some & WATERMARK:
            from aigc.safety.watermark_text import load_config  # a leaf module: imports nothing above utils

            cfg = load_config()
            self.watermark = [cfg if p.watermark else None for p in self.params]
        self.use_watermark = self.watermark is not None

    @classmethod
    def from_params(
        cls, params: Sequence[GenerationParams], vocab_size: int, flags: Sequence[int] | None = None
    ) -> RowParams:
        return cls(params, vocab_size, flags)

    def select(self, rows: torch.Tensor) -> RowParams:
        """The parameters of a subset of rows (when finished rows leave the batch)."""
        idx = rows.tolist()
        return RowParams([self.params[i] for i in idx], self.vocab_size, [self.flags[i] for i in idx])

    @functools.cached_property
    def sample(self) -> torch.Tensor:
        """(B,) bool: sampling row (else greedy)."""
        return torch.tensor([p.sampling for p in self.params], dtype=torch.bool)

    @functools.cached_property
    def top_k(self) -> torch.Tensor:
        return torch.tensor([p.top_k for p in self.params], dtype=torch.long)

    @functools.cached_property
    def _floats(self) -> dict[str, torch.Tensor]:
        # every float parameter of every row in one tensor (one `torch.tensor` call), one
        # contiguous row per parameter; a greedy row's temperature is 1 (it keeps the raw logits)
        cols = torch.tensor(
            [
                [p.temperature if p.sampling else 1.0] + [getattr(p, name) for name in FLOAT_PARAMS[1:]]
                for p in self.params
            ],
            dtype=torch.float32,
        ).reshape(len(self.params), len(FLOAT_PARAMS))
        return dict(zip(FLOAT_PARAMS, cols.t().contiguous().unbind(), strict=True))

    temperature = property(lambda self: self._floats["temperature"])
    top_p = property(lambda self: self._floats["top_p"])
    min_p = property(lambda self: self._floats["min_p"])
    typical_p = property(lambda self: self._floats["typical_p"])
    repetition_penalty = property(lambda self: self._floats["repetition_penalty"])
    presence_penalty = property(lambda self: self._floats["presence_penalty"])
    frequency_penalty = property(lambda self: self._floats["frequency_penalty"])

    @functools.cached_property
    def logit_bias(self) -> torch.Tensor | None:
        """(B, V) added to the logits, or None when no row has a bias."""
        if not self.use_bias:
            return None
        bias = torch.zeros(len(self.params), self.vocab_size)
        for r, p in enumerate(self.params):
            for t, b in p.logit_bias.items():
                if t < self.vocab_size:
                    bias[r, t] = b
        return bias


def process(
    logits: torch.Tensor,
    rp: RowParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    histories: Sequence[Sequence[int]] | None = None,
    ngrams: Sequence[NGramIndex | None] | None = None,
) -> torch.Tensor:
    """All processors in transformers' order; skips each one no row uses (per-step overhead matters)."""
    # 1. penalties and bans: they change what greedy picks too
    if rp.use_bias:
        logits = logits + rp.logit_bias
    if seen is not None and rp.use_rep:
        logits = repetition_penalty(logits, seen, rp.repetition_penalty)
    if counts is not None and rp.use_pf:
        logits = presence_frequency_penalty(logits, counts, rp.presence_penalty, rp.frequency_penalty)
    if ngrams is not None and rp.use_ngram:
        logits = ban_tokens(logits, [ix.banned() if ix is not None else [] for ix in ngrams])
    if histories is not None and rp.use_bad:
        logits = ban_tokens(
            logits, [bad_words_banned(h, b) for h, b in zip(histories, rp.bad_words_ids, strict=True)]
        )
    # 2. warpers: reshape the distribution of sampling rows only (greedy rows keep temperature 1)
    if not rp.any_sample:
        return _watermark(logits, rp, histories)
    if not (rp.use_temp or rp.use_top_k or rp.use_top_p or rp.use_min_p or rp.use_typical):
        return _watermark(logits, rp, histories)
    s = rp.sample
    if rp.use_temp:
        logits = temperature(logits, rp.temperature)
    if rp.use_top_k:
        logits = top_k(logits, torch.where(s, rp.top_k, 0))
    if rp.use_top_p:
        logits = top_p(logits, torch.where(s, rp.top_p, 1.0))
    if rp.use_min_p:
        logits = min_p(logits, torch.where(s, rp.min_p, 0.0))
    if rp.use_typical:
        logits = typical_p(logits, torch.where(s, rp.typical_p, 1.0))
    return _watermark(logits, rp, histories)


def _watermark(
    logits: torch.Tensor, rp: RowParams, histories: Sequence[Sequence[int]] | None
) -> torch.Tensor:
    """3. green-list watermark last, after the warpers (transformers appends its processor at the end)."""
    if not rp.use_watermark or histories is None:
        return logits
    from aigc.safety.watermark_text import watermark_logits

    return watermark_logits(logits, histories, rp.watermark)
