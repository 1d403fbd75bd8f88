"""Decode-step attention: the C kernel (`aigc.generation.attention_kernel`) vs torch's SDPA.

    python bench/bench_attention.py                 # tiny GPT shapes: 4 heads x 32 dims, batch 1 / 8 / 16
    python bench/bench_attention.py --threads 1

One query per row over a (B, 2K, S, D) float32 cache, rows at different positions (SDPA gets the
boolean mask the decoder gives it), both sides on the same tensors, interleaved round by round;
medians in µs per call and the ratio. The outputs are compared first (max abs difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from aigc.generation.attention_kernel import decode_attention_kernel


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
