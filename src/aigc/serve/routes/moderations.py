"""POST /v1/moderations (OpenAI's shape) and the prompt check the text routes call.

The rules are `aigc.safety.moderation` (defaults + `$AIGC_MODERATION`), loaded once per app at
start-up (a bad rules file fails there, not on a request). A prompt that hits a category whose
policy is "block" is refused with 400 and code `content_blocked`, naming the category; "flag"
lets it through (the category shows in /v1/moderations and in the server log).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import Field

from aigc.safety.moderation import Moderator
from aigc.serve import settings as S
from aigc.serve.app import ApiError
from aigc.serve.routes.common import new_id
from aigc.serve.schemas import Strict

router = APIRouter(tags=["safety"])
log = logging.getLogger("aigc.serve")
MAX_INPUTS = 32
MODEL = "aigc-rules"  # the only moderation "model": word / regex rules, no classifier

Text = Annotated[str, Field(max_length=S.MAX_PROMPT_CHARS)]


class ModerationRequest(Strict):
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
    model: str | None = Field(None, max_length=S.MAX_MODEL_NAME)


def moderator(request: Request) -> Moderator:
    """The app's rules (built by `create_app`; loaded on first use when an app was built without)."""
    st = request.app.state
    if getattr(st, "moderator", None) is None:
        st.moderator = Moderator.load()
    return st.moderator


def check_prompts(request: Request, texts: list[str], param: str = "prompt") -> None:
    """Refuse (400, content_blocked) texts in a blocked category; log flagged ones."""
    mod = moderator(request)
    for text in texts:
        r = mod.check(text)
        if r.blocked:
            cats = ", ".join(r.blocked_categories(mod.policies))
            raise ApiError(400, f"{param} blocked by moderation (category: {cats}); rephrase it",
                           "content_blocked", param)  # fmt: skip
        if r.flagged:
            log.info("moderation flagged a %s: %s", param, ", ".join(r.matches))


@router.post("/v1/moderations", summary="Classify text against the moderation rules")
async def moderations(body: ModerationRequest, request: Request) -> dict:
    if body.model not in (None, MODEL, "omni-moderation-latest", "text-moderation-latest"):
        raise ApiError(404, f"moderation model {body.model!r} not found; use {MODEL!r} (or omit it)",
                       "model_not_found", "model")  # fmt: skip
    texts = [body.input] if isinstance(body.input, str) else body.input
    mod = moderator(request)
    return {"id": new_id("modr"), "model": MODEL, "results": [mod.check(t).to_openai() for t in texts]}
