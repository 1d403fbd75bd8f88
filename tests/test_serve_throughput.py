"""The server's per-request and per-token savings keep its contracts: text decoded a few tokens at
a time, one write per event batch, coalesced store writes, the lean bench client, `serve --dtype`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from aigc.generation import load_generator
from aigc.generation.params import make_params
from aigc.generation.stream import Detokenizer
from aigc.serve.batching import Scheduler
from aigc.serve.settings import EMIT_EACH_FIRST
from aigc.serve.streaming import SSE_DONE, SSEResponse
from serve_helpers import CORPUS, write_text_run

TEXT = "ROMEO: soft! 春眠不觉晓, what light 🌙 breaks?"


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("group", [1, 2, 3, 7])
def test_detokenizer_in_groups_gives_the_same_text(kind, group):
    """add() + take() every `group` tokens streams the same text as push() per token (byte-level BPE
    splits the Chinese characters and the emoji over several tokens)."""
    from aigc.tokenizers import train_tokenizer

    tok = train_tokenizer(kind, [CORPUS + TEXT * 3], **({"vocab_size": 300} if kind == "bpe" else {}))
    ids = tok.encode(TEXT)
    d = Detokenizer(tok.decode, ids[:2])
    deltas = []
    for k, t in enumerate(ids[2:], 1):
        d.add(t)
        if k % group == 0:
            deltas.append(d.take())
    tail = d.flush()
    ref = Detokenizer(tok.decode, ids[:2])
    one_by_one = "".join(ref.push(t) for t in ids[2:]) + ref.flush()
    assert "".join(deltas) + tail == one_by_one == tok.decode(ids[2:])
    assert "\ufffd" not in "".join(deltas)  # a split character is never shown half-done


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return load_generator(write_text_run(tmp_path_factory.mktemp("runs") / "gpt"))


def run(sched: Scheduler, prompt: str, **kw):
    deltas, out, done = [], {}, threading.Event()

    def emit(kind, index, payload):
        if kind == "delta":
            deltas.append(payload)
        else:
            out[kind] = payload
            done.set()

    sched.submit(prompt, make_params(**kw), emit)
    assert done.wait(30) and "done" in out, out
    return deltas, out["done"]


def test_rows_hand_over_text_at_most_every_emit_interval(gpt):
    """Without stop strings a row's text goes out at each of its first EMIT_EACH_FIRST tokens and
    then at most every emit_interval (here: never before the end); the text is generate()'s either
    way."""
    sched = Scheduler(gpt, emit_interval=1e9)
    try:
        deltas, res = run(sched, "ROMEO:", max_new_tokens=30, seed=4, ignore_eos=True)
        # a stop string makes the row decode every token (it must end at the exact one)
        stop_deltas, stop_res = run(sched, "ROMEO:", max_new_tokens=30, seed=4, ignore_eos=True, stop=["zz"])
    finally:
        sched.close()
    [ref] = gpt.generate("ROMEO:", max_new_tokens=30, seed=4, ignore_eos=True)
    assert res.text == stop_res.text == ref.text and res.tokens == ref.tokens
    # (the char tokenizer: one character per token) the first tokens one by one, then the rest at the end
    assert len(deltas) == EMIT_EACH_FIRST + 1 and "".join(deltas) == ref.text
    assert all(len(d) == 1 for d in deltas[:EMIT_EACH_FIRST])
    assert len(stop_deltas) > 2 and "".join(stop_deltas) == ref.text


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def asgi(response, messages_in, sent=None):
    """Run an ASGI response; -> the messages it sent (appended to `sent` as they go)."""
    sent = [] if sent is None else sent

    async def main():
        queue = list(messages_in)

        async def receive():
            if queue:
                return queue.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)

    asyncio.run(main())
    return sent


def test_sse_response_ends_with_the_terminator_in_the_last_write():
    released = []

    async def events():
        yield "data: 1\n\n"
        yield "data: 2\n\n" + SSE_DONE

    call = FakeCall()
    sent = asgi(SSEResponse(events, call, lambda: released.append(1)), [])
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"data: 2\n\ndata: [DONE]\n\n", False),  # one write: the last events + the end of the body
    ]
    assert released == [1] and call.cancelled


def test_sse_response_sends_the_headers_with_the_first_chunk():
    """Nothing is written before the first chunk (headers and chunk: one wake-up of the client); an
    empty string (no event within HEADERS_WITHIN_S) sends the headers alone."""
    sent = []

    async def events():
        await asyncio.sleep(0.01)
        assert sent == []  # still nothing written while the first event is awaited
        yield "data: 1\n\n"
        yield "data: 2\n\n" + SSE_DONE

    asgi(SSEResponse(events, FakeCall(), lambda: None), [], sent)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert sent[1]["body"] == b"data: 1\n\n"

    async def slow():
        yield ""  # what sse_batches yields when the first event is late
        assert [m["type"] for m in sent] == ["http.response.start"]
        yield SSE_DONE

    sent.clear()
    asgi(SSEResponse(slow, FakeCall(), lambda: None), [], sent)
    assert [(m["type"], m.get("body")) for m in sent] == [
        ("http.response.start", None),
        ("http.response.body", SSE_DONE.encode()),
    ]


class Held:
    """A scheduler whose one row emits only when the test calls `emit`."""

    def submit(self, prompt, params, emit):
        from aigc.serve.batching import Row, Ticket

        self.emit = emit
        return Ticket([Row(prompt, [0], params, 0, emit)])


def test_sse_batches_open_with_the_head_at_the_first_event_or_the_headers_deadline(monkeypatch):
    """`head` goes with the first event's chunks; if no event comes within HEADERS_WITHIN_S it is
    yielded alone then (or "" without a head), and the events follow as they come."""
    import aigc.serve.streaming as S

    monkeypatch.setattr(S, "HEADERS_WITHIN_S", 0.05)

    async def render(kind, idx, payload):
        return [f"data: {kind} {payload}\n\n"]

    async def stream(head, first_event_after):
        sched, out, times = Held(), [], []
        call = S.TextCall(sched, timeout_s=10)
        call.add("p", make_params(max_new_tokens=1))
        asyncio.get_running_loop().call_later(first_event_after, sched.emit, "delta", 0, "a")
        t0 = time.monotonic()
        chunks = S.sse_batches(call, render, lambda: [], head)
        async for text in chunks:
            out.append(text)
            times.append(time.monotonic() - t0)
            if len(out) == 2 or (len(out) == 1 and first_event_after < 0.05):
                sched.emit("done", 0, "end")
        return out, times

    out, times = asyncio.run(stream("data: head\n\n", 0.0))
    assert out == ["data: head\n\ndata: delta a\n\n", "data: done end\n\n" + SSE_DONE]
    out, times = asyncio.run(stream("data: head\n\n", 0.3))
    assert out[0] == "data: head\n\n" and 0.04 < times[0] < 0.25
    assert out[1:] == ["data: delta a\n\n", "data: done end\n\n" + SSE_DONE] and times[1] >= 0.29
    out, _ = asyncio.run(stream("", 0.3))
    assert out == ["", "data: delta a\n\n", "data: done end\n\n" + SSE_DONE]


def test_sse_batches_leave_a_rows_last_deltas_to_its_end():
    """The deltas of a row that ends in the same batch are not rendered: render(done) sends the rest
    from the whole text (a moderated stream checks it once, not twice). Other rows' deltas are."""
    import aigc.serve.streaming as S

    async def stream():
        sched, rendered = Held(), []
        call = S.TextCall(sched, timeout_s=10)
        call.add("p", make_params(max_new_tokens=3))
        first = sched.emit
        call.add("q", make_params(max_new_tokens=3))

        async def render(kind, idx, payload):
            rendered.append((kind, idx, payload))
            return [f"{kind}{idx} {payload};"]

        first("delta", 0, "a")
        out = []
        async for text in S.sse_batches(call, render, lambda: []):
            out.append(text)
            if len(out) == 1:  # one batch: row 0's last delta and end, row 1's delta
                first("delta", 0, "b")
                sched.emit("delta", 0, "x")
                first("done", 0, "ab")
            elif len(out) == 2:
                sched.emit("done", 0, "x")
        return rendered, out

    rendered, out = asyncio.run(stream())
    assert rendered == [("delta", 0, "a"), ("delta", 1, "x"), ("done", 0, "ab"), ("done", 1, "x")]
    assert out == ["delta0 a;", "delta1 x;done0 ab;", "done1 x;" + SSE_DONE]


