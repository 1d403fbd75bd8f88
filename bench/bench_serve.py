"""Serving speed: continuous batching and HTTP overhead on the tiny GPT preset.

    python bench/bench_serve.py                  # 16 concurrent streaming clients, 5 rounds
    python bench/bench_serve.py --quick          # 1 round (a smoke check)
    python bench/bench_serve.py --client httpx   # the httpx load generator instead of the lean one
    python bench/bench_serve.py --dtype float16  # the server decodes with fp16 weights
    python bench/bench_serve.py --worker-process # the server decodes in a child process
    python bench/bench_serve.py --compare-worker # both servers, rounds interleaved
    python bench/bench_serve.py --scheduler      # no HTTP: the batch scheduler's own ceiling

A randomly initialised GPT with the `tiny` preset's shape is written as a run directory and served
by `aigc serve` in a separate process (so the clients here do not share its GIL). Every request
streams exactly N tokens (`ignore_eos`). Rounds interleave the three measurements (in-process,
1 client, 16 clients) so a neighbour's load on the machine hits them alike. Printed, medians over
rounds, with CPU time per token (this process for in-process; the server and the client process
for HTTP: the server's process tree, so a worker process is counted) and the load average:

  in-process   tokens/s of `TextGenerator.stream`, one request at a time (no server)
  1 client     tokens/s of one streaming HTTP client (target: >= 80% of in-process)
  16 clients   aggregate tokens/s of 16 concurrent streaming clients (target: >= 8x one client)
               and the p50 / p90 time to first token; and a round's anatomy (lean client): when
               the last of the 16 streams started (its response headers arrive with its first
               tokens), when the first and the last stream ended

`--scheduler` measures what the HTTP figures are bounded by: the continuous-batching scheduler
alone (`aigc.serve.batching.Scheduler`, in this process), fed by 1 or 16 closed-loop client
threads, each submitting its next request when the last one is done (so rows keep joining and
leaving the batch, as under the HTTP load), rounds interleaved. Then the same scheduler driven
from its own thread (its inbox submits: no client threads): 1 row, 16 rows that join and leave
together, and 16 rows whose joins and leaves are spread over the steps (one starts every 3 steps):
what rows joining and leaving one at a time cost the scheduler itself.

The load generator runs on the same cores as the server, so its own CPU time is taken from what
the server gets. The default `lean` client speaks HTTP/1.1 over plain asyncio streams (one
keep-alive connection per client, chunked body read as bytes, only the usage chunk parsed as JSON,
every stream checked for text, `[DONE]` and N completion tokens): real clients run elsewhere.
`--client httpx` parses every SSE line with httpx + json.loads, as the figures before it did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CORPUS = "".join(chr(c) for c in range(32, 127)) + "\n"
PROMPT = "ROMEO: "
TEXT_RE = re.compile(rb'"text":"[^"]')  # a chunk carrying some text


# --model: the `tiny` preset (2 layers, 64 wide, context 64) or the tiny GPT of the generation
# issue (4 layers, 4 heads, 128 wide, context 512; the model of bench_generate.py)
SHAPES = {"preset": {}, "4x128": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 512}}


def write_tiny_run(out: Path, shape: str = "preset") -> None:
    from safetensors.torch import save_model

    from aigc.config import load_preset
    from aigc.models import build_model
    from aigc.tokenizers import train_tokenizer
    from aigc.utils.io import atomic_write_json

    tok = train_tokenizer("char", [CORPUS])
    cfg = {**load_preset("gpt", "tiny")["model"], **SHAPES[shape], "vocab_size": tok.vocab_size}
    torch.manual_seed(0)
    model = build_model("gpt", cfg)
    out.mkdir(parents=True)
    save_model(model, str(out / "model.safetensors"))
    atomic_write_json(out / "config.json", {"family": "gpt", "model": cfg, "train": {}, "data": {}})
    tok.save(out / "tokenizer.json")


def process_cpu(pid: int) -> float:
    """CPU seconds of a process's threads and its children's, e.g. a worker (Linux /proc).

    Each thread's `schedstat` (time on a CPU, in ns): `stat`'s user + system times count in 10 ms
    ticks, too coarse for a round of a few hundred ms (two servers then showed the same count).
    Threads that have exited are not in `task/`; the server's live as long as it does. A kernel
    without schedstats (or a thread exiting meanwhile): the process's ticks.
    """
    root = Path(f"/proc/{pid}")
    try:
        total = sum(int((t / "schedstat").read_text().split()[0]) for t in (root / "task").iterdir()) / 1e9
    except FileNotFoundError:
        fields = (root / "stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in (root / "task").iterdir():  # children started by any of its threads
        total += sum(process_cpu(int(c)) for c in (task / "children").read_text().split())
    return total


def request_body(n: int, seed: int) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": n, "ignore_eos": True, "stream": True,
            "seed": seed, "stream_options": {"include_usage": True}}  # fmt: skip


# ---------------------------------------------------------------------------- load generators


class LeanClient:
    """Streaming completions over one keep-alive HTTP/1.1 connection, with as little client work
    as possible: the chunked body is read as bytes; only the usage event is parsed."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.idle_since = 0.0
        self.started = None  # seconds from sending the last request to its response's headers

    async def stream(self, n: int, seed: int) -> tuple[float, float, int]:
        """(time to first token, total time, completion tokens) of one streaming completion."""
        # uvicorn closes a keep-alive connection idle for 5 s (the in-process rounds between
        # HTTP rounds can take longer): open a new one then, as HTTP clients do
        if self.writer is None or time.perf_counter() - self.idle_since > 4.0:
            if self.writer is not None:
                self.writer.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(request_body(n, seed)).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        t0 = time.perf_counter()
        self.writer.write(head + body)
        r = self.reader
        headers = await r.readuntil(b"\r\n\r\n")
        self.started = time.perf_counter() - t0  # the server sends them with the first tokens
        if not headers.startswith(b"HTTP/1.1 200") or b"chunked" not in headers.lower():
            raise RuntimeError(f"bad response: {headers[:200]!r}")
        ttft, buf = None, bytearray()
        while True:  # chunked transfer encoding: hex size line, data, CRLF; size 0 ends
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await r.readuntil(b"\r\n")
                break
            data = (await r.readexactly(size + 2))[:-2]
            if ttft is None and TEXT_RE.search(data):
                ttft = time.perf_counter() - t0
            buf += data
        total = time.perf_counter() - t0
        events = bytes(buf).split(b"\n\n")
        if ttft is None or events[-2] != b"data: [DONE]":
            raise RuntimeError("a stream ended without text or without [DONE]")
        usage = json.loads(next(e for e in events if b'"usage"' in e)[6:])["usage"]
        self.idle_since = time.perf_counter()
        return ttft, total, usage["completion_tokens"]


