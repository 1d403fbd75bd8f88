"""The asyncio side of a text request: submit rows to a model's scheduler, await their events.

The scheduler's worker thread calls `emit`, which appends to the call's inbox and wakes the event
loop only if no wake-up is pending for that call; the route awaits `TextCall.events()`. Wake-ups of
all calls on one loop share a `LoopWaker`: one `call_soon_threadsafe` (a self-pipe write, ~8 % of
server CPU with 16 streams when each call woke on its own) per batch of wakes, not one per call.
Events waiting together are merged (consecutive deltas of one choice become one), and after a
delta the next batch is awaited at least STREAM_INTERVAL_S later: a fast model's tokens reach the
client in a few larger SSE chunks per 10 ms instead of one HTTP write each (the per-chunk cost,
not the model, bounded single-client throughput), never lost or reordered text, and the first
token is not delayed. Leaving the events loop early (client gone, timeout) cancels the rows,
which frees their batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from aigc.generation.params import GenerationParams
from aigc.serve.batching import QueueFull, Scheduler, Ticket
from aigc.serve.settings import STREAM_INTERVAL_S


class LoopWaker:
    """Runs callbacks on an event loop from other threads, coalescing them into one loop hop."""

    _by_loop: dict[int, LoopWaker] = {}
    _registry_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[Any] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        with cls._registry_lock:
            for key, w in list(cls._by_loop.items()):  # forget closed loops (tests make many)
                if w.loop.is_closed():
                    del cls._by_loop[key]
            w = cls._by_loop.get(id(loop))
            if w is None:
                w = cls._by_loop[id(loop)] = cls(loop)
            return w

    def call(self, fn: Any) -> None:
        """Schedule fn() on the loop; calls made before the loop gets to them run in one hop."""
        with self.lock:
            first = not self.pending
            self.pending.append(fn)
        if first:
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self.lock:
            fns, self.pending = self.pending, []
        for fn in fns:
            fn()


class TextCall:
    """One HTTP request's rows (several prompts x n choices) on one scheduler."""

    def __init__(self, scheduler: Scheduler, timeout_s: float) -> None:
        from aigc.serve.app import ApiError

        self._ApiError = ApiError
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.waker = LoopWaker.of(self.loop)
        self.inbox: list[tuple[str, int, Any]] = []  # filled by the worker thread
        self.lock = threading.Lock()
        self.ready = asyncio.Event()  # set (on the loop) when the inbox has something
        self.final = asyncio.Event()  # set when a row ends: its last chunk is not held back
        self.wake_pending = False
        self.tickets: list[Ticket] = []
        self.n = 0
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def add(self, prompt: str, params: GenerationParams) -> Ticket:
        """Submit a prompt's n rows; their choice indices follow the rows already added."""
        offset = self.n

        def emit(kind: str, index: int, payload: Any) -> None:
            with self.lock:
                self.inbox.append((kind, offset + index, payload))
                wake, self.wake_pending = not self.wake_pending, True
            if wake:  # one hop onto the loop per batch of events, not one per token
                self.waker.call(self.ready.set)
            if kind != "delta":
                self.waker.call(self.final.set)

        try:
            ticket = self.scheduler.submit(prompt, params, emit)
        except QueueFull:
            self.cancel()
            raise self._ApiError(
                503, "the model's queue is full (or it is being unloaded); retry after a moment",
                "overloaded", retry=True,
            ) from None  # fmt: skip
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

    def _take(self) -> list[tuple[str, int, Any]]:
        with self.lock:
            batch, self.inbox, self.wake_pending = self.inbox, [], False
            self.ready.clear()
            self.final.clear()
        return batch

    async def events(self) -> AsyncIterator[tuple[str, int, Any]]:
        """("delta", index, text) and ("done", index, GenerationResult) until every row is done."""
        remaining = self.n
        next_flush = 0.0  # monotonic time before which no further delta batch is sent
        try:
            while remaining:
                left = self.deadline - time.monotonic()
                try:
                    if left <= 0:  # checked even while events keep coming
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(self.ready.wait(), timeout=left)
                except asyncio.TimeoutError:
                    raise self._ApiError(
                        504, f"generation took longer than the {self.timeout_s:g} s limit; ask for fewer tokens",
                        "timeout",
                    ) from None  # fmt: skip
                wait = next_flush - time.monotonic()
                if wait > 0 and not self.final.is_set():
                    # let a fast model's tokens gather into one chunk; a row's end flushes at once
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.final.wait(), timeout=wait)
                merged: list[list] = []
                for kind, idx, payload in self._take():
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
                next_flush = time.monotonic() + STREAM_INTERVAL_S
        finally:
            if remaining:
                self.cancel()  # client gone, timeout or error: free the slots


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
