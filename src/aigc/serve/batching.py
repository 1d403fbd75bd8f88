"""Continuous batching: concurrent text requests to one model decoded together, step by step.

The generation `Engine` decodes a fixed batch to its end. A server needs requests to JOIN a
running batch between steps (Orca / vLLM "iteration-level scheduling"), so this scheduler drives
the decoder protocol itself (`generation/decoders.py`):

  1. admit: prefill the new prompts and append them to the running rows (GPT: into spare rows
     of the cache, `GPTDecoder.add_rows`, and with the C attention kernel in the same pass as the
     running rows' next step, `step_and_add` (4): a join costs its tokens' share of a pass, not a
     pass of its own; a compiled GPT step or the LSTM: prefill into fresh state, then concatenate
     it with the running rows' along the batch axis)
  2. process + sample every row at once with the engine's own pieces (`processors.process`,
     `sampling.sample_next`, one `torch.Generator` per row seeded from the request's seed)
  3. detokenize, watch stop strings, hand text deltas to each request's callback: a row with stop
     strings every token (it must end at the exact token), others at most every EMIT_INTERVAL_S
     and at each of their first EMIT_EACH_FIRST tokens and their last (the event loop sends a
     stream's text at most every STREAM_INTERVAL_S anyway; decoding, stop matching and the
     hand-over per token were a third of the worker's time at 16 rows)
  4. drop finished / cancelled rows (GPT: `drop_rows` moves rows from the end into the freed
     slots, copying only theirs; else `decoder.reorder`), then `decoder.step` the rest

A row's tokens depend only on its own prompt, parameters and seed (the engine's contract), so a
request gives the same text here as through `TextGenerator.generate` with the same seed, whatever
else shares the batch. Decoders without a known state layout (transformers models) cannot take
rows mid-run: for them new requests wait until the running batch is empty, then start together.

One worker thread per model does all tensor work, off the asyncio event loop; `submit` is called
from the loop and results come back through the callback (which must be thread-safe).
`worker.ProcessScheduler` runs the same scheduler in a child process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generation import processors as P
from aigc.generation.decoders import GPTDecoder, LSTMDecoder
from aigc.generation.engine import Completion, can_slide, feed
from aigc.generation.params import GenerationParams
from aigc.generation.sampling import make_generator, sample_next, token_logprobs
from aigc.generation.stream import Detokenizer, StopMatcher
from aigc.serve.settings import EMIT_EACH_FIRST, EMIT_INTERVAL_S

log = logging.getLogger("aigc.serve")

# emit(kind, choice_index, payload): kind "delta" (str), "done" (GenerationResult), "error" (str)
Emit = Callable[[str, int, Any], None]


def on_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether the caller runs on `loop` (the event loop running in this thread)."""
    if loop is None:
        return False
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def hold_for_turn(
    loop: asyncio.AbstractEventLoop | None, held: list, items: list, release: Callable[[], None]
) -> bool:
    """Called on `loop`: add `items` to `held`, the first ones of a loop turn scheduling `release`
    for the turn's end (the requests a loop takes in together then join the batch together) ->
    True. Elsewhere -> False: the caller queues them at once."""
    if not on_loop(loop):
        return False
    if not held:
        loop.call_soon(release)
    held.extend(items)
    return True


def inherit_torch_threads() -> None:
    """Apply the process's torch thread count in the calling thread.

    OpenMP keeps the thread count per thread: a new thread runs torch ops with the default team
    however `torch.set_num_threads` was called in the main thread (and `get_num_threads` still
    says otherwise). Measured on the 2-core box after set_num_threads(1): a (16, 64) x (64, 192)
    matmul took 6 us in the main thread, 320 us in a new thread, 5 us after this call.
    """
    torch.set_num_threads(torch.get_num_threads())


class QueueFull(Exception):
    """The scheduler holds its maximum of waiting + running rows (or is shutting down)."""


