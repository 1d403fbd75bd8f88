"""Best-of-n: draw several candidates, keep the ones a scorer likes best (refinement at generation time).

    results = generate_best_of(gen, "The pizza", best_of=4, scorer="sentiment", seed=0)
    results[0].text, results[0].score, results[0].scores     # the winner, its score, all four

For each prompt the `best_of` candidates are rows of ONE batched engine call with seeds
seed .. seed+best_of-1 (exactly what `generate(prompt, n=best_of)` gives), so the winner can be
reproduced alone from its own seed. The `n` best (n <= best_of) are returned, best first.

The default scorer is OpenAI's `best_of` rule: the highest mean token log-probability (under the
raw distribution, as `logprobs` reports it). Any `aigc.evaluation.scorers` scorer of kind "text"
(sentiment, label:NAME, python:FILE.py:FUNC) ranks the completion texts instead. Images:
`best_images` keeps the n best of a larger batch under an image scorer (digit:K@DATA).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aigc.errors import AigcError
from aigc.generation.params import GenerationParams, make_params
from aigc.generation.text import GenerationResult

LOGPROB = "logprob"  # the name of the default scorer (mean token log-probability)
MAX_BEST_OF = 64


@dataclass
class BestOfResult(GenerationResult):
    """A GenerationResult chosen among candidates: `score` is its score, `scores` all candidates'
    (in seed order), `candidate_seeds` their seeds, `scorer` the scorer's name."""

    best_of: int = 1
    scores: list[float] = field(default_factory=list)
    candidate_seeds: list[int | None] = field(default_factory=list)
    scorer: str = LOGPROB


def resolve_scorer(scorer: Any) -> Any:
    """None (mean log-prob), a Scorer, or a spec string -> None or a text Scorer."""
    if scorer is None or scorer == LOGPROB:
        return None
    return scorer_of_kind(
        scorer,
        "text",
        "pick a text scorer (sentiment, label:NAME@PATH, python:FILE.py:FUNC) for text best_of",
    )


def scorer_of_kind(scorer: Any, kind: str, hint: str) -> Any:
    """A Scorer (or a spec string, loaded) that scores `kind`; else an AigcError ending in `hint`."""
    if isinstance(scorer, str):
        from aigc.evaluation.scorers import load_scorer

        scorer = load_scorer(scorer)
    if getattr(scorer, "kind", None) != kind:
        have = getattr(scorer, "kind", "?")
        raise AigcError(f"scorer {getattr(scorer, 'name', scorer)} scores {have}, not {kind}; {hint}")
    return scorer


def check_best_of(best_of: int, n: int, num_beams: int = 1) -> None:
    if not isinstance(best_of, int) or not 1 <= best_of <= MAX_BEST_OF:
        raise AigcError(f"best_of {best_of!r} is out of range; allowed: an integer in 1..{MAX_BEST_OF}")
    if n > best_of:
        raise AigcError(f"n {n} is larger than best_of {best_of}; best_of must be >= n")
    if num_beams > 1:
        raise AigcError("best_of samples candidates: use it with num_beams=1 (beam search ranks itself)")


def candidate_params(params: GenerationParams, best_of: int, scorer: Any) -> GenerationParams:
    """The rows to draw: n = best_of (seeds seed..seed+best_of-1); log-probs when they rank."""
    return dataclasses.replace(params, n=best_of, logprobs=params.logprobs or scorer is None).resolved()


def mean_logprob(result: GenerationResult) -> float:
    """Mean token log-probability of a completion (-inf for an empty one: nothing to prefer)."""
    lps = [t["logprob"] for t in result.logprobs or []]
    return sum(lps) / len(lps) if lps else -math.inf


def choose(
    candidates: Sequence[GenerationResult], n: int, scorer: Any, keep_logprobs: bool
) -> list[BestOfResult]:
    """The n best of one prompt's candidates (best first), each carrying every candidate's score."""
    if scorer is None:
        scores = [mean_logprob(r) for r in candidates]
        name = LOGPROB
    else:
        scores = scorer.score([r.text for r in candidates])
        name = scorer.name
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))  # ties: lower seed first
    seeds = [r.seed for r in candidates]
    out = []
    for i in order[:n]:
        r = candidates[i]
        fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(GenerationResult)}
        if not keep_logprobs:
            fields["logprobs"] = None  # asked for only to rank
        fields["params"] = {**r.params, "logprobs": keep_logprobs, "best_of": len(candidates), "scorer": name}
        out.append(BestOfResult(**fields, best_of=len(candidates), scores=list(scores),
                                candidate_seeds=seeds, scorer=name))  # fmt: skip
        out[-1].score = scores[i]
    return out


def generate_best_of(
    gen: Any,
    prompt: str | Sequence[str] = "",
    best_of: int = 4,
    scorer: Any = None,
    params: GenerationParams | dict | None = None,
    **kwargs: Any,
) -> list[BestOfResult]:
    """For each prompt, the `n` best of `best_of` candidates drawn in one batch (prompt-major).

    `gen`: a TextGenerator / HFTextGenerator; `scorer`: None (mean log-prob), a text Scorer or a
    spec (`sentiment`, `label:NAME@PATH`, `python:FILE.py:FUNC`); other arguments as `generate`.
    """
    p = make_params(params, **kwargs)
    check_best_of(best_of, p.n, p.num_beams)
    scorer = resolve_scorer(scorer)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    cand = candidate_params(p, best_of, scorer)
    results = gen.generate(prompts, cand)  # len(prompts) * best_of rows, prompt-major, one batch
    out: list[BestOfResult] = []
    for k in range(len(prompts)):
        out.extend(choose(results[k * best_of : (k + 1) * best_of], p.n, scorer, p.logprobs))
    for i, r in enumerate(out):
        r.index = i
    return out


# ----------------------------------------------------------------------------- images


def best_images(result: Any, n: int, scorer: Any) -> tuple[Any, list[float]]:
    """Keep the n best images of a `GeneratedImages` under an image scorer (best first).

    Returns (GeneratedImages with n images, the scores of all candidates in their order); each
    kept image's params gain `best_of`, `scorer` and `score`.
    """
    from aigc.generation.image import GeneratedImages

    scorer = scorer_of_kind(scorer, "image", "use an image scorer such as digit:K@DATA_DIR")
    scores = scorer.score(result.images)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]
    params = [
        {**result.params[i], "best_of": len(scores), "scorer": scorer.name, "score": scores[i]} for i in order
    ]
    tensor = result.tensor[order] if result.tensor is not None else None
    return GeneratedImages([result.images[i] for i in order], params, tensor), scores


__all__ = ["LOGPROB", "BestOfResult", "best_images", "choose", "generate_best_of", "resolve_scorer"]
