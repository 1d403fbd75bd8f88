"""best_of for /v1/completions: which scorer a request may use, and the choice among candidates.

OpenAI's `best_of`: each prompt draws `best_of` candidates (seeds seed..seed+best_of-1, rows of the
same batch) and answers with the `n` best, ranked by mean token log-probability. `aigc_scorer`
ranks by a scorer instead, but only one the server allows (`Settings.scorers`, `aigc serve
--scorer`; default `sentiment`); `"default"` names the first of them. A `python:` scorer runs
code, so it is refused from a request whatever the server's list says.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aigc.errors import AigcError
from aigc.generation.best_of import LOGPROB, candidate_params, choose
from aigc.generation.params import GenerationParams
from aigc.serve.app import ApiError

DEFAULT = "default"


def allowed_scorer(spec: str, allowed: list[str]) -> str:
    """The spec a request may use (`default` -> the first allowed), or a 400 naming the allowed ones."""
    names = ", ".join([LOGPROB, DEFAULT, *allowed]) if allowed else LOGPROB
    if spec.startswith("python:"):
        raise ApiError(
            400, f"aigc_scorer {spec!r}: python: scorers run code and are never accepted from a request; "
            f"allowed: {names}", "scorer_not_allowed", "aigc_scorer",
        )  # fmt: skip
    if spec == DEFAULT:
        if not allowed:
            raise ApiError(400, f"this server allows no scorers (aigc serve --scorer SPEC); allowed: {LOGPROB}",
                           "scorer_not_allowed", "aigc_scorer")  # fmt: skip
        return allowed[0]
    if spec != LOGPROB and spec not in allowed:
        raise ApiError(400, f"aigc_scorer {spec!r} is not allowed on this server; allowed: {names}",
                       "scorer_not_allowed", "aigc_scorer")  # fmt: skip
    return spec


async def setup(body: Any, params: GenerationParams, allowed: list[str]) -> tuple[Any, GenerationParams]:
    """(scorer or None, the params to submit per prompt): `best_of` candidate rows when asked."""
    if body.best_of is None:
        if body.aigc_scorer is not None:
            raise ApiError(400, "aigc_scorer ranks best_of candidates: give best_of too", "invalid_request",
                           "aigc_scorer")  # fmt: skip
        return None, params
    if body.stream:
        raise ApiError(400, "best_of cannot be streamed (the best is known at the end); set stream=false",
                       "unsupported", "best_of")  # fmt: skip
    if params.n > body.best_of:
        raise ApiError(400, f"n {params.n} is larger than best_of {body.best_of}; best_of must be >= n",
                       "invalid_request", "best_of")  # fmt: skip
    scorer = None
    spec = allowed_scorer(body.aigc_scorer, allowed) if body.aigc_scorer else LOGPROB
    if spec != LOGPROB:
        from aigc.evaluation.scorers import load_scorer

        try:
            scorer = await asyncio.to_thread(load_scorer, spec)
        except AigcError as e:
            raise ApiError(
                400, f"scorer {spec} is not available: {e}", "scorer_unavailable", "aigc_scorer"
            ) from None
        if scorer.kind != "text":
            raise ApiError(
                400, f"scorer {spec} scores {scorer.kind}, not text", "scorer_not_allowed", "aigc_scorer"
            )
    return scorer, candidate_params(params, body.best_of, scorer)


def pick(results: list[Any], best_of: int, params: GenerationParams, scorer: Any) -> list[Any]:
    """The `params.n` best of each prompt's `best_of` candidates (prompt-major), best first."""
    out: list[Any] = []
    for k in range(0, len(results), best_of):
        out.extend(choose(results[k : k + best_of], params.n, scorer, params.logprobs))
    return out


def choice_fields(result: Any) -> dict[str, Any]:
    """`score` / `scores` of a best_of choice (nothing for a plain one)."""
    if not hasattr(result, "scores"):
        return {}
    return {"score": result.score, "scores": result.scores}