def test_a_stream_whose_text_was_all_held_back_takes_the_next_text_at_once(monkeypatch):
    """After a batch the route sent none of (its text held back by a guard), the next batch goes out
    as soon as it comes; after one it sent, it waits STREAM_INTERVAL_S as always."""
    import aigc.serve.streaming as S

    monkeypatch.setattr(S, "STREAM_INTERVAL_S", 0.5)

    async def stream(hold_first):
        sched, out = Held(), []
        call = S.TextCall(sched, timeout_s=10)
        call.add("p", make_params(max_new_tokens=3))
        first = [True]

        async def render(kind, idx, payload):
            if first[0] and hold_first:  # a guard holding back the first character
                first[0] = False
                return []
            return [f"{kind} {payload};"]

        loop = asyncio.get_running_loop()
        loop.call_soon(sched.emit, "delta", 0, "a")
        loop.call_later(0.05, sched.emit, "delta", 0, "b")
        loop.call_later(0.7, sched.emit, "done", 0, "end")  # (a row's end would flush at once)
        t0 = time.monotonic()
        async for text in S.sse_batches(call, render, lambda: []):
            out.append((text, time.monotonic() - t0))
        return out

    out = asyncio.run(stream(hold_first=True))
    assert out[0][0] == "delta b;" and 0.04 < out[0][1] < 0.3  # not after the 0.5 s interval
    out = asyncio.run(stream(hold_first=False))
    assert out[0][0] == "delta a;" and out[1][0] == "delta b;" and 0.45 <= out[1][1] < 0.65


