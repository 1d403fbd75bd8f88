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
