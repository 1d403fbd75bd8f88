"""Decoders: the model side of the engine, a batch of rows with a state that grows token by token.

A decoder holds the per-row state (a preallocated KV cache for GPT, the carried (h, c) for the
LSTM) and offers four operations, all on token ids:

  prefill(prompts)            -> logits (B, V) after each prompt; allocates the state for B rows
  step(tokens, positions)     -> logits (B, V) for one new token per row at its own position
  reorder(index)              row i becomes a copy of row index[i] (beam search, dropping rows)
  max_len                     the context length (None: unbounded, recurrent)

`GPTDecoder` is the fast path for our GPT. Small-model decode is bound by per-op overhead, not
FLOPs (PERFORMANCE-NOTES.md), so it reads the model's weights into plain tensors once and runs one
step function written for a single new token: no module calls, no per-step concatenation, each row
at its own position (prompts of different lengths decode together). Its numerics are the model's:
same ops in fp32, so greedy decoding with the cache gives the tokens of full recomputation.
`dtype=torch.bfloat16` keeps bf16 weights and cache (decode at 124M is bound by weight reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class GPTDecoder:
    """Incremental decoding of an `aigc.models.gpt.GPT` with a preallocated per-row KV cache."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_len: int | None = cfg.block_size
        self.H, self.K, self.D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        w = model.tok_emb.weight
        self.device = w.device
        self.dtype = dtype or w.dtype

        def t(p: torch.Tensor) -> torch.Tensor:
            return p.detach().to(self.dtype)

        self.emb = t(model.tok_emb.weight)
        self.layers = [
            (
                t(b.attn_norm.weight),
                t(b.attn.qkv.weight),
                t(b.attn.proj.weight),
                t(b.mlp_norm.weight),
                t(b.mlp.gate_up.weight),
                t(b.mlp.down.weight),
            )
            for b in model.blocks
        ]
        self.norm = t(model.norm.weight)
        self.head = t(model.lm_head.weight)
        # the model's RoPE tables (cos, sign-folded sin), whatever their layout: (T, D) here
        T = cfg.block_size
        self.cos = model.rope_cos.detach().reshape(T, self.D).to(self.dtype)
        self.sin = model.rope_sin.detach().reshape(T, self.D).to(self.dtype)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    # ------------------------------------------------------------------ state

    def _alloc(self, batch: int, max_len: int) -> None:
        shape = (batch, self.K, max_len, self.D)
        n = len(self.layers)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]

    def reorder(self, index: torch.Tensor) -> None:
        self.k_cache = [k.index_select(0, index) for k in self.k_cache]
        self.v_cache = [v.index_select(0, index) for v in self.v_cache]

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
                for k, v in zip(self.k_cache, self.v_cache):
                    k[row], v[row] = k[row - 1], v[row - 1]
                out.append(last[1])
                continue
            logits = self._prefill_row(row, torch.tensor(prompt, dtype=torch.long, device=self.device))
            out.append(logits)
            last = (list(prompt), logits)
        return torch.stack(out).float()  # (B, V)

    def _prefill_row(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[0]
        H, K, D = self.H, self.K, self.D
        x = self.emb[idx][None]  # (1, T, C)
        cos, sin = self.cos[:T, None], self.sin[:T, None]  # (T, 1, D): broadcast over heads
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), an, self.eps)
            qkv = F.linear(h, qkv_w).view(1, T, H + 2 * K, D)  # (1, T, H+2K, D)
            qk = qkv[:, :, : H + K] * cos + qkv[:, :, : H + K].roll(D // 2, dims=-1) * sin
            q, k = qk.transpose(1, 2).split([H, K], dim=1)  # (1, H, T, D), (1, K, T, D)
            v = qkv[:, :, H + K :].transpose(1, 2)  # (1, K, T, D)
            self.k_cache[i][row, :, :T] = k[0]
            self.v_cache[i][row, :, :T] = v[0]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)  # (1, H, T, D)
            x = x + F.linear(y.transpose(1, 2).reshape(1, T, H * D), proj_w)
            h = F.rms_norm(x, (x.shape[-1],), mn, self.eps)
            gate, up = F.linear(h, gu_w).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w)  # (1, T, C)
        x = F.rms_norm(x[:, -1], (x.shape[-1],), self.norm, self.eps)  # (1, C): last position only
        return F.linear(x, self.head)[0]  # (V,)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B,), positions (B,) -> logits (B, V); writes each row's k/v at its position."""
        B = tokens.shape[0]
        H, K, D = self.H, self.K, self.D
        rows = torch.arange(B, device=self.device)
        p_max = int(positions.max())
        S = p_max + 1  # attend over the cache up to the furthest row
        mask = None
        if B > 1 and int(positions.min()) != p_max:
            mask = (torch.arange(S, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]  # (B,1,1,S)
        x = self.emb[tokens]  # (B, C)
        cos, sin = self.cos[positions, None], self.sin[positions, None]  # (B, 1, D)
        for i, (an, qkv_w, proj_w, mn, gu_w, down_w) in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), an, self.eps)
            qkv = F.linear(h, qkv_w).view(B, H + 2 * K, D)  # (B, H+2K, D)
            qk = qkv[:, : H + K] * cos + qkv[:, : H + K].roll(D // 2, dims=-1) * sin
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, positions] = qk[:, H:]  # (B, K, D) written at each row's position
            vc[rows, :, positions] = qkv[:, H + K :]
            q = qk[:, :H, None]  # (B, H, 1, D)
            y = F.scaled_dot_product_attention(q, kc[:, :, :S], vc[:, :, :S], attn_mask=mask, enable_gqa=K != H)
            x = x + F.linear(y.reshape(B, H * D), proj_w)  # (B, C)
            h = F.rms_norm(x, (x.shape[-1],), mn, self.eps)
            gate, up = F.linear(h, gu_w).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w)
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        return F.linear(x, self.head).float()  # (B, V)


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
        return LSTMDecoder(model, dtype)
    raise AigcError(f"text generation supports GPT and LSTMLM models, not {name}")
