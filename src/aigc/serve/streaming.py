"""The asyncio side of a text request: submit rows to a model's scheduler, await their events.

The scheduler's worker thread calls `emit`, which hops onto the event loop with
`call_soon_threadsafe`; the route awaits `TextCall.events()`. Events waiting together are merged
(consecutive deltas of one choice become one), so a slow client or a busy loop costs fewer SSE
writes, never lost text. Leaving the events loop early (client gone, timeout) cancels the rows,
which frees their batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from aigc.generation.params import GenerationParams
from aigc.serve.batching import QueueFull, Scheduler, Ticket


class TextCall:
    """One HTTP request's rows (several prompts x n choices) on one scheduler."""

    def __init__(self, scheduler: Scheduler, timeout_s: float) -> None:
        from aigc.serve.app import ApiError

        self._ApiError = ApiError
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        self.tickets: list[Ticket] = []
        self.n = 0
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def add(self, prompt: str, params: GenerationParams) -> Ticket:
        """Submit a prompt's n rows; their choice indices follow the rows already added."""
        offset = self.n

        def emit(kind: str, index: int, payload: Any) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, offset + index, payload))

        try:
            ticket = self.scheduler.submit(prompt, params, emit)
        except QueueFull:
            self.cancel()
            raise self._ApiError(
                503, "the model's queue is full; retry after a moment", "overloaded", retry=True
            ) from None
        except BaseException:
            self.cancel()
            raise
        self.tickets.append(ticket)
        self.n += len(ticket.rows)
        return ticket

    @property
    def seeds(self) -> list[int | None]:
        return [r.params.seed for t in self.tickets for r in t.rows]

    def cancel(self) -> None:
        for t in self.tickets:
            t.cancel()

    async def events(self) -> AsyncIterator[tuple[str, int, Any]]:
        """("delta", index, text) and ("done", index, GenerationResult) until every row is done."""
        remaining = self.n
        try:
            while remaining:
                left = self.deadline - time.monotonic()
                try:
                    first = await asyncio.wait_for(self.queue.get(), timeout=max(left, 0.001))
                except asyncio.TimeoutError:
                    raise self._ApiError(
                        504,
                        f"generation took longer than the {self.timeout_s:g} s limit; ask for fewer tokens",
                        "timeout",
                    ) from None
                batch = [first]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                merged: list[list] = []
                for kind, idx, payload in batch:
                    if kind == "error":
                        raise self._ApiError(500, payload, "server_error")
                    if kind == "delta" and merged and merged[-1][0] == "delta" and merged[-1][1] == idx:
                        merged[-1][2] += payload
                    else:
                        merged.append([kind, idx, payload])
                for kind, idx, payload in merged:
                    if kind == "done":
                        remaining -= 1
                    yield kind, idx, payload
        finally:
            if remaining:
                self.cancel()  # client gone, timeout or error: free the slots


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
