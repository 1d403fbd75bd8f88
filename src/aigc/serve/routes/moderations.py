"""POST /v1/moderations (OpenAI's shape) and the checks every generation route makes.

The rules are `aigc.safety.moderation` (defaults + `$AIGC_MODERATION`), loaded once per app at
start-up (a bad rules file fails there, not on a request). Each category has a policy:

- prompts (`moderate_prompts`): "block" refuses the request with 400 `content_blocked` naming the
  category, and records a generation row with no output and the verdict ("blocked:<category>"),
  so an admin sees refused requests (`GET /v1/generations?moderation=blocked`); "flag" serves it.
- outputs (`outcome`, `StreamGuard`): "block" withholds the text (empty, `finish_reason:
  "content_filter"` as OpenAI does) and stores the row without its output; "flag" delivers it.
  Either way the choice / image carries `moderation: {"action", "categories"}` and the stored row
  the verdict ("flagged:violence", "blocked:self-harm": the prompt's and the output's together).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field

from aigc.errors import AigcError
from aigc.safety.moderation import ModerationResult, Moderator, StreamGuard
from aigc.serve import settings as S
from aigc.serve.app import ApiError
from aigc.serve.routes import feedback
from aigc.serve.routes.common import new_id
from aigc.serve.schemas import Strict, one_or_many

router = APIRouter(tags=["safety"])
log = logging.getLogger("aigc.serve")
MAX_INPUTS = 32
MODEL = "aigc-rules"  # the only moderation "model": word / regex rules, no classifier
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for an output withheld by moderation
__all__ = ["StreamGuard", "moderate_prompts", "moderator", "outcome"]

Text = Annotated[str, Field(max_length=S.MAX_PROMPT_CHARS)]


class ModerationRequest(Strict):
    # (checked as the value's form: an empty list is "at least 1 item", not "a valid string")
    input: one_or_many(
        Text,
        Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)],
        "a string or a list of strings",
    )
    model: str | None = Field(None, max_length=S.MAX_MODEL_NAME)


def moderator(request: Request) -> Moderator:
    """The app's rules (built by `create_app`; loaded on first use when an app was built without)."""
    st = request.app.state
    if getattr(st, "moderator", None) is None:
        st.moderator = Moderator.load()
    return st.moderator


async def moderate_prompts(request: Request, texts: list[str], *, kind: str, model: str,
                           params: dict[str, Any] | None = None, param: str = "prompt") -> list[ModerationResult]:  # fmt: skip
    """Check a request's prompts (one result per text). A blocked one is recorded (a generation
    row with no output and the verdict) and the request refused: 400, code content_blocked."""
    mod = moderator(request)
    results = [mod.check(t) for t in texts]
    blocked = [(t, r) for t, r in zip(texts, results, strict=True) if r.blocked]
    for r in results:
        if r.flagged and not r.blocked:
            log.info("moderation flagged a %s: %s", param, ", ".join(r.matches))
    if not blocked:
        return results
    try:
        name = feedback.model_name(request.app.state.registry.resolve(model))
    except AigcError:  # an unknown model: record the id asked for
        name = model
    rows = [dict(kind=kind, model=name, prompt=t, params={**(params or {}), "moderated": param},
                 moderation=mod.verdict(r)) for t, r in blocked]  # fmt: skip
    try:
        await feedback.run_store(lambda: request.app.state.store.add_generations(rows))
    except ApiError as e:  # the refusal matters more than its record
        log.warning("could not record a blocked %s: %s", param, e.message)
    cats = ", ".join(blocked[0][1].blocked_categories(mod.policies))
    raise ApiError(400, f"{param} blocked by moderation (category: {cats}); rephrase it",
                   "content_blocked", param)  # fmt: skip


def outcome(mod: Moderator, *results: ModerationResult | None) -> tuple[str | None, dict[str, Any] | None]:
    """(store verdict, response `moderation` field) of one output from its checks (prompt, output):
    (None, None) when nothing matched."""
    verdict = mod.verdict(*results)
    if verdict is None:
        return None, None
    cats = sorted({c for r in results if r is not None for c, hit in r.categories.items() if hit})
    return verdict, {"action": "block" if verdict.startswith("blocked") else "flag", "categories": cats}


@router.post("/v1/moderations", summary="Classify text against the moderation rules")
async def moderations(body: ModerationRequest, request: Request) -> dict:
    if body.model not in (None, MODEL, "omni-moderation-latest", "text-moderation-latest"):
        raise ApiError(404, f"moderation model {body.model!r} not found; use {MODEL!r} (or omit it)",
                       "model_not_found", "model")  # fmt: skip
    texts = [body.input] if isinstance(body.input, str) else body.input
    mod = moderator(request)
    return {"id": new_id("modr"), "model": MODEL, "results": [mod.check(t).to_openai() for t in texts]}
