"""Continuous batching: rows joining a running batch give TextGenerator's text for the same seed."""

from __future__ import annotations

import threading
import time

import pytest

from aigc.errors import AigcError
from aigc.generation import load_generator
from aigc.generation.params import make_params
from aigc.serve.batching import QueueFull, Scheduler
from serve_helpers import write_text_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {f: write_text_run(root / f, family=f) for f in ("gpt", "lstm")}


class Collector:
    def __init__(self) -> None:
        self.results, self.deltas, self.errors = {}, {}, []
        self.done = threading.Event()
        self.expected = 0

    def emit_for(self, key):
        def emit(kind, index, payload):
            if kind == "delta":
                self.deltas.setdefault((key, index), []).append(payload)
            elif kind == "done":
                self.results[(key, index)] = payload
                if len(self.results) == self.expected:
                    self.done.set()
            else:
                self.errors.append(payload)
                self.done.set()

        return emit


REQUESTS = [
    dict(max_new_tokens=25, seed=3, temperature=0.9),
    dict(max_new_tokens=12, temperature=0),  # greedy next to sampling rows
    dict(max_new_tokens=30, seed=5, top_k=4, repetition_penalty=1.3, stop=["o"]),
    dict(max_new_tokens=20, seed=7, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.4, n=2),
    dict(max_new_tokens=15, seed=9, no_repeat_ngram_size=2, min_p=0.05, logprobs=True, top_logprobs=2),
    dict(max_new_tokens=0, seed=1),
    # a stop token made likely: the row ends on it, its text not shown (as in generate())
    dict(max_new_tokens=40, seed=11, stop_token_ids=[5], logit_bias={5: 3.0}),
]


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_joining_rows_match_text_generator(runs, family):
    """Requests submitted while others decode join between steps; every text equals generate()'s."""
    gen = load_generator(runs[family])
    sched = Scheduler(gen, max_batch=8)
    col = Collector()
    col.expected = sum(r.get("n", 1) for r in REQUESTS)
    prompts = ["ROMEO:", "soft", "", "User: 春眠", "light through yonder window", "w", "so"]
    try:
        for k, (prompt, kw) in enumerate(zip(prompts, REQUESTS, strict=True)):
            sched.submit(prompt, make_params(**kw), col.emit_for(k))
            time.sleep(0.002)  # let the running batch take a few steps first
        assert col.done.wait(30) and not col.errors
    finally:
        sched.close()
    assert sched.steps < sum(r["max_new_tokens"] * r.get("n", 1) for r in REQUESTS)  # really batched
    for k, (prompt, kw) in enumerate(zip(prompts, REQUESTS, strict=True)):
        refs = gen.generate(prompt, **{**kw, "seed": col.results[(k, 0)].seed})  # the resolved seed
        for i, ref in enumerate(refs):
            got = col.results[(k, i)]
            assert (got.text, got.tokens, got.finish_reason, got.seed) == (
                ref.text,
                ref.tokens,
                ref.finish_reason,
                ref.seed,
            )
            assert got.usage == ref.usage
            assert "".join(col.deltas.get((k, i), [])) == ref.text  # streamed deltas add up to the text
            if kw.get("stop_token_ids"):
                assert got.finish_reason == "stop" and got.tokens[-1] == 5
            if kw.get("logprobs"):
                assert [x["logprob"] for x in got.logprobs] == pytest.approx(
                    [x["logprob"] for x in ref.logprobs], abs=1e-5
                )


def test_cancel_frees_the_slot_and_queue_bound(runs):
    gen = load_generator(runs["gpt"])
    sched = Scheduler(gen, max_batch=2, max_rows=3)
    col = Collector()
    col.expected = 1
    try:
        long = sched.submit(
            "ROMEO:", make_params(max_new_tokens=4000, seed=1, ignore_eos=True), col.emit_for("long")
        )  # runs until cancelled
        with pytest.raises(QueueFull):  # 1 running + 3 more rows > max_rows
            sched.submit("w", make_params(n=3), col.emit_for("over"))
        long.cancel()
        short = sched.submit("soft", make_params(max_new_tokens=3, seed=2), col.emit_for("short"))
        assert col.done.wait(30)
        assert ("short", 0) in col.results and ("long", 0) not in col.results  # cancelled: no result
        deadline = time.monotonic() + 5  # the result is handed over mid-step, the slot freed at its end
        while sched.load and time.monotonic() < deadline:
            time.sleep(0.001)
        assert short.rows[0].completion.tokens and sched.load == 0
        with pytest.raises(AigcError, match="num_beams"):
            sched.submit("w", make_params(num_beams=2), col.emit_for("beam"))
    finally:
        sched.close()
    assert not sched.thread.is_alive()


def test_close_fails_waiting_rows_cleanly(runs):
    gen = load_generator(runs["gpt"])
    sched = Scheduler(gen, max_batch=1)
    col = Collector()
    col.expected = 2
    sched.submit("soft", make_params(max_new_tokens=40, seed=1), col.emit_for("running"))
    sched.submit("soft", make_params(max_new_tokens=40, seed=2), col.emit_for("waiting"))
    sched.close()
    assert not sched.thread.is_alive()
    # whatever had started finished; what was still waiting got an error asking to retry
    assert all("retry" in e for e in col.errors)
    assert len(col.results) + len(col.errors) == 2
    with pytest.raises(QueueFull):
        sched.submit("soft", make_params(), col.emit_for("late"))