def test_sse_response_stops_when_the_client_goes_away():
    """A disconnect ends a stream that is waiting for events: rows cancelled, slot released."""
    released, closed = [], []

    async def events():
        try:
            yield "data: 1\n\n"
            await asyncio.sleep(3600)  # a model that never answers again
            yield "never"
        finally:
            closed.append(1)

    call = FakeCall()
    sent = asgi(SSEResponse(events, call, lambda: released.append(1)), [{"type": "http.disconnect"}])
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n"]
    assert closed == [1] and call.cancelled and released == [1]


class CountingStore:
    """A store that counts its write transactions (and can fail them)."""

    def __init__(self, store, fail: Exception | None = None) -> None:
        self.store, self.fail, self.writes = store, fail, 0

    def add_generations(self, rows):
        self.writes += 1
        if self.fail is not None:
            raise self.fail
        return self.store.add_generations(rows)


def test_text_recorder_writes_concurrent_requests_in_one_transaction(tmp_path):
    from types import SimpleNamespace

    from aigc.feedback.store import Store
    from aigc.serve.registry import ModelEntry
    from aigc.serve.streaming import TextRecorder

    store = Store.open(str(tmp_path / "aigc.db"))
    state = SimpleNamespace(store=CountingStore(store))
    entry = ModelEntry("m", "m", None, "hf:nowhere", "text", 0, ("hf:nowhere",))
    rec = TextRecorder(state)

    def rows(k: int, n: int):
        return [dict(kind="text", model="m", prompt=f"p{k}", output_text=f"out{k}.{i}") for i in range(n)]

    async def main():
        return await asyncio.gather(*(rec.record(entry, rows(k, 1 + k % 2)) for k in range(5)))

    ids = asyncio.run(main())
    assert state.store.writes == 1  # 5 requests, one transaction
    assert [len(i) for i in ids] == [1, 2, 1, 2, 1]
    flat = [i for request in ids for i in request]
    assert len(set(flat)) == len(flat)
    for k, request in enumerate(ids):  # each request got its own rows' ids, in order
        assert [store.get_generation(i)["output_text"] for i in request] == [
            r["output_text"] for r in rows(k, len(request))
        ]
    # a busy store: every request in the write gets the retryable 503
    import sqlalchemy as sa

    from aigc.serve.app import ApiError

    state.store = CountingStore(store, fail=sa.exc.OperationalError("INSERT", {}, Exception("locked")))

    async def failing():
        return await asyncio.gather(
            *(rec.record(entry, rows(k, 1)) for k in range(3)), return_exceptions=True
        )

    errors = asyncio.run(failing())
    assert all(isinstance(e, ApiError) and e.status == 503 and e.retry for e in errors)
    store.close()


