"""GPT model: config checks, attention and RoPE oracles, KV cache equivalence, training sanity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aigc.config import ConfigError, from_dict, list_presets, load_preset
from aigc.errors import AigcError
from aigc.models import MODELS, build_model
from aigc.models.gpt import GPT, GPTConfig, KVCache, apply_rope, attention, rope_tables

V = 37


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def reference_attention(q, k, v, start_pos=0):
    """softmax(q k^T / sqrt(D) + causal mask) v, written out; k/v repeated for GQA."""
    H, K, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    qpos = torch.arange(T)[:, None] + start_pos
    visible = torch.arange(S)[None, :] <= qpos
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_embd=36, n_head=4), "must be even"),
        (dict(n_head=4, n_kv_head=3), "must divide n_head"),
        (dict(dropout=1.0), "dropout"),
        (dict(block_size=0), "block_size"),
        (dict(vocab_size=-1), "vocab_size"),
    ],
)
def test_config_rejects_bad_shapes(kw, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{"n_embd": 32, "n_head": 4, **kw})
    # through the strict config loader the same check becomes a user-facing ConfigError
    with pytest.raises(ConfigError, match=words):
        from_dict(GPTConfig, {"n_embd": 32, "n_head": 4, **kw})


def test_vocab_zero_is_a_placeholder_not_a_model():
    cfg = GPTConfig(vocab_size=0)  # presets leave it to the data
    with pytest.raises(ValueError, match="vocab_size is 0"):
        GPT(cfg)
    with pytest.raises(AigcError, match="vocab_size is 0"):
        build_model("gpt", {"vocab_size": 0})


def test_build_model_errors():
    with pytest.raises(AigcError, match="valid families: .*gpt.*lstm"):
        build_model("transformer-xl", {})
    with pytest.raises(ConfigError, match="unknown config key model.n_layers"):
        build_model("gpt", {"vocab_size": 10, "n_layers": 2})
    m = build_model("gpt", {"vocab_size": 10, "n_layer": 1, "n_head": 2, "n_embd": 16})
    assert isinstance(m, GPT) and m.config.n_layer == 1
    assert MODELS["gpt"] == (GPTConfig, GPT)


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_presets_parse_and_build(family):
    names = list_presets(family)
    assert {"tiny", "small", "base"} <= set(names)
    for name in names:
        model_table = load_preset(family, name)["model"]
        cfg = from_dict(MODELS[family][0], model_table)
        assert cfg.vocab_size == 0  # filled from the data at train time
    model = build_model(family, {**load_preset(family, "tiny")["model"], "vocab_size": 11})
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, 11)


def test_mlp_hidden_default_follows_llama_rule():
    assert GPTConfig(n_embd=128, n_head=4).hidden_dim == 352  # 2/3 * 512 = 341 -> multiple of 32
    assert GPTConfig(n_embd=384, n_head=6).hidden_dim == 1024
    assert GPTConfig(n_embd=64, n_head=4, mlp_hidden=100).hidden_dim == 100


# ----------------------------------------------------------------------------- building blocks


def test_rope_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, T, D, theta = 2, 3, 10, 8, 500.0
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    cos, sin = rope_tables(T, D, theta)
    # HF's tables: cos/sin of cat(freqs, freqs), unsigned
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv_freq)] * 2, dim=-1)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("start_pos, T", [(0, 7), (5, 3), (6, 1)])
def test_attention_matches_reference_and_sdpa(heads, start_pos, T):
    torch.manual_seed(0)
    H, K = heads
    B, D, S = 2, 8, start_pos + T
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[start_pos:S, :S] if T > 1 else None
    ref = reference_attention(q, k, v, start_pos)
    ours = attention(q, k, v, mask, start_pos, 0.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # oracle: SDPA with an explicit boolean mask and repeated heads
    kr, vr = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)
    # the bf16 path (explicit matmuls) agrees to bf16 precision
    bf = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, start_pos, 0.0)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), ref, atol=3e-2, rtol=3e-2)


def test_rmsnorm_matches_formula():
    m = tiny()
    norm = m.blocks[0].attn_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), ref)


# ----------------------------------------------------------------------------- the model


def test_forward_shapes_loss_and_ignore_index():
    m = tiny()
    idx = torch.randint(0, V, (3, 12))
    logits, loss = m(idx)
    assert logits.shape == (3, 12, V) and loss is None
    targets = torch.randint(0, V, (3, 12))
    targets[:, :4] = -1
    _, loss = m(idx, targets)
    ref = F.cross_entropy(logits[:, 4:].reshape(-1, V), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert abs(loss.item() - math.log(V)) < 0.5  # small init -> near-uniform predictions


def test_causal_future_tokens_do_not_change_the_past():
    m = tiny()
    a = torch.randint(0, V, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % V
    la, lb = m(a)[0], m(b)[0]
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_too_long_sequence_is_refused():
    m = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size is 8"):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_params_and_flops(tie):
    m = tiny(tie_embeddings=tie)
    assert (m.lm_head.weight is m.tok_emb.weight) == tie
    c = m.config
    per_layer = 32 * (4 + 2 * 4) * 8 + 32 * 32 + 3 * 32 * c.hidden_dim + 2 * 32
    expected = V * 32 * (1 if tie else 2) + 2 * per_layer + 32
    assert m.num_params() == expected
    matmul = 2 * (32 * 96 + 32 * 32 + 3 * 32 * c.hidden_dim) + V * 32
    assert m.flops_per_token() == 6 * matmul + 12 * 2 * 32 * 32
    assert not any("rope" in k or "causal" in k for k in m.state_dict())  # buffers are derived


def test_residual_projections_have_scaled_init():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=8, n_head=4, n_embd=128))
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert m.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_kv_cache_decode_equals_full_forward(n_kv_head):
    m = tiny(n_kv_head=n_kv_head)
    idx = torch.randint(0, V, (2, 20))
    full, _ = m(idx)  # (2, 20, V)
    cache = m.make_cache(batch_size=2)
    with torch.no_grad():
        # prefill 8, then a block of 5 (start_pos > 0, T > 1), then one token at a time
        parts = [m(idx[:, :8], kv_cache=cache)[0], m(idx[:, 8:13], kv_cache=cache, start_pos=8)[0]]
        for t in range(13, 20):
            parts.append(m(idx[:, t : t + 1], kv_cache=cache, start_pos=t)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_smaller_batch_and_limits():
    m = tiny()
    cache = KVCache(m.config, batch_size=4, max_len=10)
    assert cache.k[0].shape == (4, 4, 10, 8) and len(cache.v) == 2
    idx = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        logits = m(idx, kv_cache=cache)[0]
    torch.testing.assert_close(logits, m(idx)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"does not fit the KV cache \(4 rows, 10 positions\)"):
        m(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache, start_pos=6)
    with pytest.raises(ValueError, match="batch 5 up to position 1 does not fit"):
        m(torch.zeros(5, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        KVCache(m.config, batch_size=1, max_len=64)


def test_bf16_autocast_close_to_fp32_and_backward_works():
    m = tiny()
    idx = torch.randint(0, V, (2, 16))
    ref, _ = m(idx)
    m.train()
    with torch.autocast("cpu", torch.bfloat16):
        logits, loss = m(idx, idx)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref, atol=5e-2, rtol=5e-2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_dropout_only_in_training():
    m = tiny(dropout=0.5)
    idx = torch.randint(0, V, (1, 8))
    torch.testing.assert_close(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.allclose(m(idx)[0], m(idx)[0])


def test_learns_a_repeating_sequence():
    m = tiny().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    seq = torch.arange(17) % 5  # 0 1 2 3 4 0 1 ...
    x, y = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    first = None
    for _ in range(40):
        _, loss = m(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.1
