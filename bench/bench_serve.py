"""Serving speed: continuous batching and HTTP overhead on the tiny GPT preset.

    python bench/bench_serve.py             # 16 concurrent streaming clients, 3 rounds
    python bench/bench_serve.py --quick     # 1 round (a smoke check)

A randomly initialised GPT with the `tiny` preset's shape is written as a run directory and served
by `aigc serve` in a separate process (so the clients here do not share its GIL). Every request
streams exactly N tokens (`ignore_eos`). Printed, medians over rounds:

  in-process   tokens/s of `TextGenerator.stream`, one request at a time (no server)
  1 client     tokens/s of one streaming HTTP client (target: >= 80% of in-process)
  16 clients   aggregate tokens/s of 16 concurrent streaming clients (target: >= 8x one client)
               and the p50 / p90 time to first token
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def write_tiny_run(out: Path) -> None:
    from safetensors.torch import save_model

    from aigc.config import load_preset
    from aigc.models import build_model
    from aigc.tokenizers import train_tokenizer
    from aigc.utils.io import atomic_write_json

    tok = train_tokenizer("char", [CORPUS])
    cfg = {**load_preset("gpt", "tiny")["model"], "vocab_size": tok.vocab_size}
    torch.manual_seed(0)
    model = build_model("gpt", cfg)
    out.mkdir(parents=True)
    save_model(model, str(out / "model.safetensors"))
    atomic_write_json(out / "config.json", {"family": "gpt", "model": cfg, "train": {}, "data": {}})
    tok.save(out / "tokenizer.json")


def in_process(run: Path, n: int, repeats: int) -> float:
    from aigc.generation import load_generator

    gen = load_generator(run)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        stream = gen.stream(PROMPT, max_new_tokens=n, ignore_eos=True, seed=i)
        for _ in stream:
            pass
        assert stream.result.usage["completion_tokens"] == n
        times.append(time.perf_counter() - t)
    return n / statistics.median(times[1:])  # the first one warms up


async def one_stream(client, n: int, seed: int) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streaming completion."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": n, "ignore_eos": True, "stream": True, "seed": seed,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return ttft or 0.0, time.perf_counter() - t0, usage["completion_tokens"]


async def http_round(client, clients: int, n: int, seed: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s and the times to first token of `clients` concurrent streams."""
    t = time.perf_counter()
    res = await asyncio.gather(*(one_stream(client, n, seed + i) for i in range(clients)))
    wall = time.perf_counter() - t
    assert all(tokens == n for _, _, tokens in res)
    return clients * n / wall, [ttft for ttft, _, _ in res]


async def measure(url: str, clients: int, n: int, rounds: int) -> tuple[float, list[float], list[float]]:
    """(single-client tokens/s, aggregate tokens/s per round, times to first token) over one
    keep-alive connection pool, warmed up first (connection setup is not what we measure)."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await http_round(client, clients, n, 0)  # load the model, open the connections
        single = statistics.median([(await http_round(client, 1, n, r))[0] for r in range(5 * rounds)])
        many, ttfts = [], []
        for r in range(rounds):
            tps, tt = await http_round(client, clients, n, 100 * r)
            many.append(tps)
            ttfts += tt
    return single, many, ttfts


def start_server(models: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "aigc",
        "serve",
        "--models",
        str(models),
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)  # the tiny preset's context is 64
    # one intra-op thread on both sides: a tiny model gains nothing from more, and on a busy
    # machine two spinning threads made decoding ~100x slower (measured on the 2-core dev box)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_tiny_run(models / "tiny")
        base = in_process(models / "tiny", args.tokens, repeats=5 * rounds)
        proc, url = start_server(models, args.threads)
        try:
            single, many, ttfts = asyncio.run(measure(url, args.clients, args.tokens, rounds))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    agg = statistics.median(many)
    q = statistics.quantiles(ttfts, n=10)
    print(f"tiny GPT, {args.tokens} tokens per request, {rounds} round(s), {args.threads} torch thread(s)")
    print(f"in-process stream     {base:9.1f} tokens/s")
    print(
        f"HTTP, 1 client        {single:9.1f} tokens/s  = {single / base:.0%} of in-process (target >= 80%)"
    )
    print(
        f"HTTP, {args.clients} clients      {agg:9.1f} tokens/s  = {agg / single:.1f}x one client (target >= 8x)"
    )
    print(f"time to first token   p50 {statistics.median(ttfts) * 1000:.1f} ms, p90 {q[-1] * 1000:.1f} ms "
          f"({args.clients} concurrent clients)")  # fmt: skip


if __name__ == "__main__":
    main()
