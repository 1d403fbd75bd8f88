"""POST /v1/completions: text continuation, OpenAI's shape (several prompts, n, stream, logprobs).

Choice index = prompt index * n + sample index (OpenAI's order); sample k of a request uses seed
`seed + k`, so each choice can be reproduced alone. A prompt is a text or its token ids (below the
model's vocabulary size; echo and the store get their decoded text). A prompt longer than the
model's context keeps its tail (the engine's context policy); the response's `warnings` says so (a
stream's first chunk). With echo, logprobs cover the prompt's tokens too (one forward pass over
it; the first token has none) and `text_offset` indexes the returned text. Every choice is
recorded in the content store: `generation_ids[i]` is choice i's id, to rate it with (a stream
gives `generation_id` in each choice's last chunk, the one with its finish_reason).
`best_of` (+ `aigc_scorer`, a scorer the server allows): the n best of best_of candidates per
prompt, see `routes/best_of.py`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from aigc.generation.params import make_params
from aigc.serve.app import ApiError, identity
from aigc.serve.routes import best_of, feedback
from aigc.serve.routes.common import (
    Slot,
    check_request,
    check_token_ids,
    collect,
    completion_logprobs,
    load_text_model,
    new_id,
    prompt_warnings,
    usage,
)
from aigc.serve.routes.moderations import CONTENT_FILTER, StreamGuard, moderate_prompts, moderator, outcome
from aigc.serve.schemas import CompletionRequest, CompletionResponse, ErrorResponse
from aigc.serve.streaming import SSEResponse, TextCall, sse, sse_batches

router = APIRouter(tags=["text"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 429, 503, 504)}


@router.get("/v1/scorers", summary="The scorers best_of may rank by here", responses=ERRORS)
async def list_scorers(request: Request) -> dict[str, Any]:
    """`logprob` always; `default` (the first allowed scorer) when it loads. A client (the studio's
    "regenerate with feedback") asks first instead of provoking a 400. Kinds only, never paths."""
    data = [{"id": best_of.LOGPROB, "object": "scorer", "kind": best_of.LOGPROB}]
    allowed = request.app.state.settings.scorers
    if allowed:
        from aigc.errors import AigcError
        from aigc.evaluation.scorers import load_scorer

        try:
            scorer = await asyncio.to_thread(load_scorer, allowed[0])
            if scorer.kind == "text":
                data.append({"id": best_of.DEFAULT, "object": "scorer", "kind": allowed[0].split(":")[0]})
        except AigcError:
            pass  # allowed but not available (e.g. no sentiment classifier trained): not listed
    return {"object": "list", "data": data}


@router.post(
    "/v1/completions", summary="Continue a prompt", response_model=CompletionResponse, responses=ERRORS
)
async def completions(body: CompletionRequest, request: Request, key: str = Depends(identity)):
    st = request.app.state
    check_request(body)
    if body.stream and body.logprobs is not None:
        raise ApiError(
            400, "logprobs are not streamed; drop logprobs or set stream=false", "unsupported", "logprobs"
        )
    params = make_params(
        **body.generation_params(st.settings.default_max_tokens),
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )
    prompts = body.prompts()  # texts, or token-id lists (submitted as they are)
    lm, texts = None, prompts
    if not isinstance(prompts[0], str):  # their text: to moderate, echo and store
        lm = await load_text_model(request, body.model)
        check_token_ids(lm.generator, body, prompts)
        texts = [lm.generator.decode(p) for p in prompts]
    # a blocked category: 400 content_blocked (and a row with the verdict); outputs are checked below
    prompt_checks = await moderate_prompts(request, texts, kind="text", model=body.model)
    mod = moderator(request)
    # best_of: each prompt submits best_of candidate rows; the n best are kept at the end
    scorer, call_params = await best_of.setup(body, params, st.settings.scorers)
    lm = lm or await load_text_model(request, body.model)
    check_token_ids(lm.generator, body)
    slot = Slot(request, key)
    call = TextCall(lm.scheduler, st.settings.request_timeout_s)
    try:
        for p in prompts:
            call.add(p, call_params)
    except BaseException:
        slot.release()
        raise
    rid, created, model = new_id("cmpl"), int(time.time()), lm.entry.id
    t0 = time.perf_counter()

    async def record(indices: list[int], rs: list, checks: list) -> list[int]:
        # every output lands in the store with its moderation verdict (a blocked text is not kept);
        # the response carries its id per choice
        rows = [feedback.text_row(lm.entry, texts[i // params.n], r, time.perf_counter() - t0)
                for i, r in zip(indices, rs, strict=True)]  # fmt: skip
        for row, i, c in zip(rows, indices, checks, strict=True):
            row["moderation"] = mod.verdict(prompt_checks[i // params.n], c)
            if c.blocked:
                row["output_text"] = None
        return await st.text_recorder.record(lm.entry, rows)  # with other requests' rows

    seeds = call.seeds
    first_of_prompt = {k * params.n for k in range(len(prompts))}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices, **extra):
            return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": choices, "seed": seeds[0], **extra})  # fmt: skip

        def text_chunk(idx: int, text: str) -> str:
            return chunk([{"index": idx, "text": text, "finish_reason": None, "logprobs": None}])

        results = {}
        guards = [StreamGuard(mod) for _ in range(call.n)]  # hold back a tail, stop on block

        async def render(kind: str, idx: int, payload: Any) -> list[str]:
            g = guards[idx]
            if kind == "delta":
                text = g.feed(payload)
                return [text_chunk(idx, text)] if text else []
            rest = g.finish(payload.text)
            out = [text_chunk(idx, rest)] if rest else []
            results[idx] = payload
            try:
                [gid] = await record([idx], [payload], [g.result])
            except ApiError as e:  # headers are sent: say it in the stream, keep going
                gid = None
                out.append(chunk([], warnings=[e.message]))
            out.append(chunk([{"index": idx, "text": "",
                               "finish_reason": CONTENT_FILTER if g.blocked else payload.finish_reason,
                               "logprobs": None, "seed": payload.seed, "generation_id": gid,
                               "moderation": outcome(mod, prompt_checks[idx // params.n], g.result)[1]}],
                             parameters=payload.params))  # fmt: skip
            return out

        def tail() -> list[str]:
            rs = [results[i] for i in range(call.n)]
            return [chunk([], usage=usage(rs, first_of_prompt))] if include_usage else []

        # the first chunk says when a prompt was cut to the context (the echo's, or one of its own)
        warnings = prompt_warnings(lm.generator, call, params.max_new_tokens)
        extra = {"warnings": warnings} if warnings else {}
        if body.echo:
            head = "".join(chunk([{"index": i, "text": texts[i // params.n], "finish_reason": None, "logprobs": None}],
                                 **(extra if i == 0 else {})) for i in range(call.n))  # fmt: skip
        else:
            head = chunk([], **extra) if extra else ""
        return SSEResponse(lambda: sse_batches(call, render, tail, head), call, slot.release)

    try:
        results = await collect(request, call)
    finally:
        slot.release()
    rs = [results[i] for i in range(call.n)]
    if body.best_of is not None:
        rs = await asyncio.to_thread(best_of.pick, rs, body.best_of, params, scorer)
    checks = [mod.check(r.text) for r in rs]
    ids = await record(list(range(len(rs))), rs, checks)
    echoed = texts if body.echo else [""] * len(prompts)
    echo_lps = [None] * len(prompts)
    if body.echo and body.logprobs is not None:  # the prompts' tokens too: one forward pass each
        gen = lm.generator

        def prompt_lps() -> list[list[dict[str, Any]]]:
            return [gen.prompt_logprobs(gen.encode(p) if isinstance(p, str) else p, body.logprobs)
                    for p in prompts]  # fmt: skip

        echo_lps = await asyncio.to_thread(prompt_lps)
    return CompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            {
                "index": i,
                "text": echoed[i // params.n] + ("" if c.blocked else r.text),
                "finish_reason": CONTENT_FILTER if c.blocked else r.finish_reason,
                "logprobs": None
                if c.blocked
                else completion_logprobs(r, echoed[i // params.n], echo_lps[i // params.n]),
                "seed": r.seed,
                "moderation": outcome(mod, prompt_checks[i // params.n], c)[1],
                **best_of.choice_fields(r),
            }  # fmt: skip
            for i, (r, c) in enumerate(zip(rs, checks, strict=True))
        ],
        usage=usage(rs, first_of_prompt),
        seed=rs[0].seed,
        parameters=rs[0].params,
        warnings=sorted({w for r in rs for w in r.warnings}),
        generation_ids=ids,
    )
