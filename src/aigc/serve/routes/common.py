"""What the text routes share: load the model off the loop, hold an admission slot, collect or
stream a `TextCall`, and format logprobs the OpenAI way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from typing import Any

from fastapi import Request

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


def completion_logprobs(result: Any) -> dict[str, Any] | None:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    if result.logprobs is None:
        return None
    offsets, pos = [], 0
    for lp in result.logprobs:
        offsets.append(pos)
        pos += len(lp["text"])
    return {
        "tokens": [lp["text"] for lp in result.logprobs],
        "token_logprobs": [lp["logprob"] for lp in result.logprobs],
        "top_logprobs": [{t["text"]: t["logprob"] for t in lp["top"]} for lp in result.logprobs],
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
