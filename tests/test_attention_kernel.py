"""The C decode-attention kernel against torch's SDPA (the oracle), and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigc.generation import attention_kernel
from aigc.generation.attention_kernel import decode_attention_kernel
from aigc.generation.decoders import GPTDecoder
from aigc.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(
    decode_attention_kernel(32) is None, reason="no C compiler to build the kernel"
)


def _sdpa(qk, kv, lens, H):
    """Each row's query against its first lens[b] slots, through F.scaled_dot_product_attention."""
    K = kv.shape[1] // 2
    out = []
    for b in range(qk.shape[0]):
        n = int(lens[b])
        q = qk[b : b + 1, :H, None]  # (1, H, 1, D)
        y = F.scaled_dot_product_attention(q, kv[b : b + 1, :K, :n], kv[b : b + 1, K:, :n], enable_gqa=K != H)
        out.append(y[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize(
    "B,H,K,D,S",
    [(1, 4, 4, 32, 40), (8, 4, 4, 32, 300), (3, 8, 2, 16, 17), (2, 6, 3, 64, 260), (5, 2, 1, 8, 1)],
)
def test_kernel_equals_sdpa(B, H, K, D, S):
    fn = decode_attention_kernel(D)
    g = torch.Generator().manual_seed(B * 100 + S)
    qk = torch.randn(B, H + 2 * K, D, generator=g) * 3  # large scores: the softmax's max matters
    kv = torch.randn(B, 2 * K, S, D, generator=g)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    lens[0] = S  # one row over the whole cache (several online-softmax blocks when S > 128)
    out = torch.empty(B, H, D)
    fn(qk, kv, lens, out)
    torch.testing.assert_close(out, _sdpa(qk, kv, lens, H), atol=2e-6, rtol=2e-5)


def test_kernel_refuses_layouts_it_cannot_read():
    fn = decode_attention_kernel(32)
    qk, kv, lens, out = (
        torch.randn(2, 12, 32),
        torch.randn(2, 8, 10, 32),
        torch.tensor([3, 4]),
        torch.empty(2, 4, 32),
    )
    with pytest.raises(ValueError, match="contiguous"):
        fn(qk, kv[:, :, :5], lens, out)
    with pytest.raises(ValueError, match="float32"):
        fn(qk.double(), kv.double(), lens, out.double())
    with pytest.raises(ValueError, match="int64"):
        fn(qk, kv, lens.int(), out)


def test_decoder_steps_equal_with_and_without_the_kernel():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    fast, ref = GPTDecoder(model), GPTDecoder(model)
    ref.attn_kernel = None  # the SDPA path
    assert fast.attn_kernel is not None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]  # rows at different positions
    torch.testing.assert_close(fast.prefill(prompts, 32), ref.prefill(prompts, 32))
    positions = torch.tensor([3, 5, 1])
    for _ in range(20):
        tokens = torch.randint(0, 40, (3,))
        torch.testing.assert_close(
            fast.step(tokens, positions), ref.step(tokens, positions), atol=1e-5, rtol=1e-5
        )
        positions = positions + 1


def test_no_kernel_without_a_compiler_or_when_disabled(monkeypatch, tmp_path):
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.setenv("AIGC_NO_KERNELS", "1")
    assert decode_attention_kernel(32) is None
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.delenv("AIGC_NO_KERNELS")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    assert decode_attention_kernel(32) is None
    model = GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    assert GPTDecoder(model).attn_kernel is None  # and the decoder attends through SDPA


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with caplog.at_level("WARNING"):
        assert decode_attention_kernel(24) is None
    assert "no such thing" in caplog.text and not list((tmp_path / "aigc-home" / "kernels").glob("*.so"))


def test_kernel_writes_new_keys_and_values_then_attends_through_a_row_map():
    """`new` is written at each query row's slot (lens - 1) of its cache row `rows[b]` before any row
    attends: rows 0-2 below are one prompt's tokens on cache row 2 (causal attention over them)."""
    H, K, D, S, R = 4, 2, 16, 12, 3
    fn = decode_attention_kernel(D)
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(R, 2 * K, S, D, generator=g)
    rows = torch.tensor([2, 2, 2, 0, 1])
    lens = torch.tensor([1, 2, 3, 6, S])
    qk = torch.randn(5, H + K, D, generator=g) * 3
    v_new = torch.randn(5, K, D, generator=g)
    ref_kv = kv.clone()
    for b in range(5):
        ref_kv[rows[b], :K, lens[b] - 1] = qk[b, H:]
        ref_kv[rows[b], K:, lens[b] - 1] = v_new[b]
    out = torch.empty(5, H, D)
    fn(qk, kv, lens, out, (qk[:, H:], v_new), rows)
    assert torch.equal(kv, ref_kv)
    torch.testing.assert_close(out, _sdpa(qk, ref_kv[rows], lens, H), atol=2e-6, rtol=2e-5)


def test_kernel_refuses_slots_and_rows_outside_the_cache():
    fn = decode_attention_kernel(16)
    qk, kv, out = torch.randn(2, 6, 16), torch.randn(2, 4, 8, 16), torch.empty(2, 4, 16)
    new = (qk[:, 4:], torch.randn(2, 2, 16))
    with pytest.raises(ValueError, match=r"lens must be in \[1, 8\]"):
        fn(qk, kv, torch.tensor([3, 9]), out, new)
    with pytest.raises(ValueError, match=r"lens must be in \[1, 8\]"):
        fn(qk, kv, torch.tensor([0, 2]), out, new)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 2\)"):
        fn(qk, kv, torch.tensor([3, 2]), out, new, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="new k/v"):
        fn(qk, kv, torch.tensor([3, 2]), out, (qk[:, 3:], new[1]))


def test_a_step_and_joining_prompts_in_one_pass_equal_a_step_then_add_rows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    one, two, sdpa = GPTDecoder(model), GPTDecoder(model), GPTDecoder(model)
    sdpa.attn_kernel = None  # its step_and_add falls back to a step, then add_rows
    running = [[1, 2, 3], [4, 5, 6, 7, 8]]
    joining = [[9, 10], [11, 12, 13, 14], [11, 12, 13, 14]]  # the last two: one prompt, n = 2
    tokens, positions = torch.tensor([20, 21]), torch.tensor([3, 5])
    for d in (one, two, sdpa):
        d.add_rows(running)
    fused = one.step_and_add(tokens, positions, joining)
    apart = torch.cat([two.step(tokens, positions), two.add_rows(joining)])
    torch.testing.assert_close(fused, apart, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.step_and_add(tokens, positions, joining), apart, atol=1e-5, rtol=1e-5)
    positions = torch.tensor([4, 6, 2, 4, 4])
    for _ in range(5):  # the caches agree: every row steps on alike
        tokens = torch.randint(0, 40, (5,))
        torch.testing.assert_close(
            one.step(tokens, positions), two.step(tokens, positions), atol=1e-5, rtol=1e-5
        )
        positions = positions + 1