def test_lean_bench_client_reads_a_real_stream(tmp_path, monkeypatch):
    """bench/bench_serve.py's load generator parses the chunked SSE body of a live server."""
    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from conftest import REPO
    from serve_helpers import LiveServer

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    import bench_serve

    write_text_run(tmp_path / "models" / "tiny")
    with LiveServer(create_app(Settings(models_dirs=[tmp_path / "models"]))) as live:
        anatomy = []

        async def main():
            clients = [bench_serve.LeanClient(live.url) for _ in range(3)]
            # keep-alive reuse
            return [await bench_serve.http_round(clients, 9, seed, anatomy) for seed in (1, 2)]

        for tps, ttfts in asyncio.run(main()):
            assert tps > 0 and len(ttfts) == 3 and all(t > 0 for t in ttfts)
        # (last stream started, first done, last done): a stream's headers come with its first
        # tokens, so the last to start may start after another has ended, never after its own end
        assert len(anatomy) == 2
        assert all(0 < acc <= last and 0 < first <= last for acc, first, last in anatomy)
    sys.modules.pop("bench_serve", None)


def test_bench_scheduler_driven_from_its_thread_keeps_rows_in(tmp_path, monkeypatch):
    """bench_serve's `--scheduler` drive: rows replaced from the scheduler's own thread, together or
    spread over the steps; every request completes and the run stops cleanly."""
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_serve

    gen = load_generator(write_text_run(tmp_path / "tiny"))
    for rows, stagger in ((1, 0), (3, 0), (3, 2)):
        assert bench_serve.scheduler_driven(gen, rows, 6, 0.3, stagger) > 0
    sys.modules.pop("bench_serve", None)


def test_serve_dtype_reaches_the_decoder(tmp_path, run_cli):
    from aigc.serve.registry import ModelRegistry
    from aigc.serve.settings import Settings

    write_text_run(tmp_path / "models" / "tiny")
    reg = ModelRegistry(Settings(models_dirs=[tmp_path / "models"], dtype="bfloat16"))
    try:
        assert reg.get("tiny", "text").generator.decoder.dtype == torch.bfloat16
    finally:
        reg.close()
    code, _, err = run_cli("serve", "--models", tmp_path / "models", "--dtype", "float64")
    assert code == 1 and "--dtype 'float64' is not supported" in err


# ---------------------------------------------------------------------------- worker process


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A ProcessScheduler on a tiny GPT, and the in-process generator to compare with."""
    from aigc.serve.worker import ProcessScheduler

    run_dir = write_text_run(tmp_path_factory.mktemp("runs") / "gpt")
    gen = load_generator(run_dir)
    gen.model_id = "gpt"
    sched = ProcessScheduler(gen, str(run_dir), max_batch=8, max_rows=6)
    yield gen, sched
    sched.close()


def test_worker_process_gives_generate_text(remote):
    """Rows decoded in the child process come back with TextGenerator.generate's text, per row."""
    gen, sched = remote
    requests = [
        ("ROMEO:", dict(max_new_tokens=25, seed=3, temperature=0.9)),
        ("soft", dict(max_new_tokens=12, temperature=0)),
        ("", dict(max_new_tokens=30, seed=5, top_k=4, stop=["o"])),
        ("User: 春眠", dict(max_new_tokens=20, seed=7, top_p=0.8, n=2)),
    ]
    got, deltas, done = {}, {}, threading.Event()
    expected = sum(kw.get("n", 1) for _, kw in requests)

    def emit_for(k):
        def emit(kind, index, payload):
            if kind == "delta":
                deltas.setdefault((k, index), []).append(payload)
            else:
                got[(k, index)] = payload
                if len(got) == expected or kind == "error":
                    done.set()

        return emit

    for k, (prompt, kw) in enumerate(requests):
        sched.submit(prompt, make_params(**kw), emit_for(k))
    assert done.wait(30) and all(not isinstance(r, str) for r in got.values()), got
    for k, (prompt, kw) in enumerate(requests):
        for i, ref in enumerate(gen.generate(prompt, **{**kw, "seed": got[(k, 0)].seed})):  # resolved seed
            r = got[(k, i)]
            assert (r.text, r.tokens, r.finish_reason, r.seed) == (
                ref.text,
                ref.tokens,
                ref.finish_reason,
                ref.seed,
            )
            assert "".join(deltas.get((k, i), [])) == ref.text
    assert sched.load == 0


