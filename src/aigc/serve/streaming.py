"""The asyncio side of a text request: submit rows to a model's scheduler, await their events.

The scheduler's worker thread calls `emit`, which appends to the call's inbox and wakes the event
loop only if no wake-up is pending for that call; the route awaits `TextCall.events()`. Wake-ups of
all calls on one loop share a `LoopWaker`: one `call_soon_threadsafe` (a self-pipe write, ~8 % of
server CPU with 16 streams when each call woke on its own) per batch of wakes, not one per call.
Events waiting together are merged (consecutive deltas of one choice become one), and after a
delta the next batch is awaited at least STREAM_INTERVAL_S later: a fast model's tokens reach the
client in a few larger SSE chunks per 10 ms instead of one HTTP write each (the per-chunk cost,
not the model, bounded single-client throughput), never lost or reordered text, and the first
token is not delayed (nor is the first text a route could show: when it sends none of a batch's
text, held back by a guard, the next batch goes out as soon as it comes). The routes write each
batch as one HTTP chunk (`sse_batches`, `SSEResponse`): a stream's response headers go with its
first batch, and its last batch carries its final chunks, the usage and [DONE] in one write.
Leaving the events loop early (client gone, timeout) cancels the rows, which frees their batch
slots at the next step. `TextRecorder` writes the outputs of requests that end together in one
transaction.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response

from aigc.generation.params import GenerationParams
from aigc.serve.batching import QueueFull, Scheduler, Ticket
from aigc.serve.settings import HEADERS_WITHIN_S, STREAM_INTERVAL_S


class LoopWaker:
    """Runs callbacks on an event loop from other threads, coalescing them into one loop hop."""

    _by_loop: dict[int, LoopWaker] = {}
    _registry_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()  # made on the loop (`of` is called there)
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
        if first:  # from the loop itself (a worker process's events are read there): no self-pipe write
            if threading.get_ident() == self.thread:
                self.loop.call_soon(self._run)
            else:
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
        # loop side: the inbox has something / a row ended (its last chunk is not held back);
        # `batches` awaits them on one plain future with a timer, not `asyncio.wait_for` (a task
        # per wait in Python 3.11, two waits per batch)
        self.ready = False
        self.final = False
        self._waiter: asyncio.Future | None = None
        self._waiter_final = False  # the waiter wakes only for `final`
        self.wake_pending = False
        self.tickets: list[Ticket] = []
        self.n = 0
        self.remaining = 0  # rows not done yet (set when events start)
        self.shown = True  # the consumer sent some of the last batch's text (see `batches`)
        self.cancelled = False
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
                self.waker.call(self._set_ready)
            if kind != "delta":
                self.waker.call(self._set_final)

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
        """Free the rows' batch slots (at the scheduler's next step) and end `batches()` (call on
        the loop)."""
        self.cancelled = True
        for t in self.tickets:
            t.cancel()
        self._set_final()  # cancelled rows send nothing more: wake a waiting `batches()` to end

    def _set_ready(self) -> None:
        self.ready = True
        if not self._waiter_final:
            self._wake(True)

    def _set_final(self) -> None:
        self.ready = self.final = True
        self._wake(True)

    def _wake(self, value: bool) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(value)

    async def _wait(self, timeout: float, final: bool = False) -> bool:
        """Until `ready` (or `final`, if asked) is set -> True, or `timeout` seconds pass -> False."""
        if self.final or (self.ready and not final):
            return True
        self._waiter, self._waiter_final = self.loop.create_future(), final
        timer = self.loop.call_later(timeout, self._wake, False)
        try:
            return await self._waiter
        finally:
            timer.cancel()
            self._waiter, self._waiter_final = None, False

    def _take(self) -> list[tuple[str, int, Any]]:
        with self.lock:
            batch, self.inbox, self.wake_pending = self.inbox, [], False
            self.ready = self.final = False
        return batch

    async def events(self) -> AsyncIterator[tuple[str, int, Any]]:
        """("delta", index, text) and ("done", index, GenerationResult) until every row is done."""
        batches = self.batches()
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()  # now, not when collected: leaving early frees the rows' slots

    async def batches(self, first_within: float | None = None) -> AsyncIterator[list[tuple[str, int, Any]]]:
        """The events as they arrive together (deltas of one choice merged); `remaining` counts the
        rows not done after this batch (0: the last one). With `first_within`: if nothing has come
        that many seconds after the start, an empty batch then (a stream's headers go out)."""
        self.remaining = self.n
        next_flush = 0.0  # monotonic time before which no further delta batch is sent
        try:
            while self.remaining and not self.cancelled:
                wait = next_flush - time.monotonic()
                if wait > 0:  # let a fast model's tokens gather into one chunk; a row's end flushes at once
                    await self._wait(wait, final=True)  # (then they are usually there: one wait a batch)
                left = self.deadline - time.monotonic()
                if first_within is not None and left > first_within:
                    waited, first_within = await self._wait(first_within), None
                    if not waited:
                        yield []
                        continue
                # the deadline is checked even while events keep coming
                if left <= 0 or not await self._wait(left):
                    raise self._ApiError(
                        504, f"generation took longer than the {self.timeout_s:g} s limit; ask for fewer tokens",
                        "timeout",
                    ) from None  # fmt: skip
                if self.cancelled:
                    return
                merged: list[list] = []
                for kind, idx, payload in self._take():
                    if kind == "error":
                        raise self._ApiError(500, payload, "server_error")
                    if kind == "delta" and merged and merged[-1][0] == "delta" and merged[-1][1] == idx:
                        merged[-1][2] += payload
                    else:
                        merged.append([kind, idx, payload])
                self.remaining -= sum(1 for kind, _, _ in merged if kind == "done")
                self.shown = True
                yield [tuple(e) for e in merged]
                # the consumer sets `shown` False when it sent none of the batch's text (all held back
                # by a guard): the next text then goes out as soon as it comes
                next_flush = time.monotonic() + STREAM_INTERVAL_S if self.shown else 0.0
        finally:
            if self.remaining:
                self.cancel()  # client gone, timeout or error: free the slots


async def sse_batches(
    call: TextCall,
    render: Callable[[str, int, Any], Awaitable[list[str]]],
    tail: Callable[[], list[str]],
    head: str = "",
) -> AsyncIterator[str]:
    """A streamed call's SSE text: one string per batch of events (one HTTP write each), the first
    one opening with `head` (opening chunks).

    render(kind, index, payload) gives the chunks of one event; after the last event, tail()'s
    chunks (usage) and [DONE] go out in that same write. A row's "done" payload (its
    GenerationResult) has its whole text, and render sends what was not sent yet: the deltas of a
    row that ends in the same batch are not rendered (for a moderated stream, one check of the
    text fewer per request, on the loop while the batch's other streams wait to finish). If the
    first event takes longer than HEADERS_WITHIN_S (a long queue or prompt), `head` or "" is
    yielded then: `SSEResponse` sends the response headers with its first string.
    """
    batches = call.batches(first_within=HEADERS_WITHIN_S)
    try:
        async for batch in batches:
            out = [head] if head else []
            head = ""
            n = len(out)
            ending = {idx for kind, idx, _ in batch if kind == "done"}
            for kind, idx, payload in batch:
                if kind != "delta" or idx not in ending:
                    out += await render(kind, idx, payload)
            call.shown = len(out) > n or not batch
            if not call.remaining:  # the last batch
                out += [*tail(), SSE_DONE]
            if out or not batch:  # (an empty batch: no event within HEADERS_WITHIN_S)
                yield "".join(out)
    finally:
        await batches.aclose()  # client gone: free the rows' slots now


class SSEResponse(Response):
    """The ASGI response of a streamed text call: what Starlette's StreamingResponse does, less
    per-stream work (measured on the 2-core box, 16 streams: a loopback socket write costs ~30 %
    of the event loop's GIL time):

    - the response headers leave right before the first batch, in the same turn of the event loop,
      not when the stream starts (uvicorn still makes them a send of their own: holding them back
      to share the body's write measured no gain): under 16 streams
      the server's CPU per request fell 1,000 -> ~830 us (one wake-up of the client fewer) and
      the aggregate rose ~11 % (the requests still arriving get the event loop sooner). An error
      before the first batch (a timeout in the queue, a failed worker) is then a plain HTTP error;
      a first batch slower than HEADERS_WITHIN_S sends the headers alone at that point;
    - the last batch (the one ending in [DONE]) leaves with the chunked-encoding terminator in one
      write, not two;
    - no task group per stream: one watcher task awaits `http.disconnect` and cancels the stream;
    - the admission slot is released here, not by a background task in a worker thread.

    A client that goes away cancels the stream task: the events generator's `finally` frees the
    rows' batch slots at the scheduler's next step.
    """

    media_type = "text/event-stream"  # init_headers adds "; charset=utf-8"
    _raw: list[tuple[bytes, bytes]] | None = None

    def __init__(
        self, events: Callable[[], AsyncIterator[str]], call: TextCall, release: Callable[[], None]
    ) -> None:
        # a Response subclass so FastAPI passes it through; its body is streamed, never rendered
        self.events, self.call, self.release = events, call, release
        self.status_code, self.background = 200, None
        if SSEResponse._raw is None:  # the same for every stream: built once
            self.init_headers(SSE_HEADERS)
            SSEResponse._raw = self.raw_headers
        self.raw_headers = list(SSEResponse._raw)  # (a middleware may add to a response's own list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            self.call.cancel()  # ends the events even if the task's cancellation is swallowed
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        events = self.events()
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        try:
            async for text in events:
                if start is not None:  # the headers, right before the first chunk
                    await send(start)
                    start = None
                if not text:  # (the headers alone: the first chunk is slow to come)
                    continue
                last = text.endswith(SSE_DONE)
                if last:
                    watcher.cancel()  # the response completes with this write
                await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
                if last:
                    break
            else:
                if start is not None:
                    await send(start)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client went away: the stream ends quietly
        finally:
            watcher.cancel()
            await events.aclose()
            self.call.cancel()
            self.release()
        if self.background is not None:  # FastAPI's BackgroundTasks, if a dependency added some
            await self.background()


class TextRecorder:
    """Writes text outputs to the store, coalescing the rows of requests that finish together.

    One write is in flight at a time; rows that arrive meanwhile go into the next one, a single
    transaction (`Store.add_generations`): 16 streams ending within a few steps of each other make
    a few transactions and worker-thread hops instead of 16. What a request gets back is what
    `routes.feedback.record` gives: its rows' ids in order, or its error (503 when the store is busy).
    """

    def __init__(self, state: Any) -> None:
        self.state = state  # the app's state: its `store` is read at write time
        self.pending: list[tuple[Any, list[dict[str, Any]], asyncio.Future]] = []
        self.busy = False

    async def record(self, entry: Any, rows: list[dict[str, Any]]) -> list[int]:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((entry, rows, fut))
        if not self.busy:
            self.busy = True
            asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        from aigc.serve.routes.feedback import model_hash, run_store

        try:
            while self.pending:
                await asyncio.sleep(0)  # streams ending in this turn of the loop join the write
                batch, self.pending = self.pending, []
                store = self.state.store

                def write(batch=batch, store=store) -> list[int]:
                    rows = [{**r, "model_hash": model_hash(e)} for e, rs, _ in batch for r in rs]
                    return store.add_generations(rows)

                try:
                    ids = await run_store(write)
                except Exception as e:  # the store's error goes to every request in the write
                    for _, _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for _, rs, f in batch:
                    if not f.done():  # (a request whose client left: its rows are stored anyway)
                        f.set_result(ids[: len(rs)])
                    ids = ids[len(rs) :]
        finally:
            self.busy = False


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {_JSON.encode(obj)}\n\n"


# what json.dumps(obj, ensure_ascii=False, separators=(",", ":")) uses, made once (it makes one per
# call when given options: ~1.5 us of the ~9 of a stream's last chunk)
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
