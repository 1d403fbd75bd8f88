"""GPT: a decoder-only Transformer language model, Llama-shaped.

References: Radford et al. 2019 (GPT-2) via karpathy/nanoGPT `model.py` for the layout; Touvron et
al. 2023 (LLaMA) for the modern parts that train better per CPU-second: rotary position embeddings
(RoPE, Su et al. 2021, in the "rotate-half" convention Hugging Face Llama uses), RMSNorm (Zhang &
Sennrich 2019), a SwiGLU MLP (Shazeer 2020), no biases, optional tied embeddings and grouped-query
attention (GQA, Ainslie et al. 2023). Because the shapes and conventions match Llama exactly, a
trained model exports to `transformers.LlamaForCausalLM` with the weights only renamed and split
(see `aigc/export.py`).

At small sizes a CPU step is dominated by per-op overhead, not FLOPs, so the block is written to
launch few ops: one fused QKV projection, one fused gate+up projection, RoPE applied to q and k in
one go with precomputed cos/sin buffers, and `F.scaled_dot_product_attention` with `is_causal`.

Notation (shape comments): B batch, T new tokens, S attended tokens (cache + new), C n_embd,
H query heads, K key/value heads, D head_dim = C // H, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- building blocks


def rope_tables(block_size: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables for RoPE, each (block_size, D).

    HF Llama rotates as `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)` and
    `cos = cat(cos_f, cos_f)`. Since `roll(x, D/2) = cat(x2, x1)`, folding the minus sign into the
    first half of sin gives the same result with one roll instead of slice + neg + cat.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (D/2)
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
    cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)  # (T, D)
    sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)  # (T, D), sign folded in
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by position; cos/sin are (T, D) in x's dtype."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    start_pos: int,
    dropout: float,
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v for q (B, H, T, D) and k, v (B, K, S, D) -> (B, H, T, D).

    `mask` (T, S) is True where query i (at position start_pos + i) may see key j, or None when
    every key is visible (a single new token). Two paths, picked by measurement on a 2-core Zen 5:
    - fp32 (and anything not bf16): `F.scaled_dot_product_attention`, fastest there.
    - bf16 on CPU: PyTorch's CPU flash kernel is 2-4x slower in bf16 than in fp32 (fwd+bwd at
      12x4x64x32: 3.0 ms vs 0.8 ms), while plain bf16 matmuls + softmax take 0.7 ms (13.8 ms vs
      27 ms at 12x6x256x64). Softmax then runs on bf16 inputs (accumulating in fp32 inside).
    """
    H, K = q.shape[1], k.shape[1]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        if K != H:  # grouped-query attention: each key/value head serves H/K query heads
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
        B, _, T, D = q.shape
        S = k.shape[2]
        # scale and mask inside the matmul: baddbmm(bias, q, k^T, alpha) is one kernel where
        # matmul + where + mul were three (and their backward passes): ~25% less attention time
        if mask is None:
            bias = q.new_zeros(1, T, S)
        else:
            bias = torch.zeros(1, T, S, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        att = torch.baddbmm(
            bias.expand(B * H, T, S),
            q.reshape(B * H, T, D),
            k.reshape(B * H, S, D).transpose(1, 2),
            alpha=D**-0.5,
        ).softmax(dim=-1)  # (B*H, T, S)
        if dropout:
            att = F.dropout(att, dropout, training=True)
        return (att @ v.reshape(B * H, S, D)).view(B, H, T, D)
    # is_causal aligns the mask top-left, which is right only when nothing is cached before the
    # block (start_pos == 0); after a prefix the block needs the explicit bottom-right mask
    causal = start_pos == 0 and mask is not None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else mask, dropout_p=dropout, is_causal=causal, enable_gqa=K != H
    )


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # one matmul for q, k and v: rows are [q heads | k heads | v heads], each head_dim wide
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, H + 2 * K, self.head_dim).transpose(1, 2)  # (B, H+2K, T, D)
        # q and k rotated in one go; the result is contiguous, so q and k need no copy later
        q, k = apply_rope(qkv[:, : H + K], cos, sin).split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        v = qkv[:, H + K :]  # (B, K, T, D)

        if cache is not None:
            # write the new keys/values in place, then attend over everything up to the new block
            k_cache, v_cache = cache  # (B, K, max_T, D) each
            end = start_pos + T
            k_cache[:B, :, start_pos:end] = k
            v_cache[:B, :, start_pos:end] = v
            k, v = k_cache[:B, :, :end], v_cache[:B, :, :end]  # (B, K, S, D)
        y = attention(q, k, v, mask, start_pos, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)  # (B, T, C)
        return self.proj(y)