def test_worker_process_cancel_and_bounds(remote):
    from aigc.errors import AigcError
    from aigc.serve.batching import QueueFull

    gen, sched = remote
    got = threading.Event()
    ticket = sched.submit(
        "ROMEO:", make_params(max_new_tokens=4000, seed=1, ignore_eos=True), lambda *a: got.set()
    )
    assert got.wait(10)  # it is decoding
    with pytest.raises(QueueFull):  # 1 running + 6 more rows > max_rows
        sched.submit("w", make_params(n=6), lambda *a: None)
    ticket.cancel()
    assert sched.load == 0
    with pytest.raises(AigcError, match="num_beams"):
        sched.submit("w", make_params(num_beams=2), lambda *a: None)
    done = threading.Event()
    sched.submit(
        "soft", make_params(max_new_tokens=3, seed=2), lambda kind, i, p: kind == "done" and done.set()
    )
    assert done.wait(10) and sched.load == 0  # the cancelled row left the child's batch


def test_worker_events_read_on_the_loop_are_framed_as_connection_sends_them():
    """The loop-side reader takes whatever a non-blocking read returns (a part of a message,
    several at once) and decodes exactly what `Connection.send` framed, in order."""
    import pickle
    import select
    import socket
    import struct
    from multiprocessing.connection import Connection

    from aigc.serve.worker import ProcessScheduler

    a, b = socket.socketpair()
    sender, raw = Connection(a.detach()), b
    messages = [[(k, "delta", 0, "x" * (k * 97 % 700))] for k in range(40)]
    for m in messages:
        sender.send(m)
    stream = b""
    while select.select([raw], [], [], 0.5)[0]:
        stream += raw.recv(1 << 20)
        if len(stream) >= sum(4 + len(pickle.dumps(m)) for m in messages):
            break
    big = pickle.dumps([(99, "delta", 0, "y" * 300)])  # the 8-byte length form, as for > 2 GiB
    stream += struct.pack("!i", -1) + struct.pack("!Q", len(big)) + big
    sched = ProcessScheduler.__new__(ProcessScheduler)
    sched._buf, got = bytearray(), []
    sched._dispatch = got.append
    for at in range(0, len(stream), 333):  # reads of any size
        sched._buf += stream[at : at + 333]
        sched._messages()
    assert got == [*messages, pickle.loads(big)] and not sched._buf
    sender.close()
    raw.close()