def test_scheduler_slides_past_the_context_like_the_engine():
    """Rows longer than the context slide in the scheduler exactly as in TextGenerator."""
    import torch

    from aigc.generation.text import TextGenerator
    from aigc.models.gpt import GPT, GPTConfig
    from aigc.tokenizers import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer("char", ["abcdefghij klmnop"])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    gen = TextGenerator(model, tok, model_id="tiny")
    reqs = [
        ("abc", dict(max_new_tokens=30, temperature=1.0, seed=3)),
        ("k", dict(max_new_tokens=20, temperature=0)),
    ]
    sched, col = Scheduler(gen), Collector()
    col.expected = len(reqs)
    try:
        for k, (prompt, kw) in enumerate(reqs):
            sched.submit(prompt, make_params(**kw), col.emit_for(k))
            time.sleep(0.002)
        assert col.done.wait(30) and not col.errors
    finally:
        sched.close()
    for k, (prompt, kw) in enumerate(reqs):
        [want] = gen.generate(prompt, **kw)
        assert len(want.tokens) == kw["max_new_tokens"]  # past the 8-token context
        assert col.results[(k, 0)].tokens == want.tokens and col.results[(k, 0)].text == want.text


def test_settle_gc_freezes_start_up_objects_and_collects_less_often():
    import gc

    from aigc.serve.settings import GC_GEN0_THRESHOLD, settle_gc

    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_scheduler_with_an_inbox_reads_it_between_steps_in_the_callers_thread(runs):
    """`Scheduler(inbox=...)` (the worker process): no thread of its own; `run` calls the inbox
    before every step (idle only when nothing waits or runs), so a request that arrives during a
    decode joins at the very next step; `close` from the inbox ends `run` after the running rows
    and fails the waiting ones."""
    gen = load_generator(runs["gpt"])
    col = Collector()
    col.expected = 2
    calls, joined = [], {}

    def track(key):
        inner = col.emit_for(key)

        def emit(kind, index, payload):
            if kind == "delta" and key not in joined:
                joined[key] = sched.steps  # steps done before this row's first token
            inner(kind, index, payload)

        return emit

    def inbox(idle):
        calls.append((idle, sched.steps, threading.get_ident()))
        if len(calls) == 1:
            assert idle
            sched.submit("the ", make_params(max_new_tokens=12, seed=1), track(0))
        elif sched.steps == 5 and 1 not in joined and len(col.results) < 1:
            sched.submit("and ", make_params(max_new_tokens=4, seed=2), track(1))
        elif sched.steps == 7:
            sched.submit("to ", make_params(max_new_tokens=4, seed=3), track(2))  # waits: closed below
            sched.close()

    sched = Scheduler(gen, inbox=inbox)
    assert sched.thread is None
    sched.run()  # returns once closed and the running rows are done
    assert {t for _, _, t in calls} == {threading.get_ident()}
    assert [idle for idle, _, _ in calls].count(True) == 1  # idle only before the first request
    # submitted after step 5: its prompt joins step 6's pass (`fold`), its first token comes from
    # step 7 (without the C kernel: a prefill before step 6, which gives the first token)
    assert joined[1] == (6 if sched.fold else 5)
    assert col.results[(0, 0)].usage["completion_tokens"] == 12  # running rows finish after close
    assert col.results[(1, 0)].usage["completion_tokens"] == 4
    assert col.errors == ["the model was unloaded; retry the request"]  # the one still waiting
    for k, prompt, seed, n in ((0, "the ", 1, 12), (1, "and ", 2, 4)):
        [want] = gen.generate(prompt, max_new_tokens=n, seed=seed)
        assert col.results[(k, 0)].tokens == want.tokens


def test_rows_enqueued_on_an_event_loop_wait_for_the_end_of_its_turn(runs):
    """Requests submitted on an event loop in one turn reach the batch together (at the turn's
    end); they count in `load` meanwhile, so the row bound holds; `close` before the turn ends
    fails them as waiting rows instead of losing them; each row still gets generate()'s text."""
    import asyncio

    gen = load_generator(runs["gpt"])
    prompts = ["the ", "and ", "to "]

    async def one_turn(col):
        sched = Scheduler(gen, max_rows=4, loop=asyncio.get_running_loop())
        for k, p in enumerate(prompts):
            sched.submit(p, make_params(max_new_tokens=6, seed=k), col.emit_for(k))
        held = (len(sched.pending), sched.load)
        with pytest.raises(QueueFull):  # 3 held + 2 more > max_rows
            sched.submit("the ", make_params(n=2), col.emit_for(9))
        await asyncio.sleep(0)  # the turn ends
        return sched, held, len(sched.pending) + len(sched.rows) + len(sched._admitting) + len(sched._joining)

    col = Collector()
    col.expected = len(prompts)
    sched, held, after = asyncio.run(one_turn(col))
    try:
        assert held == (0, 3) and after == 3
        assert col.done.wait(30) and not col.errors
        for k, p in enumerate(prompts):
            [want] = gen.generate(p, max_new_tokens=6, seed=k)
            assert col.results[(k, 0)].tokens == want.tokens
    finally:
        sched.close()

    async def closed_in_the_turn(col):
        sched = Scheduler(gen, loop=asyncio.get_running_loop())
        sched.submit("the ", make_params(max_new_tokens=6, seed=1), col.emit_for(0))
        sched.close()

    col = Collector()
    asyncio.run(closed_in_the_turn(col))
    assert col.done.wait(10) and col.errors == ["the model was unloaded; retry the request"]

    async def on_another_loop(col):  # not the scheduler's loop: queued at once, as from a thread
        sched.submit("the ", make_params(max_new_tokens=6, seed=1), col.emit_for(0))
        return sched.load, len(sched._held)

    sched = Scheduler(load_generator(runs["gpt"]))  # (a decoder generate() has not used)
    try:
        col = Collector()
        col.expected = 1
        assert asyncio.run(on_another_loop(col)) == (1, 0)
        assert col.done.wait(30) and not col.errors
    finally:
        sched.close()
