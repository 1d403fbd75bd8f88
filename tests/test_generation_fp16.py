"""fp16 weights through fbgemm (`--dtype float16`) and the compiled decode step (`--compile`)."""

from __future__ import annotations

import copy

import pytest
import torch

from aigc.errors import AigcError
from aigc.generation import decoders
from aigc.generation.decoders import GPTDecoder, fp16_gemm_available, fp16_linear, make_decoder, pack_fp16
from aigc.generation.engine import Engine, Request
from aigc.generation.params import GenerationParams
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.lstm import LSTMLM, LSTMConfig
from serve_helpers import write_text_run

needs_fbgemm = pytest.mark.skipif(not fp16_gemm_available(), reason="torch built without fbgemm")


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=48, n_layer=2, n_head=4, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def _rounded(model: GPT) -> GPT:
    """The oracle: the same model with every weight rounded to fp16 (computing in fp32)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def _greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt) :]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9], [3, 3, 8, 1]]


@needs_fbgemm
def test_fp16_linear_is_a_matmul_with_fp16_rounded_weights():
    w = (torch.randn(40, 24) * 0.1).half().float()  # (out, in), already fp16 values
    x = torch.randn(5, 24)
    packed = pack_fp16(w)
    assert isinstance(packed, tuple) and packed[1] == 40
    ref = x @ w.t()
    assert torch.allclose(fp16_linear(x, packed), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fp16_linear(x[None], packed)[0], ref, atol=1e-5, rtol=1e-5)  # (1, T, in) prefill


@needs_fbgemm
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_fp16_logits_equal_the_fp16_rounded_model(kv_heads):
    model = _gpt(n_kv_head=kv_heads) if kv_heads else _gpt()
    ref = GPTDecoder(_rounded(model))  # fp32 decoder of the rounded weights
    dec = GPTDecoder(model, torch.float16)
    assert dec.kv.dtype == torch.float32  # fp32 activations and cache
    ids = [4, 8, 15, 16, 23, 42, 7]
    assert torch.allclose(dec.prefill([ids]), ref.prefill([ids]), atol=1e-4, rtol=1e-4)
    # decode steps, rows at different positions
    dec.prefill([ids, ids[:3]])
    ref.prefill([ids, ids[:3]])
    tokens, positions = torch.tensor([1, 2]), torch.tensor([7, 3])
    assert torch.allclose(dec.step(tokens, positions), ref.step(tokens, positions), atol=1e-4, rtol=1e-4)
    # and the full model forward agrees (logits of the last position)
    full = _rounded(model)(torch.tensor([ids + [1]]))[0][0, -1]
    dec.prefill([ids])
    assert torch.allclose(dec.step(torch.tensor([1]), torch.tensor([7]))[0], full, atol=1e-4, rtol=1e-4)


@needs_fbgemm
def test_fp16_greedy_with_cache_equals_full_recompute():
    model = _gpt()
    rounded = _rounded(model)
    eng = Engine(make_decoder(model, torch.float16))
    reqs = [Request(p, GenerationParams(temperature=0, max_new_tokens=20, seed=0)) for p in PROMPTS]
    for req, c in zip(reqs, eng.generate(reqs), strict=True):
        assert c.tokens == _greedy_no_cache(rounded, req.prompt, 20)


@needs_fbgemm
def test_fp16_same_seed_same_tokens_alone_or_batched():
    model = _gpt()
    eng = Engine(GPTDecoder(model, torch.float16))
    params = GenerationParams(temperature=1.0, top_k=20, max_new_tokens=16, seed=7)
    alone = eng.generate([Request([1, 2, 3], params)])[0].tokens
    others = [Request([5], GenerationParams(temperature=0.7, max_new_tokens=9, seed=1)),
              Request([9, 9, 9, 9], GenerationParams(temperature=0, max_new_tokens=16))]  # fmt: skip
    batched = eng.generate([others[0], Request([1, 2, 3], params), others[1]])[1].tokens
    assert alone == batched and len(alone) == 16


def test_fp16_fallback_without_fbgemm_gives_the_same_numbers(monkeypatch):
    model = _gpt()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = GPTDecoder(_rounded(model)).prefill([ids])
    monkeypatch.setattr(decoders, "fp16_gemm_available", lambda: False)
    dec = GPTDecoder(model, torch.float16)
    assert all(isinstance(w, torch.Tensor) for w in dec.layers[0])  # plain fp32 matrices
    assert torch.allclose(dec.prefill([ids]), ref, atol=1e-4, rtol=1e-4)


def test_fp16_and_compile_refused_where_they_do_not_apply(tmp_path):
    torch.manual_seed(0)
    lstm = LSTMLM(LSTMConfig(vocab_size=20, n_embd=16, n_hidden=16, n_layer=1))
    with pytest.raises(AigcError, match="float16 weights are for GPT"):
        make_decoder(lstm, torch.float16)
    with pytest.raises(AigcError, match="compile is for GPT"):
        make_decoder(lstm, compile=True)
    with pytest.raises(AigcError, match="compile is for float32 or float16"):
        GPTDecoder(_gpt(), torch.bfloat16, compile=True)
    from aigc.generation import load_generator

    with pytest.raises(AigcError, match="compile is for our own GPT runs"):
        load_generator("hf:" + str(tmp_path), compile=True)


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(decoders, "can_compile", lambda: False)
    with pytest.raises(AigcError, match="C\\+\\+ compiler"):
        GPTDecoder(_gpt(), compile=True)


def test_cli_dtype_float16(run_cli, tmp_path):
    out = write_text_run(tmp_path / "run")
    args = ("generate", "text", "-m", str(out), "-p", "RO", "--seed", "1", "--max-new-tokens", "12")
    code, text1, err = run_cli(*args, "--dtype", "float16")
    assert code == 0, err
    code, text2, _ = run_cli(*args, "--dtype", "fp16")
    assert text1 == text2 and text1.startswith("RO")
    assert "Warning" not in err  # the deprecated API's warnings are silenced


def test_cache_reused_only_when_unshared_and_stale_entries_change_nothing():
    model = _gpt()
    dec = GPTDecoder(model)
    eng = Engine(dec)
    reqs = [Request(p, GenerationParams(temperature=0, max_new_tokens=12)) for p in PROMPTS]
    eng.generate(
        [Request([7] * 7, GenerationParams(temperature=0, max_new_tokens=12))] * 3
    )  # stale, same shape
    ptr = dec.kv.data_ptr()
    reused = eng.generate(reqs)  # same cache shape: the buffer is reused, not zeroed
    assert dec.kv.data_ptr() == ptr
    fresh = Engine(GPTDecoder(model)).generate(reqs)
    assert [c.tokens for c in reused] == [c.tokens for c in fresh]
    # rows at different positions read masked stale slots: logits bitwise equal to a zeroed cache
    tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([7, 1, 4])
    ref = GPTDecoder(model)
    ref.prefill(PROMPTS, max_len=24)
    dec.prefill(PROMPTS, max_len=24)
    assert torch.equal(dec.step(tokens, positions), ref.step(tokens, positions))
    held, view = dec.kv, dec.kv[0]  # a reference or a view outside: a new buffer
    dec.prefill(PROMPTS, max_len=24)
    assert dec.kv.data_ptr() != held.data_ptr()
    del held
    ptr = dec.kv.data_ptr()
    keep = list(dec.kv)  # per-layer views (what the server's scheduler iterates)
    dec.prefill(PROMPTS, max_len=24)
    assert dec.kv.data_ptr() != ptr and view.shape[0] == 3 and len(keep) == 2


# ----------------------------------------------------------------------------- compiled step


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=needs_fbgemm)])
def test_compiled_step_matches_eager(dtype):
    """One compiled graph for batches >= 2 (plus one for a single row): logits as eager's, greedy
    with the cache equals recomputing the prefix, rows leave the batch and new calls reuse it."""
    model = _gpt()
    oracle = _rounded(model) if dtype == torch.float16 else model
    eager, comp = GPTDecoder(model, dtype), GPTDecoder(model, dtype, compile=True)
    ids = [4, 8, 15, 16, 23, 42, 7]
    for d in (eager, comp):
        d.prefill([ids, ids[:3], ids[:5]], max_len=40)
    tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([7, 3, 5])
    assert torch.allclose(comp.step(tokens, positions), eager.step(tokens, positions), atol=1e-4, rtol=1e-4)
    assert torch.allclose(comp.kv[:, :, :, :8], eager.kv[:, :, :, :8], atol=1e-5)  # same cache writes

    eng = Engine(comp)
    # different lengths: rows finish at different steps (3 -> 2 -> 1 rows)
    reqs = [
        Request(p, GenerationParams(temperature=0, max_new_tokens=n))
        for p, n in zip(PROMPTS, (20, 9, 14), strict=True)
    ]
    for req, c in zip(reqs, eng.generate(reqs), strict=True):
        assert c.tokens == _greedy_no_cache(oracle, req.prompt, req.params.max_new_tokens)
    # a longer cache (another generate call) and sampling: same graphs, same seeded text as eager
    p = GenerationParams(temperature=0.9, max_new_tokens=30, seed=3)
    assert (
        eng.generate([Request([5, 6], p)] * 2)[0].tokens
        == Engine(eager).generate([Request([5, 6], p)])[0].tokens
    )


@pytest.mark.slow
def test_compiled_decoder_slides_past_the_context_and_joins_batches():
    model = _gpt(block_size=24)
    eager, comp = GPTDecoder(model), GPTDecoder(model, compile=True)
    req = [Request([1, 2, 3], GenerationParams(temperature=0, max_new_tokens=40))] * 2
    assert Engine(comp).generate(req)[0].tokens == Engine(eager).generate(req)[0].tokens
    # a caller joining two batches assigns per-layer tensors (what the server's scheduler does)
    comp.prefill([[1, 2, 3], [4, 5]], max_len=24)
    old = comp.kv
    comp.prefill([[7, 8, 9, 1]], max_len=24)
    comp.kv = [torch.cat([a, b]) for a, b in zip(old, comp.kv, strict=True)]
    eager.prefill([[1, 2, 3], [4, 5], [7, 8, 9, 1]], max_len=24)
    tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([3, 2, 4])
    assert torch.allclose(comp.step(tokens, positions), eager.step(tokens, positions), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_compile_gives_the_same_text(run_cli, tmp_path):
    out = write_text_run(tmp_path / "run")
    args = ("generate", "text", "-m", str(out), "-p", "RO", "--seed", "3", "--max-new-tokens", "20")
    code, plain, err = run_cli(*args)
    assert code == 0, err
    code, compiled, err = run_cli(*args, "--compile")
    assert code == 0, err
    assert compiled == plain
    code, _, err = run_cli(*args, "--compile", "--dtype", "int8")
    assert code == 1 and "compile is for float32 or float16" in err and "Traceback" not in err
