"""Decode-step attention: the C kernel (`aigc.generation.attention_kernel`) vs torch's SDPA.

    python bench/bench_attention.py                 # tiny GPT shapes: 4 heads x 32 dims, batch 1 / 8 / 16
    python bench/bench_attention.py --threads 1
    python bench/bench_attention.py --prefill       # one prompt's prefill: one kernel pass vs SDPA

One query per row over a (B, 2K, S, D) float32 cache, rows at different positions (SDPA gets the
boolean mask the decoder gives it), both sides on the same tensors, interleaved round by round;
medians in µs per call and the ratio. The outputs are compared first (max abs difference).

`--prefill` times `GPTDecoder.prefill` of 1 and 4 distinct T-token prompts both ways: one pass with
every token a query row of the kernel (what the decoder does up to `decoders.FLAT_PREFILL_MAX`
tokens; the limit raised to T here) vs each prompt through SDPA's causal kernel (the limit set
to 0), on random GPTs 2x64 (4 heads of 16, the tiny preset's shape) and 2x768 (12 heads of 64,
GPT-2 small's width); logits compared first. It is what the limit is set from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from aigc.generation import decoders
from aigc.generation.attention_kernel import decode_attention_kernel
from aigc.models.gpt import GPT, GPTConfig


def per_call(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", action="store_true", help="one prompt's prefill: a kernel pass vs SDPA")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prefill:
        return prefill(args.rounds)
    H, D = args.heads, args.head_dim
    K = args.kv_heads or H
    kernel = decode_attention_kernel(D)
    if kernel is None:
        raise SystemExit("the kernel could not be built here (no C compiler, or AIGC_NO_KERNELS=1)")
    print(f"{H} heads ({K} k/v) x {D} dims, float32; {torch.get_num_threads()} torch threads; "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for B in (1, 8, 16):
        for s in (32, 128, 256, 512):
            S = s + 32
            kv = torch.randn(B, 2 * K, S, D, generator=g)
            qk = torch.randn(B, H + 2 * K, D, generator=g)
            positions = torch.randint(s // 2, s, (B,), generator=g)
            positions[0] = s - 1
            lens = positions + 1
            out = torch.empty(B, H, D)
            mask = (torch.arange(s)[None, :] <= positions[:, None])[:, None, None, :]

            def ours(qk=qk, kv=kv, lens=lens, out=out) -> torch.Tensor:
                kernel(qk, kv, lens, out)
                return out

            def sdpa(qk=qk, kv=kv, s=s, mask=mask) -> torch.Tensor:
                return F.scaled_dot_product_attention(
                    qk[:, :H, None], kv[:, :K, :s], kv[:, K:, :s], attn_mask=mask, enable_gqa=K != H
                )[:, :, 0]

            with torch.inference_mode():
                diff = (ours() - sdpa()).abs().max().item()
                n = max(200, 200_000 // (B * s))
                a, b = [], []
                for _ in range(args.rounds):
                    a.append(per_call(ours, n))
                    b.append(per_call(sdpa, n))
            ka, kb = statistics.median(a), statistics.median(b)
            print(f"batch {B:2d}, {s:3d} slots: kernel {ka:6.1f} µs | SDPA {kb:6.1f} µs | "
                  f"{kb / ka:4.1f}x | max diff {diff:.1e}")  # fmt: skip


def prefill(rounds: int) -> None:
    print(f"prefill, float32; {torch.get_num_threads()} torch threads; load {os.getloadavg()[0]:.1f}")
    limit = decoders.FLAT_PREFILL_MAX
    for name, shape, lengths in (
        ("2x64", dict(n_head=4, n_embd=64, block_size=512), (7, 64, 128, 256, 511)),
        ("2x768", dict(n_head=12, n_embd=768, block_size=1024), (64, 128, 256, 1024)),
    ):
        torch.manual_seed(0)
        dec = decoders.GPTDecoder(GPT(GPTConfig(vocab_size=512, n_layer=2, **shape)).eval())
        for T in lengths:
            for P in (1, 4):  # distinct prompts of T tokens
                prompts = [[(i + j) % 500 + 1 for i in range(T)] for j in range(P)]

                def one_pass(prompts=prompts, dec=dec, T=T) -> torch.Tensor:
                    decoders.FLAT_PREFILL_MAX = T  # the pass at any length
                    try:
                        return dec.prefill(prompts)
                    finally:
                        decoders.FLAT_PREFILL_MAX = limit

                def sdpa(prompts=prompts, dec=dec) -> torch.Tensor:
                    decoders.FLAT_PREFILL_MAX = 0
                    try:
                        return dec.prefill(prompts)
                    finally:
                        decoders.FLAT_PREFILL_MAX = limit

                with torch.inference_mode():
                    diff = (one_pass() - sdpa()).abs().max().item()
                    n = max(3, 20_000 // (T * P * (1 if name == "2x64" else 30)))
                    a, b = [], []
                    for _ in range(rounds):
                        a.append(per_call(one_pass, n))
                        b.append(per_call(sdpa, n))
                ka, kb = statistics.median(a), statistics.median(b)
                print(f"{name}, {P} prompt(s) of {T:4d} tokens: one kernel pass {ka:9.0f} µs | SDPA {kb:9.0f} µs | "
                      f"{kb / ka:4.2f}x | max diff {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