@dataclass
class Row:
    """One sequence being generated (a request with n > 1 has n rows)."""

    prompt: str
    ids: list[int]
    params: GenerationParams  # resolved: n = 1, concrete seed
    index: int  # choice index within its request
    emit: Emit
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # decoding state, set when the row is admitted
    completion: Completion = field(default_factory=Completion)
    history: list[int] = field(default_factory=list)
    gen: torch.Generator | None = None
    stops: set[int] = field(default_factory=set)
    ngram: P.NGramIndex | None = None
    detok: Detokenizer | None = None
    matcher: StopMatcher | None = None
    limit: int = 0  # total length (prompt + generated) at which the row ends with "length"
    plen: int = 0
    end_at: int = 0  # generated tokens at which it ends with "length" (from `limit` and its params)
    extra: bool = False  # per-token bookkeeping beyond the common case: an n-gram ban, logprobs
    flags: int = 0  # processors.row_flags(params)
    emitted_at: float = 0.0  # perf_counter of the last text hand-over


class Ticket:
    """The rows of one request; `cancel()` frees their slots at the next step."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled = True


class Scheduler:
    """Continuous batching for one `TextGenerator` in its own worker thread."""

    def __init__(
        self,
        gen: Any,
        max_batch: int = 32,
        max_rows: int = 256,
        metrics: Any = None,
        emit_interval: float = EMIT_INTERVAL_S,
        inbox: Callable[[bool], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.gen = gen
        self.loop = loop  # the server's event loop: rows enqueued on it wait for its turn's end
        self.emit_interval = emit_interval
        self.engine = gen.engine
        self.decoder = gen.decoder
        self.max_batch = max_batch
        self.max_rows = max_rows
        self.metrics = metrics
        self.can_join = isinstance(self.decoder, (GPTDecoder, LSTMDecoder))
        # GPT rows join and leave without copying the running rows' caches (not compiled steps)
        self.pooled = isinstance(self.decoder, GPTDecoder) and not self.decoder.compile
        # ... and, with the C attention kernel, join in the running rows' next step: their prompts
        # are query rows of the step's pass (`step_and_add`), not a prefill pass of their own
        self.fold = self.pooled and self.decoder.attn_kernel is not None
        self.cache_len = self.decoder.max_len if can_slide(self.decoder) else None  # rows slide past it
        self.pending: deque[Row] = deque()
        self._held: list[Row] = []  # enqueued on an event loop, pending at the end of its turn
        self._admitting: list[Row] = []  # taken from pending, not yet running (counted by `load`)
        self._joining: list[Row] = []  # admitted, their prompts fed with the next step (`fold`)
        self.rows: list[Row] = []  # running, in decoder row order
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0
        self._logits: torch.Tensor | None = None  # (B, V) for the next sampling step
        self._positions: torch.Tensor | None = None  # (B,) where each row's next token goes
        self._dirty = True  # batch membership changed: rebuild per-row tensors
        self.after_step: Callable[[], None] | None = None  # called by the worker after each step
        # inbox(idle): called between steps by `run` in the caller's thread (the worker process's
        # commands): it may block only when `idle` (nothing waiting or running)
        self.inbox = inbox
        self.thread = None
        if inbox is None:
            self.thread = threading.Thread(target=self._loop, name=f"aigc-batch-{gen.model_id}", daemon=True)
            self.thread.start()

    # ------------------------------------------------------------------ asyncio side

    @property
    def load(self) -> int:
        """Rows waiting or running."""
        return (
            len(self._held) + len(self.pending) + len(self._admitting) + len(self._joining) + len(self.rows)
        )

    def submit(self, prompt: str, params: GenerationParams, emit: Emit) -> Ticket:
        """Queue a request (n rows); tokenizing errors raise AigcError here, in the caller."""
        if params.num_beams > 1:
            raise AigcError(
                "num_beams > 1 is not served (beam search decodes alone); use n for several samples"
            )
        ids, row_params = self.gen._requests(prompt, params)
        return self.enqueue([Row(prompt, ids, p, k, emit) for k, p in enumerate(row_params)])

    def enqueue(self, rows: list[Row]) -> Ticket:
        """Queue rows already tokenized and resolved (what `submit` does after `_requests`).

        Called on the scheduler's `loop` (the server's routes), the rows wait for the end of that
        loop turn (`_release_held`): the requests the loop takes in together join the batch
        together, as `worker.ProcessScheduler` sends them to its child. (Only on that loop: a caller
        on another one, e.g. a notebook's, may block it waiting for its rows.)"""
        with self.cv:
            if self.closed or self.load + len(rows) > self.max_rows:
                raise QueueFull
            if not hold_for_turn(self.loop, self._held, rows, self._release_held):
                self.pending.extend(rows)
                self.cv.notify()
        return Ticket(rows)

    def _release_held(self) -> None:
        with self.cv:
            self.pending.extend(self._held)
            self._held.clear()
            self.cv.notify()

    def close(self) -> None:
        """Stop the worker after the running rows; rows still waiting get an error. (With an
        inbox, the inbox calls this from `run`, which then returns after those rows.)"""
        with self.cv:
            self.closed = True
            self.pending.extend(self._held)  # (they get the waiting rows' error)
            self._held.clear()
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # ------------------------------------------------------------------ worker thread

    def run(self) -> None:
        """Decode in the calling thread until closed, reading the inbox between steps (a scheduler
        made with `inbox`: the worker process, where a second thread receiving commands had to win
        the GIL from this one, and waited up to milliseconds each time)."""
        self._loop()

    def _loop(self) -> None:
        inherit_torch_threads()
        while True:
            if self.inbox is not None:
                self.inbox(not (self.pending or self.rows or self.closed))
            with self.cv:
                while not self.pending and not self.rows and not self.closed:
                    self.cv.wait()
                if self.closed and not self.rows:
                    for r in self.pending:
                        r.emit("error", r.index, "the model was unloaded; retry the request")
                    self.pending.clear()
                    if self.after_step is not None:
                        self.after_step()
                    return
                new = []
                if (self.can_join or not self.rows) and not self.closed:
                    while self.pending and len(self.rows) + len(new) < self.max_batch:
                        new.append(self.pending.popleft())
                self._admitting = new
            try:
                if new:
                    self._admit(new)
                self._admitting = []
                if self.rows:
                    self._step()
            except Exception as e:  # a bug: fail the rows in flight, keep serving the others
                log.exception("batch step failed")
                for r in self.rows + new:
                    if not r.cancelled:
                        r.emit("error", r.index, f"internal error while generating: {type(e).__name__}")
                self.rows, self._logits, self._positions, self._dirty = [], None, None, True
                self._admitting, self._joining = [], []
                self._drop_rows([])
            if self.after_step is not None:
                self.after_step()

    def _admit(self, new: list[Row]) -> None:
        """Prefill the new rows and append them to the running batch (or, with `fold`, to the rows
        joining at the next step)."""
        ready = self._prepare(new)
        if ready and self.fold and self.rows:  # fed with the running rows' next step (`_step`)
            self._joining.extend(ready)
        elif ready:
            self._join(ready)

    def _prepare(self, new: list[Row]) -> list[Row]:
        """Each new row's decoding state -> the rows with something to generate."""
        eng, dec = self.engine, self.decoder
        ready = []
        for r in new:
            if r.cancelled:
                continue
            p = r.params
            prompt, warns = eng.fit_prompt(r.ids, p.max_new_tokens)
            r.ids, r.plen = prompt, len(prompt)
            r.completion = Completion(prompt_tokens=len(prompt), warnings=warns)
            if p.max_new_tokens == 0:  # nothing to generate: done before it starts
                self._finish(r)
                continue
            # as in the engine: a full context slides where the decoder can, else the row ends
            r.limit = len(prompt) + p.max_new_tokens
            if dec.max_len is not None and not can_slide(dec):
                r.limit = min(r.limit, dec.max_len)
            r.history = list(prompt)
            # generated tokens at which it ends by length: max_new_tokens, or its total past `limit`
            r.end_at = min(p.max_new_tokens, r.limit - r.plen + 1)
            r.gen = make_generator(p.seed) if p.sampling else None
            r.stops = set(eng.stop_ids(p))
            r.flags = P.row_flags(p)
            r.ngram = P.NGramIndex(p.no_repeat_ngram_size, prompt) if p.no_repeat_ngram_size else None
            if self.metrics is not None:
                self.metrics.observe_wait(time.perf_counter() - r.submitted)
            r.extra = r.ngram is not None or p.logprobs
            r.detok = Detokenizer.reading(self.gen.decode, r.history, r.plen)
            r.matcher = StopMatcher(p.stop)
            ready.append(r)
        return ready

    def _join(self, ready: list[Row]) -> None:
        """Prefill the rows' prompts now and append them to the running batch."""
        dec = self.decoder
        prompts = [r.ids for r in ready]
        positions = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if self.pooled:
            logits = dec.add_rows(prompts)  # (n, V)
        elif not self.rows:
            logits = dec.prefill(prompts, max_len=self._cache_len(ready))
        else:
            old = self._take_state()
            logits = dec.prefill(prompts, max_len=self._cache_len(ready))
            self._join_state(old)
        if self.rows:  # after the running rows
            logits, positions = torch.cat([self._logits, logits]), torch.cat([self._positions, positions])
        self._logits, self._positions = logits, positions
        self.rows.extend(ready)
        self._dirty = True

    def _cache_len(self, rows: list[Row]) -> int | None:
        # GPT rows joining later must share one cache length: always the full context
        if isinstance(self.decoder, GPTDecoder):
            return self.decoder.max_len
        return max(r.limit for r in rows)

    def _take_state(self) -> Any:
        dec = self.decoder
        return dec.kv if isinstance(dec, GPTDecoder) else dec.state

    def _join_state(self, old: Any) -> None:
        """Running rows' state first, then the freshly prefilled rows'."""
        dec = self.decoder
        if isinstance(dec, GPTDecoder):
            dec.kv = [torch.cat([a, b]) for a, b in zip(old, dec.kv, strict=True)]  # (B, 2K, S, D)
        else:
            (h0, c0), (h1, c1) = old, dec.state
            dec.state = (torch.cat([h0, h1], dim=1), torch.cat([c0, c1], dim=1))  # (L, B, H)

    def _rebuild(self) -> None:
        """Per-row tensors the processors read, from each row's own history (after joins/leaves)."""
        V = self.decoder.vocab_size
        rows = self.rows
        self._rp = P.RowParams.from_params([r.params for r in rows], V, [r.flags for r in rows])
        self._seen = self._counts = None
        if self._rp.use_rep:
            self._seen = torch.zeros(len(rows), V, dtype=torch.bool)
            for j, r in enumerate(rows):
                self._seen[j, torch.tensor(r.history)] = True
        if self._rp.use_pf:
            self._counts = torch.zeros(len(rows), V)
            for j, r in enumerate(rows):
                if r.completion.tokens:
                    self._counts[j] = torch.bincount(torch.tensor(r.completion.tokens), minlength=V)[
                        :V
                    ].float()
        self._top_n = max(r.params.top_logprobs for r in rows)
        self._logprobs = any(r.params.logprobs for r in rows)  # (rows leaving keep it: harmless)
        self._dirty = False

    def _step(self) -> None:
        """One token for every running row (the engine's steps 2-5)."""
        t0 = time.perf_counter()
        if self._dirty:
            self._rebuild()
        rows, rp = self.rows, self._rp
        logits = self._logits
        due = t0 - self.emit_interval  # rows whose text was last handed over before this get it now
        scores = P.process(
            logits,
            rp,
            seen=self._seen,
            counts=self._counts,
            histories=[r.history for r in rows],
            ngrams=[r.ngram for r in rows],
        )
        sample = rp.sample if rp.any_sample and not rp.all_sample else None  # (built only if mixed)
        tokens = sample_next(scores, sample, [r.gen for r in rows], rp.any_sample, rp.all_sample)  # (B,)
        tok_list = tokens.tolist()
        if self._logprobs:
            lp, top = token_logprobs(logits, tokens, self._top_n)
        keep = []
        for j, r in enumerate(rows):  # per row and step: keep it lean (see `Row.end_at`, `Row.extra`)
            t = tok_list[j]
            c = r.completion
            generated = c.tokens
            if not generated and self.metrics is not None:
                self.metrics.observe_ttft(time.perf_counter() - r.submitted)
            generated.append(t)
            if r.extra:
                if r.ngram is not None:
                    r.ngram.add(t)
                if r.params.logprobs:
                    c.logprobs.append(lp[j])
                    c.top_logprobs.append(top[j][: r.params.top_logprobs])
            if t in r.stops:  # a stop token ends the row; its text is not shown
                c.finish_reason = "stop"
                self._finish(r)
                continue
            r.history.append(t)  # (the detokenizer reads it too)
            m = r.matcher
            if m.stops or len(generated) <= EMIT_EACH_FIRST or r.emitted_at < due:  # else: later
                r.emitted_at = t0
                shown = m.feed(r.detok.take())
                if shown and not r.cancelled:
                    r.emit("delta", r.index, shown)
                if m.stopped:
                    c.finish_reason = "stop"
                    self._finish(r)
                    continue
            if len(generated) >= r.end_at:
                c.finish_reason = "length"
                self._finish(r)
            elif r.cancelled:
                self._finish(r)
            else:
                keep.append(j)
        if self._seen is not None:
            self._seen[torch.arange(len(rows)), tokens] = True
        if self._counts is not None:
            self._counts[torch.arange(len(rows)), tokens] += 1
        # drop finished rows, then feed the new tokens at each row's position
        positions = self._positions
        joining, self._joining = self._joining, []
        if len(keep) < len(rows):
            keep = self._drop_rows(keep)
            if not keep:
                self.rows, self._logits, self._positions = [], None, None
                self._dirty = True
                if joining:  # nothing left to step with: a prefill pass of their own
                    self._join(joining)
                self._record(len(rows), time.perf_counter() - t0)
                return
            idx = torch.tensor(keep, dtype=torch.long)
            self.rows = [rows[j] for j in keep]
            self._rp = rp.select(idx)
            self._seen = None if self._seen is None else self._seen[idx]
            self._counts = None if self._counts is None else self._counts[idx]
            tokens, positions = tokens[idx], positions[idx]
        histories = [r.history for r in self.rows]
        prompts = [r.ids for r in joining]
        self._logits, self._positions = feed(
            self.decoder, tokens, positions, histories, self.cache_len, prompts
        )
        if joining:
            self.rows = self.rows + joining
            self._dirty = True
        self._record(len(rows), time.perf_counter() - t0)

    def _drop_rows(self, keep: list[int]) -> list[int]:
        """Keep the decoder rows `keep` (ascending) -> the rows' new order (old row of each)."""
        if self.pooled:  # rows from the end fill the freed slots: a new order, not `keep`
            return self.decoder.drop_rows(keep)
        if keep:
            self.decoder.reorder(torch.tensor(keep, dtype=torch.long))
        return keep

    def _record(self, batch: int, seconds: float) -> None:
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(batch, seconds)

    def _finish(self, r: Row) -> None:
        """Flush the row's held-back text and hand over its GenerationResult."""
        if r.cancelled:
            return
        m = r.matcher
        if m is not None and not m.stopped:
            tail = m.feed(r.detok.flush()) + m.flush()
            if tail:
                r.emit("delta", r.index, tail)
        text = m.final_text if m is not None else ""
        r.emit("done", r.index, self.gen._result(r.prompt, r.params, r.completion, text))
