"""Choosing the next token from processed logits: greedy or sampled, one torch.Generator per row.

Each row draws from its own generator, seeded from the request's recorded seed, exactly once per
step. So a row's tokens depend only on its own seed and logits, never on which other requests
share the batch: same seed, same request -> same text, alone or batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded for one row (CPU keeps results identical across machines/devices)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def sample_next(
    logits: torch.Tensor,
    sample: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    any_sample: bool | None = None,
) -> torch.Tensor:
    """Next token per row: argmax for greedy rows, a draw from softmax(logits) for sampling rows.

    Args:
        logits: (B, V) processed logits (-inf where filtered).
        sample: (B,) bool, True for sampling rows.
        generators: one generator per row (None allowed for greedy rows).
        any_sample: precomputed `sample.any()` (saves a sync per step).
    Returns:
        (B,) long token ids.
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    if any_sample is None:
        any_sample = bool(sample.any())
    if not any_sample:
        return tokens
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    for r in sample.nonzero().flatten().tolist():
        # one draw per row per step, from that row's own generator
        tokens[r] = torch.multinomial(probs[r], 1, generator=generators[r])[0]
    return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of the chosen tokens and the top-n alternatives, per row.

    Computed from the model's raw distribution (before penalties and filters), as OpenAI and vLLM
    report them, so they measure how likely the model found each token.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    if top_n <= 0:
        return chosen, [[] for _ in chosen]
    vals, idx = torch.topk(logp, top_n, dim=-1)
    top = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=False)]
    return chosen, top
