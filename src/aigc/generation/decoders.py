"""Decoders: the model side of the engine, a batch of rows with a state that grows token by token.

A decoder holds the per-row state (a preallocated KV cache for GPT, the carried (h, c) for the
LSTM) and offers four operations, all on token ids:

  prefill(prompts)            -> logits (B, V) after each prompt; allocates the state for B rows
  step(tokens, positions)     -> logits (B, V) for one new token per row at its own position
  reorder(index)              row i becomes a copy of row index[i] (beam search, dropping rows)
  max_len                     the context length (None: unbounded, recurrent)
  refill(row, tokens)         optional: run `tokens` again as row `row`'s whole context (slots
                              0..len-1), -> logits (V,); the engine slides a full context with it

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


class GPTDecoder:
    """Incremental decoding of an `aigc.models.gpt.GPT` with a preallocated per-row KV cache.

    Two cheap tricks on top of the model's math, invisible outside: (1) in fp32 the q/k rows of
    each head are stored interleaved, (x1_0, x2_0, x1_1, ...) instead of (x1 | x2), so RoPE is one
    complex multiply instead of roll + 2 mul + add (attention scores are unchanged: q and k are
    permuted alike); (2) keys and values share one cache tensor per layer, (B, 2K, S, D).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_len: int | None = cfg.block_size
        self.H, self.K, self.D = H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        w = model.tok_emb.weight
        self.device = w.device
        self.int8 = dtype == torch.int8  # weight-only int8, bf16 activations and cache
        self.dtype = torch.bfloat16 if self.int8 else (dtype or w.dtype)
        self.complex_rope = self.dtype in (torch.float32, torch.float64)  # no complex bf16 in torch

        # the model's RoPE tables, whatever their layout: cos = [cos_f | cos_f], sin = [-sin_f | sin_f]
        T = cfg.block_size
        cos = model.rope_cos.detach().reshape(T, D)
        sin = model.rope_sin.detach().reshape(T, D)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)  # (T, D), rotate-half path
        self.cis = torch.complex(cos[:, : D // 2], sin[:, D // 2 :]).to(self.device)  # (T, D/2), complex path
        # row order of one q/k head in the interleaved layout: x1_0, x2_0, x1_1, x2_1, ...
        perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], dim=1).reshape(-1)

        def t(p: torch.Tensor) -> torch.Tensor:
            return p.detach().to(self.dtype)

        def qkv_rows(p: torch.Tensor) -> torch.Tensor:
            w = t(p).view(H + 2 * K, D, -1).clone()  # (heads, D, C)
            if self.complex_rope:
                w[: H + K] = w[: H + K, perm]  # q and k heads interleaved; v heads as they are
            return w.reshape((H + 2 * K) * D, -1)

        # fp32: weights stored (in, out) contiguous, x @ W as a plain NN matmul is ~30% faster at
        # batch 1 than F.linear's x @ W^T; bf16 kernels prefer F.linear's (out, in) layout
        self.transposed = self.dtype == torch.float32
        self.mm2 = torch.mm if self.transposed else F.linear  # (B, C) inputs, decode step
        self.mm3 = torch.matmul if self.transposed else F.linear  # (1, T, C) inputs, prefill
        if self.int8:
            self.mm2 = self.mm3 = int8_linear

        def tr(w: torch.Tensor) -> torch.Tensor:
            if self.int8:
                return quantize_int8(w.detach())
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
        self.kv: list[torch.Tensor] = []  # per layer (B, 2K, S, D): keys then values

    # ------------------------------------------------------------------ state

    def _alloc(self, batch: int, max_len: int) -> None:
        shape = (batch, 2 * self.K, max_len, self.D)
        self.kv = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]

    def reorder(self, index: torch.Tensor) -> None:
        self.kv = [kv.index_select(0, index) for kv in self.kv]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, C) / sqrt(mean(x^2) + eps) * w."""
        return torch.addmm(self.eps_t, x * x, self.inv_c).rsqrt_().mul(x).mul_(w)

    def _rope(self, qk: torch.Tensor, pos: torch.Tensor | slice) -> torch.Tensor:
        """Rotate q/k (..., heads, D) by position; `pos` indexes the tables to (..., 1, D)."""
        if self.complex_rope:
            z = torch.view_as_complex(qk.reshape(*qk.shape[:-1], self.D // 2, 2))  # (..., heads, D/2)
            return torch.view_as_real(z * self.cis[pos].unsqueeze(-2)).flatten(-2)
        cos, sin = self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)
        return qk * cos + qk.roll(self.D // 2, dims=-1) * sin

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        """Run each prompt (one row at a time: a row's numerics never depend on its neighbours)."""
        cache_len = min(max_len or self.max_len, self.max_len)
        self._alloc(len(prompts), cache_len)
        out = []
        last: tuple[list[int], torch.Tensor] | None = None
        for row, prompt in enumerate(prompts):
            if last is not None and last[0] == list(prompt):  # n samples / beams: same prompt, copy
                for kv in self.kv:
                    kv[row] = kv[row - 1]
                out.append(last[1])
                continue
            logits = self._prefill_row(row, torch.tensor(prompt, dtype=torch.long, device=self.device))
            out.append(logits)
            last = (list(prompt), logits)
        return torch.stack(out).float()  # (B, V)

    @torch.inference_mode()
    def refill(self, row: int, tokens: Sequence[int]) -> torch.Tensor:
        """Recompute one row's cache from `tokens` (its new, shorter context) -> logits (V,)."""
        idx = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        return self._prefill_row(row, idx).float()

    def _prefill_row(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[0]
        H, K, D = self.H, self.K, self.D
        x = self.emb[idx][None]  # (1, T, C)
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), an, self.eps)
            qkv = self.mm3(h, qkv_w).view(1, T, H + 2 * K, D)  # (1, T, H+2K, D)
            qk = self._rope(qkv[:, :, : H + K], slice(0, T))  # (1, T, H+K, D)
            q, k = qk.transpose(1, 2).split([H, K], dim=1)  # (1, H, T, D), (1, K, T, D)
            v = qkv[:, :, H + K :].transpose(1, 2)  # (1, K, T, D)
            self.kv[i][row, :K, :T] = k[0]
            self.kv[i][row, K:, :T] = v[0]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)  # (1, H, T, D)
            x = x + self.mm3(y.transpose(1, 2).reshape(1, T, H * D), proj_w)
            h = F.rms_norm(x, (x.shape[-1],), mn, self.eps)
            gate, up = self.mm3(h, gu_w).chunk(2, dim=-1)
            x = x + self.mm3(F.silu(gate) * up, down_w)  # (1, T, C)
        x = F.rms_norm(x[:, -1], (x.shape[-1],), self.norm, self.eps)  # (1, C): last position only
        return self.mm3(x, self.head)[0]  # (V,)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B,), positions (B,) -> logits (B, V); writes each row's k/v at its position."""
        B = tokens.shape[0]
        H, K, D = self.H, self.K, self.D
        pos = positions.tolist()
        p_max, same = max(pos), min(pos) == max(pos)
        S = p_max + 1  # attend over the cache up to the furthest row
        mask, rows = None, None
        if not same:  # rows at different positions: mask each row's future (unwritten) slots
            mask = (torch.arange(S, device=self.device)[None, :] <= positions[:, None])[
                :, None, None, :
            ]  # (B,1,1,S)
            rows = torch.arange(B, device=self.device)
        at = slice(p_max, p_max + 1) if same else positions  # table index: (1, ...) or (B, ...)
        x = F.embedding(tokens, self.emb)  # (B, C)
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            h = self._rms(x, an)
            qkv = self.mm2(h, qkv_w).view(B, H + 2 * K, D)  # (B, H+2K, D)
            qk = self._rope(qkv[:, : H + K], at)  # (B, H+K, D)
            kv = self.kv[i]
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


def make_decoder(model: torch.nn.Module, dtype: torch.dtype | None = None):
    """The decoder for one of our model families (by the model's class)."""
    from aigc.errors import AigcError

    name = type(model).__name__
    if name == "GPT":
        return GPTDecoder(model, dtype)
    if name == "LSTMLM":
        if dtype == torch.int8:
            raise AigcError("int8 weights are for GPT models; decode this LSTM model in float32 or bfloat16")
        return LSTMDecoder(model, dtype)
    raise AigcError(f"text generation supports GPT and LSTMLM models, not {name}")
