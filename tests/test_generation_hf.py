"""Pretrained transformers models through our API; beam search and greedy vs `model.generate`.

Tiny random models and a BPE trained in the test, saved to tmp_path: no download, no hub.
"""

from __future__ import annotations

import pytest
import torch

from aigc.errors import AigcError
from aigc.generation import load_generator
from aigc.generation.engine import Engine, Request
from aigc.generation.hf import HFDecoder
from aigc.generation.params import GenerationParams

transformers = pytest.importorskip("transformers")

TEXT = "the cat sat on the mat. the dog ate the cat's food. 春眠不觉晓，处处闻啼鸟。 " * 4


@pytest.fixture(scope="module")
def bpe():
    from aigc.tokenizers import train_tokenizer

    return train_tokenizer("bpe", [TEXT], vocab_size=300)


def _llama(vocab: int, seed: int = 0, eos: int | None = None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits: no near-ties between candidates
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf_generate(model, prompt: list[int], **kw) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw
        )
    return [row[len(prompt) :].tolist() for row in out]


def _strip(seq: list[int], eos: int | None) -> list[int]:
    # HF pads finished beams with eos/pad after the end; ours end at the stop token
    if eos is not None and eos in seq:
        return seq[: seq.index(eos) + 1]
    return seq


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=5, no_repeat_ngram_size=2),
        dict(num_beams=3, length_penalty=0.0, early_stopping=True),
        pytest.param(
            dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
            marks=pytest.mark.slow,
        ),
        dict(num_beams=2, repetition_penalty=1.5),
    ],
)
def test_beam_search_matches_transformers_generate(kw):
    prompt = [3, 17, 42, 8]
    probe = _llama(64)
    # make stopping matter: the eos is a token greedy decoding produces a few steps in
    eos = _hf_generate(probe, prompt, max_new_tokens=6, do_sample=False)[0][4]
    model = _llama(64, eos=eos)
    ref = _hf_generate(model, prompt, max_new_tokens=12, do_sample=False, **kw)
    params = GenerationParams(max_new_tokens=12, **kw)
    ours = Engine(HFDecoder(model), eos_id=eos).beam(Request(prompt, params))
    assert [c.tokens for c in ours] == [_strip(r, eos) for r in ref]


def test_greedy_and_penalties_match_transformers_generate():
    model = _llama(64, seed=1)
    prompt = [5, 6, 7, 8, 9]
    for kw in (dict(), dict(repetition_penalty=1.3, no_repeat_ngram_size=3)):
        ref = _hf_generate(model, prompt, max_new_tokens=15, do_sample=False, **kw)[0]
        ours = Engine(HFDecoder(model)).generate(
            [Request(prompt, GenerationParams(temperature=0, max_new_tokens=15, **kw))]
        )
        assert ours[0].tokens == ref


def test_left_padded_batch_equals_rows_alone():
    model = _llama(64, seed=2)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    eng = Engine(HFDecoder(model))
    batched = eng.generate([Request(p, GenerationParams(temperature=0, max_new_tokens=10)) for p in prompts])
    for p, c in zip(prompts, batched, strict=True):
        assert (
            c.tokens
            == eng.generate([Request(p, GenerationParams(temperature=0, max_new_tokens=10))])[0].tokens
        )


