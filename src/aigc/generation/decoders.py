"""Decoders: the model side of the engine, a batch of rows with a state that grows token by token.

A decoder holds the per-row state (a preallocated KV cache for GPT, the carried (h, c) for the
LSTM) and offers four operations, all on token ids:

  prefill(prompts)            -> logits (B, V) after each prompt; allocates the state for B rows
  step(tokens, positions)     -> logits (B, V) for one new token per row at its own position
  reorder(index)              row i becomes a copy of row index[i] (beam search, dropping rows)
  max_len                     the context length (None: unbounded, recurrent)
  refill(row, tokens)         optional: run `tokens` again as row `row`'s whole context (slots
                              0..len-1), -> logits (V,); the engine slides a full context with it

`GPTDecoder` also lets rows join and leave a running batch without copying the others' caches
(`add_rows`, `drop_rows`: the serving scheduler's continuous batching).

`GPTDecoder` is the fast path for our GPT. Small-model decode is bound by per-op overhead, not
FLOPs (PERFORMANCE-NOTES.md), so it reads the model's weights into plain tensors once and runs one
step function written for a single new token: no module calls, no per-step concatenation, each row
at its own position (prompts of different lengths decode together). Its numerics are the model's:
same ops in fp32, so greedy decoding with the cache gives the tokens of full recomputation.
`dtype=torch.bfloat16` keeps bf16 weights and cache: half the bytes to read per token at 124M, where
decode is bound by weight reads (whether it pays depends on the bf16 matrix-vector kernels: on the
development box, torch 2.13 CPU at batch 1, it did not; measure with bench/bench_generate.py).
`dtype=torch.int8` is weight-only quantization: each weight matrix is stored as int8 with one bf16
scale per output row (symmetric, absmax / 127) and multiplied by `torch._weight_int8pack_mm` with
bf16 activations, the kernel gpt-fast uses. A quarter of fp32's bytes: on the development box a
pass over 94M parameters at batch 1 took 6.0 ms vs 16.0 (fp32) and 12.7 (bf16). Numerics change
(~1% relative error per matmul), so greedy text can differ from fp32 after a while; the embedding
table and the cache stay bf16. The kernel needs the input width to be a multiple of 16 (other
widths gave wrong results or crashed), so a matrix whose width is not stays bf16.
`dtype=torch.float16` is fp16 weights with fp32 activations and cache: every weight is rounded to
fp16 once (so the decoder computes what the fp32 model computes with fp16-rounded weights) and the
matrices are packed for fbgemm's fp16-weight GEMM (`fbgemm_linear_fp16_weight_fp32_activation`,
fp32 accumulation). Batch decode is bound by small-M GEMMs, and torch's fp32 GEMM costs about one
matrix-vector product per row there while fbgemm's does not: (8, 128) @ (128, 384) took 5 us vs
12 (fp32 MKL), the same at one row. Where fbgemm is missing or fails its self-check, the weights
stay fp32 (rounded through fp16, same numerics up to summation order) with a warning.

`compile=True` (fp32 or fp16 weights) runs `step` as one `torch.compile`d function (inductor, C++
wrapper): the ~100 small ops of a step become ~8 C++ kernels per layer around the GEMMs (tiny
model, batch 1: 1.3-1.6x the eager step's speed). Its shapes do not depend on the position: the new
k/v are scattered at each row's position and attention covers the first `s` cache slots with a mask
(`s` = the furthest row's position + 1 rounded up to 32, a dynamic size, as are the batch and the
cache length), so one compiled graph serves every step. The first step pays the C++ compile (14-38 s
measured on the 2 busy cores of the development box; inductor caches it on disk, later processes
took 1-4 s); a batch of one is compiled separately (torch specialises size-1 dimensions).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from aigc.errors import AigcError
from aigc.generation.attention_kernel import decode_attention_kernel
from aigc.utils.compile import can_compile

log = logging.getLogger("aigc.generation")

# prompts up to this many tokens are prefilled in one pass through the C attention kernel (see
# `GPTDecoder._prefill_and_step`), longer ones through SDPA, whose blocked kernel wins on long
# prompts (`python bench/bench_attention.py --prefill --threads 1`): 4 prompts of 128 tokens
# 1.15-1.24x SDPA's speed, of 256 tokens 0.76-0.95x; one 1024-token prompt at GPT-2 small's
# width 0.59x; one prompt alone up to 256 tokens about the same either way (0.89-1.02x)
FLAT_PREFILL_MAX = 128


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """(out, in) weight -> (int8 weight (out, in), bf16 scale (out,)); bf16 if `in` % 16 != 0."""
    if w.shape[1] % 16:
        return w.to(torch.bfloat16)
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # (out,)
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale.to(torch.bfloat16)


def int8_linear(x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """x (..., in) bf16 @ a `quantize_int8` weight -> (..., out) bf16."""
    if not isinstance(w, tuple):
        return F.linear(x, w)
    q, scale = w
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scale)  # (N, out)
    return y.view(*x.shape[:-1], q.shape[0])


@functools.cache
def fp16_gemm_available() -> bool:
    """Whether fbgemm's fp16-weight GEMM runs here and gives x @ W.half().float() (checked once).

    The API is deprecated (it still works in torch 2.13): its one-time deprecation warnings are
    consumed here, silenced, so later calls print nothing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(48, 32, generator=g), torch.randn(3, 32, generator=g)
            packed = torch.fbgemm_pack_gemm_matrix_fp16(w)
            y = torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, None)
            y2 = torch.ops._quantized.wrapped_fbgemm_linear_fp16_weight(x, packed, None, 48)
        ref = x @ w.half().float().t()
        return bool(torch.allclose(y, ref, atol=1e-4) and torch.allclose(y2, ref, atol=1e-4))
    except (RuntimeError, AttributeError) as e:  # not built with fbgemm (e.g. ARM), or removed
        log.warning("fbgemm fp16 GEMM unavailable (%s): fp16 weights run as fp32 matmuls", e)
        return False


