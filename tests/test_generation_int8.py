"""Weight-only int8 decoding (`GPTDecoder(model, torch.int8)`, `--dtype int8`)."""

from __future__ import annotations

import pytest
import torch

from aigc.errors import AigcError
from aigc.generation.decoders import GPTDecoder, int8_linear, make_decoder, quantize_int8
from aigc.generation.engine import Engine, Request
from aigc.generation.params import GenerationParams
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.lstm import LSTMLM, LSTMConfig


def _gpt(n_embd: int = 32, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=n_embd, **kw)).eval()


def test_quantize_int8_reconstructs_rows_within_half_a_step():
    w = torch.randn(24, 64) * 0.05
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (24,)
    deq = q.float() * scale.float()[:, None]
    # round-to-nearest: at most half a quantisation step (+ the bf16 rounding of the scale)
    assert ((deq - w).abs() <= scale.float()[:, None] * 0.5 + w.abs() * 2**-8).all()
    x = torch.randn(5, 64).bfloat16()
    ref = x.float() @ deq.t()
    got = int8_linear(x, (q, scale)).float()
    assert torch.allclose(got, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_widths_the_kernel_cannot_take_stay_bf16():
    w = torch.randn(8, 24)  # 24 is not a multiple of 16: the int8 kernel gives wrong results there
    kept = quantize_int8(w)
    assert isinstance(kept, torch.Tensor) and kept.dtype == torch.bfloat16
    x = torch.randn(3, 24).bfloat16()
    assert torch.allclose(int8_linear(x, kept).float(), x.float() @ kept.float().t(), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("n_embd", [32, 24])
def test_int8_decoder_logits_close_to_fp32_and_cache_matches_prefill(n_embd):
    model = _gpt(n_embd)
    ids = torch.randint(0, 50, (12,)).tolist()
    ref = GPTDecoder(model).prefill([ids])  # fp32
    dec = GPTDecoder(model, torch.int8)
    full = dec.prefill([ids])
    # int8 weights, bf16 activations: close to fp32, not equal
    assert (full - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    assert dec.kv[0].dtype == torch.bfloat16
    # the cached step path and a full prefill of the longer prompt agree
    dec.prefill([ids[:-1]])
    stepped = dec.step(torch.tensor([ids[-1]]), torch.tensor([len(ids) - 1]))
    assert torch.allclose(stepped, full, atol=0.05, rtol=0.05)


def test_int8_engine_greedy_is_deterministic():
    model = _gpt(32)
    req = [Request([1, 2, 3], GenerationParams(temperature=0, max_new_tokens=16, ignore_eos=True))]
    a = Engine(GPTDecoder(model, torch.int8)).generate(req)[0].tokens
    b = Engine(GPTDecoder(model, torch.int8)).generate(req)[0].tokens
    assert a == b and len(a) == 16


def test_int8_refused_where_it_does_not_apply():
    torch.manual_seed(0)
    lstm = LSTMLM(LSTMConfig(vocab_size=20, n_embd=16, n_hidden=16, n_layer=1))
    with pytest.raises(AigcError, match="int8 weights are for GPT"):
        make_decoder(lstm, torch.int8)
    from aigc.generation.hf import load_hf

    with pytest.raises(AigcError, match="int8 weights are for our own GPT"):
        load_hf("hf:gpt2", dtype=torch.int8)


def test_cli_dtype_int8(run_cli, tmp_path):
    from safetensors.torch import save_model

    from aigc.tokenizers import train_tokenizer
    from aigc.utils.io import atomic_write_json

    tok = train_tokenizer("char", ["ROMEO: But soft, what light through yonder window breaks?\n"])
    cfg = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    out = tmp_path / "run"
    out.mkdir()
    save_model(GPT(GPTConfig(**cfg)), str(out / "model.safetensors"))
    atomic_write_json(out / "config.json", {"family": "gpt", "model": cfg, "train": {}, "data": {}})
    tok.save(out / "tokenizer.json")
    args = ("generate", "text", "-m", str(out), "-p", "RO", "--seed", "1", "--max-new-tokens", "12")
    code, text1, err = run_cli(*args, "--dtype", "int8")
    assert code == 0, err
    code, text2, _ = run_cli(*args, "--dtype", "int8")
    assert text1 == text2 and text1.startswith("RO")
    code, _, err = run_cli(*args, "--dtype", "int4")
    assert code == 1 and "int8" in err and "Traceback" not in err
