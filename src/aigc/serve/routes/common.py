"""What the text routes share: load the model off the loop, hold an admission slot, check what
only the model can (token ids within its vocabulary), collect or stream a `TextCall`, and format
logprobs the OpenAI way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from typing import Any

from fastapi import Request

from aigc.serve.app import ApiError
from aigc.serve.streaming import TextCall


class Slot:
    """One admission slot, released exactly once (the stream's end or the response's end)."""

    def __init__(self, request: Request, key: str) -> None:
        self.admission = request.app.state.admission
        self.key = key
        self.admission.acquire(key)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.release(self.key)


async def load_text_model(request: Request, model: str) -> Any:
    """The loaded model (first use loads it in a worker thread: the loop keeps serving)."""
    reg = request.app.state.registry
    return reg.loaded_now(model, "text") or await asyncio.to_thread(reg.get, model, "text")


def check_request(body: Any) -> None:
    """What the body's schema cannot say of one field alone (the same on the streamed lane)."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true; drop stream_options or set stream=true",
                       "invalid_value", "stream_options")  # fmt: skip


def check_token_ids(gen: Any, body: Any, prompts: list | None = None) -> None:
    """400 naming the bound when a logit_bias key or a prompt's token id (`prompts` given as id
    lists) is not in the model's vocabulary."""
    if not body.logit_bias and not (prompts and not isinstance(prompts[0], str)):
        return
    V = gen.vocab_size
    bad = [int(k) for k in body.logit_bias or {} if int(k) >= V]
    if bad:
        raise ApiError(400, f"logit_bias token id {bad[0]} is outside the model's vocabulary: ids are 0 to {V - 1}",
                       "invalid_value", "logit_bias")  # fmt: skip
    for i, ids in enumerate(prompts or []):
        bad = [t for t in ids if t >= V] if not isinstance(ids, str) else []
        if bad:
            at = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            raise ApiError(400, f"{at} token id {bad[0]} is outside the model's vocabulary: ids are 0 to {V - 1}",
                           "invalid_value", "prompt")  # fmt: skip


def prompt_warnings(gen: Any, call: TextCall, max_new_tokens: int) -> list[str]:
    """The warnings of the call's prompts longer than the model's context (the scheduler keeps
    their tail), known at submission: a stream sends them in its first chunk. A length check per
    prompt when none is too long. Call right after `call.add`: the rows' ids are still as
    submitted (the scheduler takes them at the end of the loop's turn)."""
    ctx = gen.context_length
    if ctx is None:
        return []
    long = [t.rows[0].ids for t in call.tickets if t.rows and len(t.rows[0].ids) >= ctx]
    # quiet: the scheduler logs the warning when it runs the prompt
    return sorted({w for ids in long for w in gen.engine.fit_prompt(ids, max_new_tokens, quiet=True)[1]})


def new_id(prefix: str) -> str:
    """A response's id: unique, not a secret (nothing is looked up by it)."""
    return f"{prefix}-{_IDS.getrandbits(96):024x}"


# seeded from os.urandom, again in a forked child; `secrets` makes a getrandom call per id, which
# hands the GIL over (under load, a wait to get it back)
_IDS = random.Random()
if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_IDS.seed)


async def collect(request: Request, call: TextCall) -> dict[int, Any]:
    """Wait for every row's GenerationResult; a client that disconnects cancels the rows."""

    async def results() -> dict[int, Any]:
        out = {}
        async for kind, idx, payload in call.events():
            if kind == "done":
                out[idx] = payload
        return out

    task = asyncio.ensure_future(results())
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise asyncio.CancelledError
    return task.result()


def usage(results: list[Any], prompts_counted: set[int] | None = None) -> dict[str, int]:
    prompt = sum(
        r.usage["prompt_tokens"]
        for i, r in enumerate(results)
        if prompts_counted is None or i in prompts_counted
    )
    completion = sum(r.usage["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(
    result: Any, echo: str = "", echo_logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset.

    With echo (the choice's text starts with the prompt `echo`), the prompt's tokens come first
    (`echo_logprobs`, `TextGenerator.prompt_logprobs`: the first one's logprob and top are None)
    and `text_offset` indexes the returned text: the generated tokens start at len(echo)."""
    if result.logprobs is None:
        return None
    offsets = []
    for items, pos in ((echo_logprobs or [], 0), (result.logprobs, len(echo))):
        for lp in items:
            offsets.append(pos)
            pos += len(lp["text"])
    items = [*(echo_logprobs or []), *result.logprobs]
    return {
        "tokens": [lp["text"] for lp in items],
        "token_logprobs": [lp["logprob"] for lp in items],
        "top_logprobs": [
            None if lp["top"] is None else {t["text"]: t["logprob"] for t in lp["top"]} for lp in items
        ],  # fmt: skip
        "text_offset": offsets,
    }


def chat_logprobs(result: Any) -> dict[str, Any] | None:
    """Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if result.logprobs is None:
        return None

    def item(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **item(lp["text"], lp["logprob"]),
                "top_logprobs": [item(t["text"], t["logprob"]) for t in lp["top"]],
            }
            for lp in result.logprobs
        ]
    }