@pytest.fixture
def gpt2_dir(tmp_path, bpe):
    """A tiny random GPT-2 + our BPE, saved like a hub model."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=bpe.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=bpe.eos_id,
        bos_token_id=bpe.eos_id,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out = tmp_path / "gpt2-tiny"
    model.save_pretrained(out, safe_serialization=True)
    bpe.save_pretrained(out)
    return out


def test_hf_spec_loads_and_runs_the_gpt2_example(gpt2_dir):
    gen = load_generator(f"hf:{gpt2_dir}")
    # the seed's example, in spirit: beam search with no repeated bigrams
    [r] = gen.generate("the cat", num_beams=5, no_repeat_ngram_size=2, max_new_tokens=20)
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, use_safetensors=True)
    ids = tok("the cat", return_tensors="pt")
    ref = model.generate(**ids, num_beams=5, no_repeat_ngram_size=2, max_new_tokens=20, do_sample=False)
    assert r.text == tok.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert r.model == f"hf:{gpt2_dir}"


def test_hf_generator_stream_and_seed(gpt2_dir):
    gen = load_generator(f"hf:{gpt2_dir}")
    [r] = gen.generate("春眠", max_new_tokens=12, seed=4, ignore_eos=True)
    s = gen.stream("春眠", max_new_tokens=12, seed=4, ignore_eos=True)
    assert "".join(s) == r.text and s.result.tokens == r.tokens
    [again] = gen.generate("春眠", **r.params)
    assert again.text == r.text


def test_hf_and_artifact_errors(tmp_path):
    with pytest.raises(AigcError, match="not a directory"):
        load_generator(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(AigcError, match="safetensors"):
        load_generator(f"hf:{tmp_path / 'half'}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(AigcError, match="missing model.safetensors, tokenizer.json"):
        load_generator(tmp_path / "run")
    with pytest.raises(AigcError, match="not found"):
        load_generator(str(tmp_path / "missing"))


def test_beam_search_on_exported_gpt_matches_transformers(tmp_path, bpe):
    """Our GPT + our engine vs transformers `generate` on the same model exported by `aigc export`."""
    export = pytest.importorskip("aigc.export")
    from aigc.generation.text import TextGenerator
    from aigc.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=bpe.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32, init_std=0.2)
    model = GPT(cfg).eval()
    out = export.export_hf(model, bpe, tmp_path / "exported")
    ours = TextGenerator(model, bpe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    prompt = bpe.encode("the cat sat")
    for kw in (dict(num_beams=4, no_repeat_ngram_size=2, num_return_sequences=2), dict(num_beams=1)):
        ref = _hf_generate(hf, prompt, max_new_tokens=12, do_sample=False, **kw)
        got = ours.generate("the cat sat", max_new_tokens=12, temperature=0, **kw)
        assert [r.tokens for r in got] == [_strip(r, bpe.eos_id) for r in ref]
    # and the exported folder itself loads as hf:<dir> and beams the same
    hf_gen = load_generator(f"hf:{out}")
    got = hf_gen.generate("the cat sat", max_new_tokens=12, num_beams=4, no_repeat_ngram_size=2)
    assert got[0].tokens == _strip(
        _hf_generate(hf, prompt, max_new_tokens=12, num_beams=4, no_repeat_ngram_size=2)[0], bpe.eos_id
    )


def test_hf_chat_uses_the_tokenizer_template(gpt2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(gpt2_dir)
    gen = load_generator(f"hf:{gpt2_dir}")
    prompt = gen.chat_prompt([{"role": "user", "content": "the cat"}], max_new_tokens=8)
    assert prompt == "<user>the cat\n<assistant>" and gen.chat_stops() == []
    from aigc.generation.text import ChatSession

    chat = ChatSession(gen, params=GenerationParams(max_new_tokens=6, seed=0))
    reply = "".join(chat.send("the cat"))
    assert chat.messages[-1] == {"role": "assistant", "content": reply.strip()}


def test_cli_generate_with_hf_model(run_cli, gpt2_dir):
    code, out, err = run_cli("generate", "text", "-m", f"hf:{gpt2_dir}", "-p", "the cat", "--num-beams", "5",
                             "--no-repeat-ngram-size", "2", "--max-new-tokens", "10")  # fmt: skip
    assert code == 0, err
    [r] = load_generator(f"hf:{gpt2_dir}").generate(
        "the cat", num_beams=5, no_repeat_ngram_size=2, max_new_tokens=10
    )
    assert out == "the cat" + r.text + "\n"
