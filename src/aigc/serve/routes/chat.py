"""POST /v1/chat/completions: conversations, OpenAI's shape (stream, stream_options, n, logprobs).

The messages become one prompt through the model's chat format (`TextGenerator.chat_prompt`):
a transformers model's own chat template when it has one, else the documented plain-text format
"System: ... / User: ... / Assistant:" with generation stopped at the next "\\nUser:". The oldest
turns are dropped when the conversation does not fit the context. A reply's leading whitespace
(after "Assistant:") is not part of its content. A prompt cut to the context (a single message too
long) is said in `warnings` (a stream's first chunk). Messages are text: an image part is 400.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from aigc.generation.params import make_params
from aigc.serve.app import ApiError, identity
from aigc.serve.routes import feedback
from aigc.serve.routes.common import (
    Slot,
    chat_logprobs,
    check_request,
    check_token_ids,
    collect,
    load_text_model,
    new_id,
    prompt_warnings,
    usage,
)
from aigc.serve.routes.moderations import CONTENT_FILTER, StreamGuard, moderate_prompts, moderator, outcome
from aigc.serve.schemas import ChatRequest, ChatResponse, ErrorResponse
from aigc.serve.streaming import SSEResponse, TextCall, sse, sse_batches

router = APIRouter(tags=["text"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 429, 503, 504)}


@router.post(
    "/v1/chat/completions", summary="Reply to a conversation", response_model=ChatResponse, responses=ERRORS
)
async def chat_completions(body: ChatRequest, request: Request, key: str = Depends(identity)):
    st = request.app.state
    check_request(body)
    for i, m in enumerate(body.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text":
                raise ApiError(400, f"messages[{i}].content[{j}] is an {part.type} part: image inputs are not "
                               "supported by text models; send text parts only", "unsupported", "messages")  # fmt: skip
    if body.stream and body.logprobs:
        raise ApiError(
            400, "logprobs are not streamed; drop logprobs or set stream=false", "unsupported", "logprobs"
        )
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_value", "top_logprobs")
    kw = body.generation_params(st.settings.default_max_tokens)
    if body.max_completion_tokens is not None:
        kw["max_new_tokens"] = body.max_completion_tokens
    params = make_params(**kw, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    # the user turns: a blocked category is 400 content_blocked (+ a row); replies are checked below
    user_turns = "\n".join(m.text() for m in body.messages if m.role == "user")
    [prompt_check] = await moderate_prompts(
        request, [user_turns], kind="text", model=body.model, param="messages"
    )
    mod = moderator(request)
    lm = await load_text_model(request, body.model)
    gen = lm.generator
    check_token_ids(gen, body)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    prompt = gen.chat_prompt(messages, params.max_new_tokens)
    params = dataclasses.replace(params, stop=list(params.stop) + gen.chat_stops())
    slot = Slot(request, key)
    call = TextCall(lm.scheduler, st.settings.request_timeout_s)
    try:
        call.add(prompt, params)
    except BaseException:
        slot.release()
        raise
    rid, created, model = new_id("chatcmpl"), int(time.time()), lm.entry.id
    t0 = time.perf_counter()

    async def record(rs: list, checks: list) -> list[int]:
        # every reply lands in the store (prompt = the formatted conversation; messages in params)
        # with its moderation verdict; a blocked reply's text is not kept
        rows = [feedback.text_row(lm.entry, prompt, r, time.perf_counter() - t0, messages=messages)
                for r in rs]  # fmt: skip
        for row, r, c in zip(rows, rs, checks, strict=True):
            row["output_text"] = None if c.blocked else r.text.lstrip()
            row["moderation"] = mod.verdict(prompt_check, c)
        return await st.text_recorder.record(lm.entry, rows)  # with other requests' rows

    seeds = call.seeds

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices, **extra):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, "seed": seeds[0], **extra})  # fmt: skip

        started = [False] * call.n  # leading whitespace is dropped until the reply starts
        guards = [StreamGuard(mod) for _ in range(call.n)]  # hold back a tail, stop on block
        results = {}

        async def render(kind: str, idx: int, payload: Any) -> list[str]:
            out = []
            g = guards[idx]
            text = g.feed(payload) if kind == "delta" else g.finish(payload.text)
            text = text if started[idx] else text.lstrip()
            if text:
                started[idx] = True
                out.append(chunk([{"index": idx, "delta": {"content": text}, "finish_reason": None}]))
            if kind == "delta":
                return out
            results[idx] = payload
            try:
                [gid] = await record([payload], [g.result])
            except ApiError as e:  # headers are sent: say it in the stream, keep going
                gid = None
                out.append(chunk([], warnings=[e.message]))
            finish = CONTENT_FILTER if g.blocked else payload.finish_reason
            out.append(chunk([{"index": idx, "delta": {}, "finish_reason": finish, "seed": payload.seed,
                               "generation_id": gid, "moderation": outcome(mod, prompt_check, g.result)[1]}],
                             parameters=payload.params))  # fmt: skip
            return out

        def tail() -> list[str]:
            rs = [results[i] for i in range(call.n)]
            return [chunk([], usage=usage(rs, {0}))] if include_usage else []

        # the first chunk says when the prompt was cut to the context
        warnings = prompt_warnings(gen, call, params.max_new_tokens)
        extra = {"warnings": warnings} if warnings else {}
        head = "".join(
            chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                  **(extra if i == 0 else {}))
            for i in range(call.n)
        )  # fmt: skip
        return SSEResponse(lambda: sse_batches(call, render, tail, head), call, slot.release)

    try:
        results = await collect(request, call)
    finally:
        slot.release()
    rs = [results[i] for i in range(call.n)]
    checks = [mod.check(r.text) for r in rs]
    ids = await record(rs, checks)
    return ChatResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            {
                "index": i,
                "message": {"role": "assistant", "content": "" if c.blocked else r.text.lstrip()},
                "finish_reason": CONTENT_FILTER if c.blocked else r.finish_reason,
                "logprobs": None if c.blocked else chat_logprobs(r),
                "seed": r.seed,
                "moderation": outcome(mod, prompt_check, c)[1],
            }  # fmt: skip
            for i, (r, c) in enumerate(zip(rs, checks, strict=True))
        ],
        usage=usage(rs, {0}),
        seed=rs[0].seed,
        parameters=rs[0].params,
        warnings=sorted({w for r in rs for w in r.warnings}),
        generation_ids=ids,
    )
