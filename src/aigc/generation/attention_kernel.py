"""Decode-step attention in C: one query per row over the KV cache (`decode_attention.c`).

At a decode step every row attends with a single query, a batched matrix-vector product over its
cache. torch's SDPA spends most of such a call in setup (its CPU flash kernel is tiled for long
queries): on this CPU, batch 8 of 4 heads x 136 slots x 32 dims took 37-46 µs per layer, the C loop
here 16 µs, close to what reading the cache from L3 costs. The kernel also writes the step's new
keys and values into the cache (in torch: two index_puts per layer for rows at distinct positions,
~11 µs a step on the tiny GPT at 16 rows) and maps query rows to cache rows: a prompt's tokens
on one cache row, at positions 0..T-1, are causal attention, so prompts and a decode step share
one pass. The kernel is built at first use with the
system C compiler for this machine and one head size, cached under `$AIGC_HOME/kernels/` by a hash
of source, flags, compiler and CPU, and called through ctypes (which releases the GIL).

`decode_attention_kernel(D)` gives the callable or None (no C compiler, a build failure, or
`AIGC_NO_KERNELS=1`); callers then use SDPA. Only our own build output is loaded back.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from aigc.utils.paths import aigc_home

log = logging.getLogger(__name__)

FLAGS = [
    "-O3", "-march=native", "-fPIC", "-shared",
    # float sums may be reassociated (vectorised dot products); no errno, traps or signed zeros
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
]  # fmt: skip
MAX_HEAD_DIM = 256

_loaded: dict[int, Callable | None] = {}


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return c
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another (a home
    directory shared between machines), so the CPU's model and flags are part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
        return "\n".join(ln for ln in first.splitlines() if ln.startswith(("model name", "flags")))
    except OSError:
        return platform.machine() + platform.processor()


def _build(cc: str, head_dim: int) -> Path:
    """The shared library for `head_dim`, compiled once per source, flags, compiler and CPU."""
    source = resources.files("aigc.generation").joinpath("decode_attention.c").read_bytes()
    flags = [*FLAGS, f"-DHEAD_DIM={head_dim}"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source + " ".join([cc, *flags, version, _cpu_id()]).encode()).hexdigest()[:16]
    lib = aigc_home() / "kernels" / f"decode_attention_d{head_dim}_{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "decode_attention.c", Path(tmp) / "out.so"
        src.write_bytes(source)
        # OpenMP when the compiler has it (rows and heads split over torch's threads), else serial
        for extra in (["-fopenmp"], []):
            cmd = [cc, *flags, *extra, str(src), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed"
            )
        os.replace(out, lib)  # atomic: a concurrent builder finds a whole file or none
    return lib


def decode_attention_kernel(head_dim: int) -> Callable | None:
    """`fn(qk, kv, lens, out, new=None, rows=None)` for float32 CPU tensors, or None when it cannot
    be built here.

    qk (B, >= H, D), its first H heads the queries of B query rows; kv (R, 2K, S, D), keys then
    values (one layer of the decoder's cache, R cache rows); lens (B,) int64, the slots each query
    row attends (its position + 1), each in [1, S]; out (B, H, D), written. Query row b uses cache
    row b, or rows[b] with `rows` (B,) int64. With `new` = (k_new, v_new), each (B, K, D) (views
    allowed: rows strided, (K, D) contiguous), every row's new key and value are first written to
    slot lens[b] - 1 of its cache row: the decode step's cache write, or, with several query rows
    on one cache row at positions 0..T-1, a prompt's causal prefill. All tensors contiguous except
    `new`. `check=False` skips the layout checks (for later calls on tensors laid out as an already
    checked call's); `bounds=False` skips checking lens and rows against the cache (~3 us of tensor
    reductions), for a caller that already did: out-of-range values would read and write outside
    the cache.
    """
    if head_dim in _loaded:
        return _loaded[head_dim]
    fn = None
    cc = _compiler()
    if os.environ.get("AIGC_NO_KERNELS") != "1" and cc is not None and 0 < head_dim <= MAX_HEAD_DIM:
        try:
            fn = _bind(ctypes.CDLL(str(_build(cc, head_dim))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("decode attention kernel not built (%s); using torch's SDPA", e)
    _loaded[head_dim] = fn
    return fn


def _check(
    qk: torch.Tensor,
    kv: torch.Tensor,
    lens: torch.Tensor,
    out: torch.Tensor,
    new: tuple[torch.Tensor, torch.Tensor] | None,
    rows: torch.Tensor | None,
) -> None:
    B, H, D = out.shape
    K = kv.shape[1] // 2
    if not (qk.is_contiguous() and kv.is_contiguous() and out.is_contiguous() and lens.is_contiguous()):
        raise ValueError("decode_attention: qk, kv, lens and out must be contiguous")
    if qk.shape[0] != B or qk.shape[1] < H or qk.shape[2] != D or kv.shape[3] != D:
        raise ValueError(
            f"decode_attention: shapes qk {tuple(qk.shape)}, kv {tuple(kv.shape)}, out {tuple(out.shape)}"
        )
    if rows is None and kv.shape[0] != B:
        raise ValueError(f"decode_attention: {B} query rows but {kv.shape[0]} cache rows (pass rows)")
    if H % K or lens.shape != (B,) or lens.dtype != torch.int64:
        raise ValueError("decode_attention: H must be a multiple of K and lens int64 (B,)")
    if rows is not None and (rows.shape != (B,) or rows.dtype != torch.int64 or not rows.is_contiguous()):
        raise ValueError("decode_attention: rows must be a contiguous int64 (B,)")
    tensors = [qk, kv, out]
    for t in new or ():
        if t.shape != (B, K, D) or t.stride(1) != D or t.stride(2) != 1:
            raise ValueError(
                f"decode_attention: new k/v must be (B, K, D) with (K, D) contiguous, not {t.shape}"
            )
        tensors.append(t)
    if not all(t.dtype == torch.float32 for t in tensors):
        raise ValueError("decode_attention: float32 tensors only")


def _check_bounds(kv: torch.Tensor, lens: torch.Tensor, rows: torch.Tensor | None) -> None:
    if len(lens) and (int(lens.min()) < 1 or int(lens.max()) > kv.shape[2]):
        raise ValueError(f"decode_attention: lens must be in [1, {kv.shape[2]}]")
    if rows is not None and len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= kv.shape[0]):
        raise ValueError(f"decode_attention: rows must be in [0, {kv.shape[0]})")


def _bind(lib: ctypes.CDLL) -> Callable:
    c = lib.aigc_decode_attention_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_float]  # fmt: skip
    c.restype = None

    def decode_attention(
        qk: torch.Tensor,
        kv: torch.Tensor,
        lens: torch.Tensor,
        out: torch.Tensor,
        new: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
        check: bool = True,
        bounds: bool = True,
    ) -> None:
        B, H, D = out.shape
        K = kv.shape[1] // 2
        # the C side trusts these: a wrong layout would read out of bounds, not raise. ~1.4 us a
        # call, so a caller making several calls on tensors of one layout (the decoder's layers)
        # checks the first only
        if check:
            _check(qk, kv, lens, out, new, rows)
        if bounds:
            _check_bounds(kv, lens, rows)
        S = kv.shape[2]
        kn = vn = None
        kn_sb = vn_sb = 0
        if new is not None:
            kn, vn, kn_sb, vn_sb = new[0].data_ptr(), new[1].data_ptr(), new[0].stride(0), new[1].stride(0)
        c(qk.data_ptr(), qk.shape[1] * D, D, kn, kn_sb, vn, vn_sb, kv.data_ptr(), kv.data_ptr() + K * S * D * 4,
          2 * K * S * D, S * D, D, None if rows is None else rows.data_ptr(), lens.data_ptr(), out.data_ptr(),
          B, H, K, D**-0.5)  # fmt: skip

    return decode_attention