@pytest.mark.slow
def test_worker_process_read_on_a_loop_closes_from_any_thread(tmp_path):
    """Events read on an event loop: rows get their results; `close` waits for the child's last
    events whether it runs on another thread (the loop reads them) or on the loop itself (it reads
    them there), and the child exits."""
    import asyncio

    from aigc.serve.worker import ProcessScheduler

    run_dir = write_text_run(tmp_path / "gpt")
    gen = load_generator(run_dir)
    gen.model_id = "gpt"
    [ref] = gen.generate("soft", max_new_tokens=30, seed=4, ignore_eos=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for on_loop in (False, True):
            sched = ProcessScheduler(gen, str(run_dir), loop=loop)
            got, started, done = [], threading.Event(), threading.Event()

            def emit(kind, i, payload, got=got, started=started, done=done):
                got.append(payload)
                started.set()
                if kind != "delta":
                    done.set()

            sched.submit("soft", make_params(max_new_tokens=30, seed=4, ignore_eos=True), emit)
            assert sched.thread is None  # no reader thread: the loop reads
            if on_loop:  # close on the loop's own thread, the rows still running
                # (once the row has started: a row still waiting when close arrives gets an error)
                assert started.wait(30)
                assert sched._attached
                asyncio.run_coroutine_threadsafe(_call(sched.close), loop).result(timeout=60)
            else:
                assert done.wait(30)
                sched.close()
            assert done.is_set() and got[-1].text == ref.text and sched.proc.poll() is not None
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


async def _call(fn):
    return fn()


def test_worker_process_sends_a_loop_turns_submits_as_one_command(tmp_path):
    """Requests submitted on the event loop in one turn reach the child as one command (they join
    the batch together); a cancel in the same turn goes after its submit; each row still gets
    generate()'s text."""
    from aigc.serve.worker import ProcessScheduler

    run_dir = write_text_run(tmp_path / "gpt")
    gen = load_generator(run_dir)
    gen.model_id = "gpt"
    prompts = ["ROMEO:", "soft", "w", "User: 春眠"]
    refs = [
        gen.generate(p, max_new_tokens=12, seed=k, temperature=0.9)[0].text for k, p in enumerate(prompts)
    ]

    async def scenario(sched):
        sent, send = [], sched.conn.send
        sched.conn.send = lambda msg: (sent.append(msg), send(msg))[1]
        loop, got, left = asyncio.get_running_loop(), {}, [len(prompts)]
        done = loop.create_future()

        def emit_for(k):
            def emit(kind, index, payload):  # (on the loop: its events are read there)
                if kind != "delta":
                    got[k] = payload
                    left[0] -= 1
                    if not left[0]:
                        done.set_result(None)

            return emit

        for k, p in enumerate(prompts):  # one turn: no await between the submits
            sched.submit(p, make_params(max_new_tokens=12, seed=k, temperature=0.9), emit_for(k))
        assert sent == []  # held until the turn ends
        await asyncio.sleep(0)
        assert [(m[0], len(m[1])) for m in sent] == [("submit", len(prompts))]
        gone = sched.submit("so", make_params(max_new_tokens=50, seed=9), emit_for("gone"))
        gone.cancel()  # sends the held submit first
        await asyncio.wait_for(done, 30)
        return list(sent), got

    async def main():
        sched = ProcessScheduler(gen, str(run_dir), loop=asyncio.get_running_loop())
        try:
            return sched, await scenario(sched)
        finally:
            await asyncio.to_thread(sched.close)

    sched, (sent, got) = asyncio.run(main())
    assert [m[0] for m in sent] == ["submit", "submit", "cancel"]
    assert [item[1] for m in sent[:2] for item in m[1]] == [*prompts, "so"]
    assert sent[2][1] == sent[1][1][0][0]  # the cancelled request's id
    assert "gone" not in got and sched.load == 0
    assert [got[k].text for k in range(len(prompts))] == refs


def test_worker_process_death_is_seen_on_its_loop_without_polling(tmp_path, monkeypatch):
    """`alive` (checked by the registry on every request): on the loop that reads the child's events,
    no process poll (a syscall per request); the end of the events stream marks a dead child.
    Elsewhere the process is polled."""
    from aigc.serve.worker import ProcessScheduler

    run_dir = write_text_run(tmp_path / "gpt")
    gen = load_generator(run_dir)
    gen.model_id = "gpt"

    async def main():
        sched = ProcessScheduler(gen, str(run_dir), loop=asyncio.get_running_loop())
        polls, poll = [], sched.proc.poll
        monkeypatch.setattr(sched.proc, "poll", lambda: polls.append(1) or poll())
        try:
            await asyncio.sleep(0)  # the loop watches the events socket
            assert sched.alive and polls == []
            assert await asyncio.to_thread(lambda: sched.alive) and polls == [1]
            sched.proc.kill()  # (Popen polls here itself)
            await asyncio.to_thread(sched.proc.wait)
            n = len(polls)
            # the loop read the socket's end before this task resumed
            assert not sched.alive and len(polls) == n and sched.closed
        finally:
            await asyncio.to_thread(sched.close)

    asyncio.run(main())


def test_worker_process_that_cannot_load_says_so(tmp_path, monkeypatch):
    import subprocess

    from aigc.errors import AigcError
    from aigc.serve.worker import ProcessScheduler

    run_dir = write_text_run(tmp_path / "gpt")
    gen = load_generator(run_dir)
    gen.model_id = "gpt"
    (run_dir / "model.safetensors").write_bytes(b"not weights")  # the child's own load fails
    spawned = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: spawned.append(popen(*a, **kw)) or spawned[-1])
    with pytest.raises(AigcError, match="batch worker process could not load"):
        ProcessScheduler(gen, str(run_dir))
    assert spawned[0].returncode is not None  # the child is gone, not left behind