def pack_fp16(w: torch.Tensor) -> tuple[torch.Tensor, int] | torch.Tensor:
    """(out, in) weight, already rounded to fp16 -> (fbgemm packed matrix, out), or (in, out) fp32."""
    if not fp16_gemm_available():
        return w.float().t().contiguous()  # fallback: the same fp16-rounded values in fp32
    return torch.fbgemm_pack_gemm_matrix_fp16(w.float().contiguous()), w.shape[0]


def fp16_linear(x: torch.Tensor, w: tuple[torch.Tensor, int] | torch.Tensor) -> torch.Tensor:
    """x (..., in) fp32 @ a `pack_fp16` weight -> (..., out) fp32 (fp32 accumulation)."""
    if not isinstance(w, tuple):
        return torch.matmul(x, w)
    return torch.fbgemm_linear_fp16_weight_fp32_activation(x, w[0], None)


def fp16_linear_traced(x: torch.Tensor, w: tuple[torch.Tensor, int] | torch.Tensor) -> torch.Tensor:
    """`fp16_linear` for the compiled step: the op inductor knows (shape function, fallback
    kernel); ~1 us slower per call than the eager entry point, so eager steps keep that one."""
    if not isinstance(w, tuple):
        return torch.matmul(x, w)
    return torch.ops._quantized.wrapped_fbgemm_linear_fp16_weight(x, w[0], None, w[1])