class HttpxClient:
    """The same requests through httpx, parsing every SSE line as JSON (a typical Python client)."""

    def __init__(self, client) -> None:
        self.client = client
        self.started = None  # (not measured)

    async def stream(self, n: int, seed: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        ttft, usage = None, None
        async with self.client.stream("POST", "/v1/completions", json=request_body(n, seed)) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
        if ttft is None:
            raise RuntimeError("a stream ended without text")
        return ttft, time.perf_counter() - t0, usage["completion_tokens"]


async def http_round(
    clients: list, n: int, seed: int, anatomy: list | None = None
) -> tuple[float, list[float]]:
    """Aggregate tokens/s and the times to first token of concurrent streams (one per client).

    anatomy: gets the round's (last stream started, first stream done, last stream done) in
    seconds from its start (lean client)."""
    t = time.perf_counter()
    res = await asyncio.gather(*(c.stream(n, seed + i) for i, c in enumerate(clients)))
    wall = time.perf_counter() - t
    assert all(tokens == n for _, _, tokens in res), "a stream's usage is not N completion tokens"
    if anatomy is not None and all(c.started is not None for c in clients):
        ends = [total for _, total, _ in res]
        anatomy.append((max(c.started for c in clients), min(ends), max(ends)))
    return len(clients) * n / wall, [ttft for ttft, _, _ in res]


# ---------------------------------------------------------------------------- the measurement


def start_server(models: Path, threads: int, dtype: str, worker: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "aigc", "serve", "--models", str(models), "--port", str(port),
           "--threads", str(threads), "--dtype", dtype] + (["--worker-process"] if worker else [])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("aigc serve did not start")


async def run(args, run_dir: Path, servers: list[tuple[str, str, int]]) -> tuple[dict, dict]:
    """Interleaved rounds: in-process, then per server 1 client and N clients; wall and CPU time.

    -> (in-process measurements, {server name: its measurements})."""
    from aigc.generation import load_generator

    gen = load_generator(run_dir, dtype=getattr(torch, args.dtype))  # the server's dtype
    n = args.tokens

    def in_process(seed: int) -> float:
        t = time.perf_counter()
        stream = gen.stream(PROMPT, max_new_tokens=n, ignore_eos=True, seed=seed)
        for _ in stream:
            pass
        assert stream.result.usage["completion_tokens"] == n
        return n / (time.perf_counter() - t)

    pools, clients = [], {}
    for name, url, _ in servers:
        if args.client == "httpx":
            import httpx

            limits = httpx.Limits(
                max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4
            )
            pools.append(httpx.AsyncClient(base_url=url, timeout=120, limits=limits))
            clients[name] = [HttpxClient(pools[-1]) for _ in range(args.clients)]
        else:
            clients[name] = [LeanClient(url) for _ in range(args.clients)]
        # warm up: load the model, open the connections, first calls of every path
        await http_round(clients[name], n, 0)
        await http_round(clients[name][:1], n, 0)
    in_process(0)
    base = {"tps": [], "cpu": [], "load": []}
    out = {name: {k: [] for k in ("single", "many", "ttft", "single_srv", "single_cli", "many_srv", "many_cli", "anatomy",
                                  "pct", "ratio")}
           for name, _, _ in servers}  # fmt: skip
    reps = 10  # single-stream measurements per round (each is short; 480 tokens: 21 us/token CPU ticks)
    for r in range(args.rounds):
        base["load"].append(os.getloadavg()[0])
        c0 = time.process_time()
        base["tps"] += [in_process(1 + r * reps + i) for i in range(reps)]
        base["cpu"].append((time.process_time() - c0) / (reps * n))
        for name, _, pid in servers if r % 2 == 0 else servers[::-1]:  # alternate which goes first
            m, cl = out[name], clients[name]
            s0, c0 = process_cpu(pid), time.process_time()
            m["single"] += [(await http_round(cl[:1], n, 1 + r * reps + i))[0] for i in range(reps)]
            m["single_srv"].append((process_cpu(pid) - s0) / (reps * n))
            m["single_cli"].append((time.process_time() - c0) / (reps * n))
            s0, c0 = process_cpu(pid), time.process_time()
            for k in range(3):  # 3 x 16 streams: enough tokens for the 10 ms CPU-time ticks
                tps, ttfts = await http_round(cl, n, 1000 * (3 * r + k + 1), m["anatomy"])
                m["many"].append(tps)
                m["ttft"] += ttfts
            m["many_srv"].append((process_cpu(pid) - s0) / (3 * args.clients * n))
            m["many_cli"].append((time.process_time() - c0) / (3 * args.clients * n))
            # this round's figures alone: their spread says how far the medians can be trusted
            single = statistics.median(m["single"][-reps:])
            m["pct"].append(single / statistics.median(base["tps"][-reps:]))
            m["ratio"].append(statistics.median(m["many"][-3:]) / single)
    for pool in pools:
        await pool.aclose()
    return base, out


def scheduler_round(sched, clients: int, n: int, seconds: float, seed: int) -> float:
    """Tokens/s of `clients` closed-loop threads submitting n-token requests to one Scheduler."""
    import threading

    from aigc.generation.params import make_params

    t0, done = time.perf_counter(), [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        k = 0
        while time.perf_counter() - t0 < seconds:
            finished = threading.Event()
            params = make_params(max_new_tokens=n, ignore_eos=True, seed=seed + 1000 * i + k)
            sched.submit(
                PROMPT,
                params,
                lambda kind, idx, payload, finished=finished: kind == "done" and finished.set(),
            )
            if not finished.wait(60):
                raise RuntimeError("a request did not finish")
            k += 1
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] * n / (time.perf_counter() - t0)


def scheduler_driven(gen, rows: int, n: int, seconds: float, stagger: int) -> float:
    """Tokens/s of `rows` n-token requests kept in one Scheduler from its own thread (its inbox: no
    client threads, no GIL hand-offs): each finished request is replaced at the next step. With
    `stagger` 0 the first rows start together, so all later ones join and leave together too;
    with `stagger` k one starts every k steps, and joins and leaves stay spread over the steps (as
    under independent clients)."""
    import threading

    from aigc.generation.params import make_params
    from aigc.serve.batching import Row, Scheduler

    state = {"started": 0, "done": 0, "replace": 0, "seed": 0, "stop": False}

    def submit() -> None:
        state["seed"] += 1
        ids, params = gen._requests(
            PROMPT, make_params(max_new_tokens=n, ignore_eos=True, seed=state["seed"])
        )

        def emit(kind: str, index: int, payload: object) -> None:
            if kind == "done":
                state["done"] += 1
                state["replace"] += 1

        sched.enqueue([Row(PROMPT, ids, p, k, emit) for k, p in enumerate(params)])

    def inbox(idle: bool) -> None:
        if state["stop"]:
            sched.close()
            return
        while state["started"] < rows and (not stagger or sched.steps >= stagger * state["started"]):
            state["started"] += 1
            submit()
            if stagger:
                break
        while state["replace"]:
            state["replace"] -= 1
            submit()

    sched = Scheduler(gen, inbox=inbox)
    worker = threading.Thread(target=sched.run)
    worker.start()
    time.sleep(seconds / 2)  # the first rows are in and spread
    d0, t0 = state["done"], time.perf_counter()
    time.sleep(seconds)
    tps = (state["done"] - d0) * n / (time.perf_counter() - t0)
    state["stop"] = True
    worker.join()
    return tps


def scheduler_only(args, run_dir: Path) -> None:
    from aigc.generation import load_generator
    from aigc.serve.batching import Scheduler

    gen = load_generator(run_dir, dtype=getattr(torch, args.dtype))
    sched = Scheduler(gen)
    seconds = 1.0 if args.quick else 4.0
    one, many = [], []
    try:
        scheduler_round(sched, args.clients, args.tokens, 0.5, 0)  # warm up
        for r in range(args.rounds):
            one.append(scheduler_round(sched, 1, args.tokens, seconds, 10_000 * r))
            many.append(scheduler_round(sched, args.clients, args.tokens, seconds, 10_000 * r + 5000))
    finally:
        sched.close()
    med = statistics.median
    print(f"tiny GPT ({args.model}), {args.tokens} tokens per request, dtype {args.dtype}, {args.threads} torch "
          f"thread(s), scheduler only (no HTTP), {args.rounds} round(s) of {seconds:g} s, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"1 client              {med(one):9.1f} tokens/s")
    print(f"{args.clients} clients            {med(many):9.1f} tokens/s  = {med(many) / med(one):.1f}x one client "
          f"(rounds: {', '.join(f'{m / o:.1f}' for o, m in zip(one, many, strict=True))})")  # fmt: skip
    # the scheduler's own cost of rows joining and leaving: driven from its thread, together vs spread
    single, together, spread = [], [], []
    for _ in range(args.rounds):
        single.append(scheduler_driven(gen, 1, args.tokens, seconds / 2, 0))
        together.append(scheduler_driven(gen, args.clients, args.tokens, seconds / 2, 0))
        spread.append(scheduler_driven(gen, args.clients, args.tokens, seconds / 2, 3))
    print(f"driven from the scheduler's thread (no client threads): 1 row {med(single):.1f} tokens/s; "
          f"{args.clients} rows joining and leaving together {med(together):.1f} = "
          f"{med(together) / med(single):.1f}x, spread (one every 3 steps) {med(spread):.1f} = "
          f"{med(spread) / med(single):.1f}x")  # fmt: skip


def report(args, name: str, base: dict, m: dict) -> None:
    med, us = statistics.median, 1e6
    tps, single, agg = med(base["tps"]), med(m["single"]), med(m["many"])
    q = statistics.quantiles(m["ttft"], n=10)
    print(f"-- server: {name}")
    print(f"HTTP, 1 client        {single:9.1f} tokens/s  = {single / tps:.0%} of in-process (target >= 80%)"
          f"  CPU server {med(m['single_srv']) * us:.1f} + client {med(m['single_cli']) * us:.1f} us/token")  # fmt: skip
    print(f"HTTP, {args.clients} clients      {agg:9.1f} tokens/s  = {agg / single:.1f}x one client (target >= 8x)"
          f"  CPU server {med(m['many_srv']) * us:.1f} + client {med(m['many_cli']) * us:.1f} us/token")  # fmt: skip
    print(f"per round             1 client {min(m['pct']):.0%}-{max(m['pct']):.0%} of in-process, "
          f"{args.clients} clients {min(m['ratio']):.1f}-{max(m['ratio']):.1f}x one client")  # fmt: skip
    print(f"time to first token   p50 {med(m['ttft']) * 1000:.1f} ms, p90 {q[-1] * 1000:.1f} ms "
          f"({args.clients} concurrent clients)")  # fmt: skip
    if m["anatomy"]:  # where a round's time goes: taking the requests in, decoding, the stragglers
        started, first, last = (med(x) * 1000 for x in zip(*m["anatomy"], strict=True))
        print(f"{args.clients}-client round      last stream started at {started:.1f} ms, first stream done "
              f"{first:.1f} ms, last {last:.1f} ms (medians)")  # fmt: skip
    # on a loaded machine wall times follow the neighbours; CPU per token much less so
    one_cpu = med(m["single_srv"]) + med(m["single_cli"])
    many_cpu = med(m["many_srv"]) + med(m["many_cli"])
    print(
        f"CPU per token         in-process / HTTP 1 client = {med(base['cpu']) / one_cpu:.0%}; "
        f"1 client / {args.clients} clients = {one_cpu / many_cpu:.1f}x (server + client)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", choices=tuple(SHAPES), default="preset",
                    help="preset: the tiny preset, 2x64, context 64; 4x128: bench_generate's tiny GPT")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=None, help="per request (default 48; 4x128: 256)")
    ap.add_argument("--client", choices=("lean", "httpx"), default="lean")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "int8"), default="float32")
    ap.add_argument("--worker-process", action="store_true", help="aigc serve --worker-process")
    ap.add_argument("--compare-worker", action="store_true",
                    help="two servers, without and with --worker-process, rounds interleaved")  # fmt: skip
    # one intra-op thread on both sides: a tiny model gains nothing from more, and on a busy
    # machine two spinning threads made decoding ~100x slower (measured on the 2-core dev box)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scheduler", action="store_true", help="the batch scheduler alone, no HTTP")
    args = ap.parse_args()
    args.rounds = 1 if args.quick else args.rounds
    args.tokens = args.tokens or (256 if args.model == "4x128" else 48)
    torch.set_num_threads(args.threads)
    kinds = [False, True] if args.compare_worker else [args.worker_process]
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_tiny_run(models / "tiny", args.model)
        if args.scheduler:
            return scheduler_only(args, models / "tiny")
        procs, servers = [], []
        try:
            for worker in kinds:
                os.environ["AIGC_HOME"] = str(Path(tmp) / f"home{worker}")  # each server: a fresh store
                proc, url = start_server(models, args.threads, args.dtype, worker)
                procs.append(proc)
                servers.append(("worker process" if worker else "one process", url, proc.pid))
            base, out = asyncio.run(run(args, models / "tiny", servers))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"tiny GPT ({args.model}), {args.tokens} tokens per request, {args.rounds} round(s), {args.threads} torch thread(s), "
          f"dtype {args.dtype}, {args.client} client, load average {min(base['load']):.2f}-{max(base['load']):.2f}")  # fmt: skip
    print(f"in-process stream     {statistics.median(base['tps']):9.1f} tokens/s  "
          f"CPU {statistics.median(base['cpu']) * 1e6:6.1f} us/token")  # fmt: skip
    for name, _, _ in servers:
        report(args, name, base, out[name])


if __name__ == "__main__":
    main()