@pytest.mark.slow
def test_server_with_worker_process_streams_and_frees_slots(tmp_path, monkeypatch):
    """`aigc serve --worker-process`: a stream equals generate(); a client that leaves frees its slot."""
    import re
    import time

    import httpx

    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from serve_helpers import LiveServer

    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    run_dir = write_text_run(tmp_path / "models" / "tiny")
    [ref] = load_generator(run_dir).generate("ROMEO:", max_new_tokens=20, seed=5, temperature=0.8)
    body = {
        "model": "tiny",
        "prompt": "ROMEO:",
        "max_tokens": 20,
        "seed": 5,
        "temperature": 0.8,
        "stream": True,
    }
    app = create_app(Settings(models_dirs=[tmp_path / "models"], worker_process=True))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        text = ""
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
        assert text == ref.text
        tokens = r"aigc_generated_tokens_total (\d+)"
        before = int(re.search(tokens, client.get("/metrics").text).group(1))
        assert before >= 20  # the child's step metrics reach /metrics
        long = {**body, "max_tokens": 4096, "ignore_eos": True}
        with client.stream("POST", "/v1/completions", json=long) as r:
            assert next(r.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 10
        depth = r'aigc_queue_depth\{model="tiny"\} (\d+)'
        while int(re.search(depth, client.get("/metrics").text).group(1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(re.search(depth, client.get("/metrics").text).group(1)) == 0
        time.sleep(0.2)  # the child's last metrics, sent when its batch went idle
        assert int(re.search(tokens, client.get("/metrics").text).group(1)) - before < 4096
        # a worker that dies is replaced on the next request
        [lm] = app.state.registry.loaded.values()
        assert lm.scheduler.thread is None  # the child's events were read on the server's loop
        lm.scheduler.proc.kill()
        lm.scheduler.proc.wait()
        r = client.post("/v1/completions", json={**body, "stream": False})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
        [lm2] = app.state.registry.loaded.values()
        assert lm2 is not lm and lm2.alive and not lm.alive


def test_bench_process_cpu_counts_children_finer_than_ticks(monkeypatch):
    """bench_serve's server CPU figure: a process's threads and its children (a worker process),
    to well under the 10 ms ticks of /proc/<pid>/stat."""
    import subprocess

    from conftest import REPO

    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc")
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_serve

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.137: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        t0 = time.process_time()
        c0 = bench_serve.process_cpu(os.getpid()) - bench_serve.process_cpu(child.pid)
        while time.process_time() - t0 < 0.053:  # this process: not a whole number of ticks
            pass
        c1 = bench_serve.process_cpu(os.getpid()) - bench_serve.process_cpu(child.pid)
        assert abs((c1 - c0) - (time.process_time() - t0)) < 0.003
        deadline = time.monotonic() + 20
        while bench_serve.process_cpu(child.pid) < 0.137 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the child sleeps now
        own = bench_serve.process_cpu(child.pid)
        assert 0.137 <= own < 0.137 + 0.1  # its interpreter's start-up included
        assert bench_serve.process_cpu(os.getpid()) >= own + c1
    finally:
        child.kill()
        child.wait()
    sys.modules.pop("bench_serve", None)