class GPTDecoder:
    """Incremental decoding of an `aigc.models.gpt.GPT` with a preallocated per-row KV cache.

    Two cheap tricks on top of the model's math, invisible outside: (1) in fp32 the q/k rows of
    each head are stored interleaved, (x1_0, x2_0, x1_1, ...) instead of (x1 | x2), so RoPE is one
    complex multiply instead of roll + 2 mul + add (attention scores are unchanged: q and k are
    permuted alike); (2) keys and values of all layers share one cache tensor, (L, B, 2K, S, D);
    (3) uncompiled float32 steps on CPU attend through a C kernel (`attention_kernel`), SDPA else.
    The kernel also writes each row's new k/v into the cache (no index_put per layer for rows at
    distinct positions) and maps query rows to cache rows, so prompts prefill in one pass (each
    token a query row on its prompt's row) and a decode step can carry joining prompts
    (`step_and_add`).
    """

    def __init__(
        self, model: torch.nn.Module, dtype: torch.dtype | None = None, compile: bool = False
    ) -> None:
        cfg = model.config
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_len: int | None = cfg.block_size
        self.H, self.K, self.D = H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        w = model.tok_emb.weight
        self.device = w.device
        self.int8 = dtype == torch.int8  # weight-only int8, bf16 activations and cache
        self.fp16 = dtype == torch.float16  # fp16 weights (fbgemm), fp32 activations and cache
        self.dtype = torch.bfloat16 if self.int8 else torch.float32 if self.fp16 else (dtype or w.dtype)
        self.complex_rope = self.dtype in (torch.float32, torch.float64)  # no complex bf16 in torch
        if compile and (self.dtype != torch.float32 or self.device.type != "cpu"):
            raise AigcError(
                f"compile is for float32 or float16 weights on CPU, not {dtype} on {self.device.type}; "
                "drop --compile or use --dtype float32 / float16"
            )
        if compile and not can_compile():
            raise AigcError(
                "compile needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile"
            )
        self.compile = compile
        self._compiled = None  # the compiled step, built at the first step
        # eager float32 steps on CPU attend through the C decode kernel when it builds here (SDPA else)
        eager_cpu_fp32 = self.dtype == torch.float32 and self.device.type == "cpu" and not compile
        self.attn_kernel = decode_attention_kernel(D) if eager_cpu_fp32 else None

        # the model's RoPE tables, whatever their layout: cos = [cos_f | cos_f], sin = [-sin_f | sin_f]
        T = cfg.block_size
        cos = model.rope_cos.detach().reshape(T, D)
        sin = model.rope_sin.detach().reshape(T, D)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)  # (T, D), rotate-half path
        self.cis = torch.complex(cos[:, : D // 2], sin[:, D // 2 :]).to(self.device)  # (T, D/2), complex path
        # row order of one q/k head in the interleaved layout: x1_0, x2_0, x1_1, x2_1, ...
        perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], dim=1).reshape(-1)

        def t(p: torch.Tensor) -> torch.Tensor:
            if self.fp16:  # every weight rounded to fp16 once: the numerics of an fp16-weight model
                return p.detach().half().float()
            return p.detach().to(self.dtype)

        def qkv_rows(p: torch.Tensor) -> torch.Tensor:
            w = t(p).view(H + 2 * K, D, -1).clone()  # (heads, D, C)
            if self.complex_rope:
                w[: H + K] = w[: H + K, perm]  # q and k heads interleaved; v heads as they are
            return w.reshape((H + 2 * K) * D, -1)

        # fp32: weights stored (in, out) contiguous, x @ W as a plain NN matmul is ~30% faster at
        # batch 1 than F.linear's x @ W^T; bf16 kernels prefer F.linear's (out, in) layout
        self.transposed = self.dtype == torch.float32 and not self.fp16
        self.mm2 = torch.mm if self.transposed else F.linear  # (B, C) or (T, C) inputs
        if self.int8:
            self.mm2 = int8_linear
        if self.fp16:
            self.mm2 = fp16_linear

        def tr(w: torch.Tensor) -> torch.Tensor:
            if self.int8:
                return quantize_int8(w.detach())
            if self.fp16:
                return pack_fp16(t(w))
            return t(w).t().contiguous() if self.transposed else t(w)

        self.emb = t(model.tok_emb.weight)
        self.layers = [
            (
                t(b.attn_norm.weight),
                tr(qkv_rows(b.attn.qkv.weight)),
                tr(b.attn.proj.weight),
                t(b.mlp_norm.weight),
                tr(b.mlp.gate_up.weight),
                tr(b.mlp.down.weight),
            )
            for b in model.blocks
        ]
        self.norm = t(model.norm.weight)
        self.head = tr(model.lm_head.weight)
        # RMSNorm of a (B, C) row as mean(x^2) = (x * x) @ (1/C): a tiny matmul is several times
        # cheaper than a reduction kernel at this size (decode is per-op-overhead bound)
        C = cfg.n_embd
        self.inv_c = torch.full((C, 1), 1.0 / C, dtype=self.dtype, device=self.device)
        self.eps_t = torch.full((1, 1), self.eps, dtype=self.dtype, device=self.device)
        # the cache, all layers in one tensor (L, B, 2K, S, D), keys then values (one input for the
        # compiled step); a caller joining batches may assign a list of per-layer (B, 2K, S, D)
        # tensors (iterating the tensor gives those): the next step stacks it again
        self.kv: torch.Tensor | list[torch.Tensor] = torch.empty(0)
        # rows joining and leaving (`add_rows`, `drop_rows`): a cache with spare rows, (L, cap, 2K,
        # S, D), of which `kv` is the first B rows; None when `kv` was set another way
        self._pool: torch.Tensor | None = None
        if compile:  # the compiled step's tables: cos/sin of the interleaved pairs, cache slot ids
            self.cos_f, self.sin_f = cos[:, D // 2 :].contiguous(), sin[:, D // 2 :].contiguous()  # (T, D/2)
            self._slot_ids: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ state

    def _alloc(self, batch: int, max_len: int) -> None:
        if self.compile:  # room past the last 32-slot bucket: attention never covers the whole cache
            max_len = -(-max_len // 32) * 32 + 32  # (the graph assumes a strided slice of it)
        shape = (len(self.layers), batch, 2 * self.K, max_len, self.D)
        # reuse the last cache when nothing outside holds it or a view of it: zeroing a fresh one
        # costs page faults (~4 ms for 8 MB at batch 8, 64 tokens' worth of steps). Its stale
        # entries are finite and a row only reads slots it wrote or slots masked to weight exactly
        # 0, so results are bitwise those of a zeroed cache.
        if isinstance(self.kv, torch.Tensor) and self.kv.shape == shape and self._cache_unshared():
            return
        self.kv, self._pool = self._mark(torch.zeros(shape, dtype=self.dtype, device=self.device)), None

    def _cache_unshared(self) -> bool:
        """No other reference to `self.kv` (refcount: the attribute + the call's argument) and no
        view of it (storage use count: the tensor + the temporary storage object)."""
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None or sys.getrefcount(self.kv) != 2:
            return False
        return use_count(self.kv.untyped_storage()._cdata) == 2

    def reorder(self, index: torch.Tensor) -> None:
        self.kv, self._pool = self._mark(self._stacked().index_select(1, index)), None

    def _stacked(self) -> torch.Tensor:
        if isinstance(self.kv, list):  # per-layer tensors from a caller that joined two batches
            self.kv, self._pool = self._mark(torch.stack(self.kv)), None
        return self.kv

    @property
    def rows(self) -> int:
        """Rows in the cache (0 before the first prefill)."""
        kv = self._stacked()
        return kv.shape[1] if kv.dim() == 5 else 0

    @torch.inference_mode()
    def add_rows(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows after the current ones -> their logits (n, V).

        Continuous batching (not for the compiled step): the cache keeps spare rows, its capacity
        doubling when full, so a join writes the new rows only. Concatenating caches copied every
        running row's: 16 rows x 4 layers x 512 slots was 33 MB per join on the 4x128 model.
        Every row's cache spans the whole context (`max_len`), so rows of any age fit together.
        """
        B = self.reserve_rows(len(prompts))
        return self._prefill_rows(prompts, B)

    @torch.inference_mode()
    def step_and_add(
        self, tokens: torch.Tensor, positions: torch.Tensor, prompts: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """`step` for the current rows and `add_rows(prompts)` in one pass -> logits (B + n, V).

        A row joins a running batch for the cost of its prompt's tokens in the step's pass (with
        the C attention kernel; else a step, then the prompts' prefill).
        """
        if self.attn_kernel is None:
            return torch.cat([self.step(tokens, positions), self.add_rows(prompts)])
        B = self.reserve_rows(len(prompts))
        return self._prefill_and_step(prompts, B, tokens, positions)

    def reserve_rows(self, n: int) -> int:
        """Make room for n rows after the current ones -> the first new row's index."""
        if self.compile:
            raise AigcError("add_rows is for uncompiled decoders; join compiled batches by concatenation")
        B = self.rows
        pool = self._pool if self._pool is not None else self.kv if B else None
        # a new pool when full, or when the rows came from a `prefill` with a shorter cache
        if pool is None or pool.shape[1] < B + n or pool.shape[3] != self.max_len:
            cap = max(B + n, 2 * pool.shape[1] if pool is not None else 0)
            shape = (len(self.layers), cap, 2 * self.K, self.max_len, self.D)
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if B:
                new[:, :B, :, : self.kv.shape[3]] = self.kv
            pool = new
        self._pool, self.kv = pool, pool[:, : B + n]
        return B

    @torch.inference_mode()
    def drop_rows(self, keep: Sequence[int]) -> list[int]:
        """Keep the rows `keep` (ascending) -> the new row order: row i is old row order[i].

        Rows past the kept count move into the freed slots below it (their caches are the only
        ones copied); the others stay where they are, so the order is not `keep`'s.
        """
        B = len(keep)
        if not self.rows:
            return []
        if self._pool is None:  # a cache set by prefill / reorder: keep it as the pool
            self._pool = self._stacked()
        kept = set(keep)
        holes = [j for j in range(B) if j not in kept]
        movers = [j for j in keep if j >= B]
        for h, m in zip(holes, movers, strict=True):  # one slice copy each: ~5 us, advanced indexing ~30
            self._pool.select(1, h).copy_(self._pool.select(1, m))
        self.kv = self._pool[:, :B]
        order = list(range(B))
        for h, m in zip(holes, movers, strict=True):
            order[h] = m
        return order

    def _mark(self, kv: torch.Tensor) -> torch.Tensor:
        """Compiled step: the cache's batch and length are dynamic sizes (see `step`)."""
        if self.compile:
            torch._dynamo.maybe_mark_dynamic(kv, [1, 3])
        return kv

    def _slots(self, s: int) -> torch.Tensor:
        """arange(s), one tensor per length, marked dynamic once."""
        t = self._slot_ids.get(s)
        if t is None:
            t = self._slot_ids[s] = torch.arange(s, device=self.device)
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, C) / sqrt(mean(x^2) + eps) * w."""
        return torch.addmm(self.eps_t, x * x, self.inv_c).rsqrt_().mul(x).mul_(w)

    def _rope_tables(self, pos: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
        """The rotation at positions `pos`, for `_rope` (looked up once per pass, not per layer)."""
        if self.complex_rope:
            return (self.cis[pos].unsqueeze(-2),)  # (..., 1, D/2) complex
        return self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)  # (..., 1, D) each

    def _rope(self, qk: torch.Tensor, rot: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Rotate q/k (..., heads, D) by the `_rope_tables` of their positions."""
        if self.complex_rope:
            z = torch.view_as_complex(qk.reshape(*qk.shape[:-1], self.D // 2, 2))  # (..., heads, D/2)
            return torch.view_as_real(z * rot[0]).flatten(-2)
        cos, sin = rot
        return qk * cos + qk.roll(self.D // 2, dims=-1) * sin

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        """Run each prompt (one row at a time: a row's numerics never depend on its neighbours)."""
        cache_len = min(max_len or self.max_len, self.max_len)
        self._alloc(len(prompts), cache_len)
        return self._prefill_rows(prompts, 0)  # (B, V)

    def _prefill_rows(self, prompts: Sequence[Sequence[int]], first: int) -> torch.Tensor:
        """Run prompt j as row first + j of the cache -> logits (n, V)."""
        return self._prefill_and_step(prompts, first)

    def _prefill_and_step(
        self,
        prompts: Sequence[Sequence[int]],
        first: int,
        tokens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefill prompt j as cache row first + j, with one decode step of rows 0..B-1 (`tokens`,
        `positions`, as in `step`; with the kernel only) in the same pass -> logits (B + n, V): the
        rows', then the prompts'.

        A prompt equal to the one before it (n samples, beams) is run once and its cache row
        copied. With the C attention kernel, prompts of up to FLAT_PREFILL_MAX tokens and the step
        run as one pass over all their tokens (`_kernel_pass`: each token a query row on its
        prompt's cache row); longer prompts, or without the kernel, one at a time through SDPA.
        """
        prompts = [list(p) for p in prompts]
        S = self._stacked().shape[3]
        if any(len(p) > S or not p for p in prompts):
            raise AigcError(f"a prompt must have 1 to {S} tokens here; shorten it")
        runs = [j for j, p in enumerate(prompts) if j == 0 or p != prompts[j - 1]]  # first of each run
        flat = [j for j in runs if self.attn_kernel is not None and len(prompts[j]) <= FLAT_PREFILL_MAX]
        long = [j for j in runs if j not in flat]
        parts = [self._prefill_row(first + j, torch.tensor(prompts[j], dtype=torch.long, device=self.device))[None]
                 for j in long]  # fmt: skip
        B = 0 if tokens is None else tokens.shape[0]
        if flat or B:  # (a step joins only with the kernel: `step_and_add`)
            ids, pos, rows = [], [], []
            if B:
                ids, pos, rows = tokens.tolist(), positions.tolist(), list(range(B))
                self._check_positions(pos, S)
            take = list(range(B))  # query rows whose logits are wanted: the step's, each prompt's last
            for j in flat:
                n = len(prompts[j])
                ids += prompts[j]
                pos += range(n)
                rows += [first + j] * n
                take.append(len(ids) - 1)
            # one tensor for all four lists (take padded to the pass's length)
            ipr = torch.tensor(
                [ids, pos, rows, take + [0] * (len(ids) - len(take))], dtype=torch.long, device=self.device
            )
            cut = None if len(take) == len(ids) else ipr[3, : len(take)]
            parts.insert(0, self._kernel_pass(ipr[0], ipr[1], self._rope_tables(ipr[1]), ipr[2], cut))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B + flat + long, V) in that order
        # each prompt's logits row in `out`; a prompt equal to the one before it copies its cache row
        at = {j: B + k for k, j in enumerate(flat)} | {j: B + len(flat) + k for k, j in enumerate(long)}
        index, src = list(range(B)), 0
        for j in range(len(prompts)):
            if j in at:
                src = j
            else:
                self.kv[:, first + j] = self.kv[:, first + src]
            index.append(at[src])
        if index != list(range(out.shape[0])):
            out = out.index_select(0, torch.tensor(index, device=self.device))
        return out.float()

    @torch.inference_mode()
    def refill(self, row: int, tokens: Sequence[int]) -> torch.Tensor:
        """Recompute one row's cache from `tokens` (its new, shorter context) -> logits (V,)."""
        return self._prefill_rows([tokens], row)[0]

    def _check_positions(self, pos: list[int], S: int) -> None:
        if min(pos) < 0 or max(pos) >= S:
            raise IndexError(f"decode positions must be in [0, {S}), not {min(pos)}..{max(pos)}")

    def _kernel_pass(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor,
        rot: tuple[torch.Tensor, ...],
        cache_rows: torch.Tensor | None = None,
        take: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass through the C attention kernel -> logits (N, V), or of the query rows `take`.

        Query row j is token idx[j] at positions[j] (rotated by `rot`) of cache row cache_rows[j]
        (row j without): the kernel writes its k/v at that slot, then attends it over the slots up
        to its own. A decode step is one query row per cache row; a prompt is one query row per
        token on its cache row (causal attention over the prompt); both can share a pass, so a row
        joining a running batch costs its tokens' share of one pass, not a pass of its own.
        """
        H, K, D = self.H, self.K, self.D
        N = idx.shape[0]
        lens = positions + 1
        y = torch.empty(N, H, D, dtype=self.dtype, device=self.device)  # every layer's output
        kvs = self._stacked()
        x = F.embedding(idx, self.emb)  # (N, C)
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            qkv = self.mm2(self._rms(x, an), qkv_w).view(N, H + 2 * K, D)  # (N, H+2K, D)
            qk = self._rope(qkv[:, : H + K], rot)  # (N, H+K, D)
            new = (qk[:, H:], qkv[:, H + K :])  # written at each query row's slot, then attended
            self.attn_kernel(qk, kvs[i], lens, y, new, cache_rows, check=i == 0, bounds=False)
            x = x + self.mm2(y.view(N, H * D), proj_w)  # (N, C)
            gate, up = self.mm2(self._rms(x, mn), gu_w).chunk(2, dim=-1)
            x = x + self.mm2(F.silu(gate) * up, down_w)
        if take is not None:
            x = x.index_select(0, take)
        return self.mm2(self._rms(x, self.norm), self.head).float()  # (N, V)

    def _prefill_row(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        """Run one prompt idx (T,) as row `row`, filling its cache slots 0..T-1 -> logits (V,).

        Written on (T, C) matrices with the step's ops (2-D matmuls, the matmul RMSNorm): a batch of
        eight prompts is prefilled row by row, so this is per-op bound as well.
        """
        T = idx.shape[0]
        H, K, D = self.H, self.K, self.D
        kvs = self._stacked()
        x = self.emb[idx]  # (T, C)
        rot = self._rope_tables(slice(0, T))
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            qkv = self.mm2(self._rms(x, an), qkv_w).view(T, H + 2 * K, D)  # (T, H+2K, D)
            qk = self._rope(qkv[:, : H + K], rot).transpose(0, 1)  # (H+K, T, D)
            q, k = qk[None, :H], qk[None, H:]  # (1, H, T, D), (1, K, T, D)
            v = qkv[:, H + K :].transpose(0, 1)[None]  # (1, K, T, D)
            kvs[i, row, :K, :T] = k[0]
            kvs[i, row, K:, :T] = v[0]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)  # (1, H, T, D)
            x = x + self.mm2(y[0].transpose(0, 1).reshape(T, H * D), proj_w)  # (T, C)
            gate, up = self.mm2(self._rms(x, mn), gu_w).chunk(2, dim=-1)
            x = x + self.mm2(F.silu(gate) * up, down_w)  # (T, C)
        x = self._rms(x[-1:], self.norm)  # (1, C): last position only
        return self.mm2(x, self.head)[0]  # (V,)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B,), positions (B,) -> logits (B, V); writes each row's k/v at its position."""
        if self.compile:
            if self._compiled is None:
                # isolate_recompiles: each decoder keeps its own graphs (all decoders share the code
                # object, so several models or dtypes in one process would otherwise add up to torch's
                # recompile limit, an error with fullgraph=True)
                self._compiled = torch.compile(
                    self._static_step, fullgraph=True, options={"cpp_wrapper": True}, isolate_recompiles=True
                )
            # batch, cache length and attended slots are marked dynamic (a symbol in the graph, not a
            # constant), so rows leaving, new requests and every position reuse one graph
            if tokens.shape[0] > 1:  # (a batch of one gets its own graph anyway)
                for t in (tokens, positions):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            kv = self._stacked()
            # attend over the slots up to the furthest row, rounded up to 32 (fewer distinct shapes)
            s = -(-(int(positions.max()) + 1) // 32) * 32
            return self._compiled(tokens, positions, self._slots(s), kv)
        B = tokens.shape[0]
        H, K, D = self.H, self.K, self.D
        pos = positions.tolist()
        p_max, same = max(pos), min(pos) == max(pos)
        S = p_max + 1  # attend over the cache up to the furthest row
        kvs = self._stacked()
        self._check_positions(pos, kvs.shape[3])
        rot = self._rope_tables(slice(p_max, p_max + 1) if same else positions)  # (1, ...) or (B, ...)
        if self.attn_kernel is not None:  # each row writes its k/v and attends its first pos + 1 slots
            return self._kernel_pass(tokens, positions, rot)
        mask, rows = None, None
        if not same:  # SDPA over S slots: mask each row's future (unwritten) slots
            rows = torch.arange(B, device=self.device)
            mask = (torch.arange(S, device=self.device)[None, :] <= positions[:, None])[
                :, None, None, :
            ]  # (B,1,1,S)
        x = F.embedding(tokens, self.emb)  # (B, C)
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            h = self._rms(x, an)
            qkv = self.mm2(h, qkv_w).view(B, H + 2 * K, D)  # (B, H+2K, D)
            qk = self._rope(qkv[:, : H + K], rot)  # (B, H+K, D)
            kv = kvs[i]
            if same:  # one position for all rows: a plain strided copy
                kv[:, :K, p_max] = qk[:, H:]
                kv[:, K:, p_max] = qkv[:, H + K :]
            else:
                kv[:, :K][rows, :, positions] = qk[:, H:]  # (B, K, D) at each row's own position
                kv[:, K:][rows, :, positions] = qkv[:, H + K :]
            y = F.scaled_dot_product_attention(
                qk[:, :H, None], kv[:, :K, :S], kv[:, K:, :S], attn_mask=mask, enable_gqa=K != H
            )  # (B, H, 1, D)
            x = x + self.mm2(y.reshape(B, H * D), proj_w)  # (B, C)
            h = self._rms(x, mn)
            gate, up = self.mm2(h, gu_w).chunk(2, dim=-1)
            x = x + self.mm2(F.silu(gate) * up, down_w)
        x = self._rms(x, self.norm)
        return self.mm2(x, self.head).float()  # (B, V)

    def _static_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kvs: torch.Tensor
    ) -> torch.Tensor:
        """`step` with shapes that do not depend on the position (fp32 activations, interleaved q/k).

        tokens, positions (B,); slots = arange(s), the cache slots to attend; kvs per layer
        (L, B, 2K, S, D), written in place at each row's position -> logits (B, V).
        """
        B, H, K, D = tokens.shape[0], self.H, self.K, self.D
        mm = fp16_linear_traced if self.fp16 else self.mm2
        visible = (slots[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, s)
        rows = torch.arange(B, device=tokens.device)
        cos, sin = self.cos_f[positions][:, None], self.sin_f[positions][:, None]  # (B, 1, D/2)
        x = self.emb[tokens]  # (B, C)
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), an, self.eps)
            qkv = mm(h, qkv_w).view(B, H + 2 * K, D)  # (B, H+2K, D)
            # RoPE on the interleaved pairs (a, b): (a cos - b sin, b cos + a sin); inductor fuses it
            a, b = qkv[:, : H + K].unflatten(-1, (D // 2, 2)).unbind(-1)  # (B, H+K, D/2) each
            qk = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)  # (B, H+K, D)
            # k/v of row b into kvs[i, b, :, positions[b]]: an index_put on the input itself (through
            # a view of it, inductor would copy the cache), (B, 2K, D)
            kvs[torch.full_like(rows, i), rows, :, positions] = torch.cat([qk[:, H:], qkv[:, H + K :]], dim=1)
            k, v = kvs[i, :, :K, : slots.shape[0]], kvs[i, :, K:, : slots.shape[0]]  # (B, K, s, D)
            # attention written out (one fused kernel here; SDPA would stay an opaque call): the
            # H/K query heads of a group share one k/v head, (B, K, H/K, D) @ (B, K, D, s)
            att = (qk[:, :H].view(B, K, H // K, D) @ k.transpose(-1, -2)) * D**-0.5  # (B, K, H/K, s)
            att = att.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            y = (att @ v).reshape(B, H * D)  # (B, C)
            x = x + mm(y, proj_w)
            h = F.rms_norm(x, (x.shape[-1],), mn, self.eps)
            gate, up = mm(h, gu_w).chunk(2, dim=-1)
            x = x + mm(F.silu(gate) * up, down_w)
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        return mm(x, self.head)  # (B, V)


class LSTMDecoder:
    """Incremental decoding of an `aigc.models.lstm.LSTMLM`: the (h, c) state is carried per row."""

    max_len: int | None = None  # recurrent: no context limit

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        device = self.model.tok_emb.weight.device
        logits, hs, cs = [], [], []
        for prompt in prompts:
            idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T)
            out, (h, c) = self.model.forward_state(idx)
            logits.append(out[0, -1])
            hs.append(h)
            cs.append(c)
        self.state = (torch.cat(hs, dim=1), torch.cat(cs, dim=1))  # (L, B, H) each
        return torch.stack(logits).float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out, self.state = self.model.forward_state(tokens[:, None], self.state)  # (B, 1, V)
        return out[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        h, c = self.state
        self.state = (h.index_select(1, index), c.index_select(1, index))


def make_decoder(model: torch.nn.Module, dtype: torch.dtype | None = None, compile: bool = False):
    """The decoder for one of our model families (by the model's class)."""
    name = type(model).__name__
    if name == "GPT":
        return GPTDecoder(model, dtype, compile=compile)
    if name == "LSTMLM":
        if dtype in (torch.int8, torch.float16):
            raise AigcError(
                f"{'int8' if dtype == torch.int8 else 'float16'} weights are for GPT models; "
                "decode this LSTM model in float32 or bfloat16"
            )
        if compile:
            raise AigcError("compile is for GPT models; drop --compile for this LSTM model")
        return LSTMDecoder(model, dtype)
    raise AigcError(f"text generation supports GPT and LSTMLM models, not {name}")