class SwiGLU(nn.Module):
    """MLP with a gated linear unit: down(silu(gate(x)) * up(x)); gate and up in one matmul."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.hidden_dim, bias=False)  # rows [gate | up]
        self.down = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down(F.silu(gate) * up)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, cache=None, start_pos: int = 0) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), cos, sin, mask, cache, start_pos)
        m_in = x + (F.dropout(a, self.dropout, self.training) if self.dropout else a)
        m = self.mlp(self.mlp_norm(m_in))
        return m_in + (F.dropout(m, self.dropout, self.training) if self.dropout else m)


# ----------------------------------------------------------------------------- config


@dataclass
class GPTConfig:
    """Shape of a GPT. `vocab_size = 0` means "fill from the data" (presets); a model needs > 0."""

    vocab_size: int = 0
    block_size: int = 256  # context length (max positions)
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None = n_head (plain multi-head attention); fewer = GQA
    n_embd: int = 384
    mlp_hidden: int | None = None  # None = Llama rule: 2/3 * 4 * n_embd rounded up to a multiple of 32
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        checks = [
            (
                self.vocab_size >= 0,
                f"vocab_size must be >= 0 (0 = fill from the data), got {self.vocab_size}",
            ),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}"),
            (self.n_head >= 1, f"n_head must be >= 1, got {self.n_head}"),
            (self.n_embd >= 1, f"n_embd must be >= 1, got {self.n_embd}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
            (self.init_std > 0, f"init_std must be > 0, got {self.init_std}"),
            (
                self.mlp_hidden is None or self.mlp_hidden >= 1,
                f"mlp_hidden must be >= 1, got {self.mlp_hidden}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. n_head in {[h for h in range(1, 17) if self.n_embd % h == 0]}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = n_embd / n_head = {self.head_dim} must be even for rotary embeddings; "
                "change n_embd or n_head"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); "
                "use None for plain multi-head attention"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 32 * math.ceil(int(2 * 4 * self.n_embd / 3) / 32)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys/values for incremental decoding: per layer (B, K, max_len, D).

    `GPT.forward(idx, kv_cache=cache, start_pos=p)` writes the new keys/values at [p, p+T) in place
    (no per-step concatenation) and attends over [0, p+T). All rows share one position; a batch
    smaller than the cache's uses its first rows.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len or cfg.block_size
        if self.max_len > cfg.block_size:
            raise ValueError(f"KV cache max_len {self.max_len} exceeds block_size {cfg.block_size}")
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.batch_size = batch_size
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size is 0: set it from the tokenizer before building the model")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix for input and output tokens
        cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_theta)
        # not persistent: recomputed from the config, so never in a checkpoint
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)  # (T, T): query i sees keys <= i
        self.apply(self._init_weights)
        # GPT-2 init: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for block in self.blocks:
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy vs targets or None).

        With `kv_cache`, idx holds the tokens at positions [start_pos, start_pos + T) and earlier
        positions come from the cache. Targets equal to -1 are ignored in the loss.
        """
        B, T = idx.shape
        end = start_pos + T
        if end > self.config.block_size:
            raise ValueError(
                f"sequence reaches position {end} but block_size is {self.config.block_size}; crop the context"
            )
        if kv_cache is not None and (end > kv_cache.max_len or kv_cache.batch_size < B):
            raise ValueError(
                f"batch {B} up to position {end} does not fit the KV cache "
                f"({kv_cache.batch_size} rows, {kv_cache.max_len} positions)"
            )
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.dropout:
            x = F.dropout(x, self.config.dropout, self.training)
        # positions [start_pos, end); cast once so q/k keep their (autocast) dtype
        dtype = self.blocks[0].attn.qkv.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        cos = self.rope_cos[start_pos:end].to(dtype)  # (T, D)
        sin = self.rope_sin[start_pos:end].to(dtype)
        # (T, S) visibility of keys for the new queries; one new token sees all of them
        mask = self.causal_mask[start_pos:end, :end] if T > 1 else None
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, kv_cache.layer(i) if kv_cache is not None else None, start_pos)
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def make_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A KV cache on this model's device, in its weights' dtype unless told otherwise."""
        w = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=dtype or w.dtype)

    def num_params(self) -> int:
        """Number of parameters (a tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) at full context, as in the PaLM paper.

        6 * (weights used in matmuls, i.e. all but the embedding lookup and norms) plus attention:
        QK^T and AV cost 2 * 2 * T * C forward per layer, tripled for forward + backward.
        """
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


__all__ = ["GPT", "GPTConfig", "KVCache", "RMSNorm", "apply_rope", "rope_tables"]
