"""The token-id engine and TextGenerator on tiny GPT / LSTM models (random weights, CPU, seconds)."""

from __future__ import annotations

import logging

import pytest
import torch

from aigc.errors import AigcError
from aigc.generation.decoders import GPTDecoder
from aigc.generation.engine import Engine, Request
from aigc.generation.params import GenerationParams, make_params
from aigc.generation.text import ChatSession, TextGenerator
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.lstm import LSTMLM, LSTMConfig

CORPUS = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: 春眠不觉晓 🌸\nUser: Assistant: System:\n"


@pytest.fixture(scope="module")
def char_tok():
    from aigc.tokenizers import train_tokenizer

    return train_tokenizer("char", [CORPUS], special_tokens=["<|endoftext|>"])


def _gpt(vocab: int, block: int = 64, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, init_std=0.3)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()  # init_std 0.3: peaked logits, so greedy has no near-ties


def _lstm(vocab: int, seed: int = 0) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(LSTMConfig(vocab_size=vocab, n_embd=16, n_hidden=32, n_layer=2, init_range=0.5)).eval()


def _greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9], [3, 3, 8, 1]]


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_greedy_with_cache_equals_full_recompute(family):
    from aigc.generation.decoders import make_decoder

    model = _gpt(40) if family == "gpt" else _lstm(40)
    eng = Engine(make_decoder(model))
    # batched: different prompt lengths in one batch, each row at its own position
    reqs = [Request(p, GenerationParams(temperature=0, max_new_tokens=20, seed=0)) for p in PROMPTS]
    for req, c in zip(reqs, eng.generate(reqs), strict=True):
        assert c.tokens == _greedy_no_cache(model, req.prompt, 20)
        assert c.finish_reason == "length"


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_rows_join_and_leave_without_copying_the_others(dtype):
    """add_rows / drop_rows (continuous batching): greedy tokens of rows joining and leaving a
    running batch are full recomputation's, only the moved rows' caches are copied, and the cache
    keeps its capacity (no new allocation) while rows come and go."""
    model = _gpt(40)
    dec = GPTDecoder(model, dtype)
    prompts = {0: [1, 2, 3, 4, 5, 6, 7], 1: [9], 2: [3, 3, 8, 1], 3: [5, 6], 4: [2, 2, 2, 9, 9]}
    want = {k: _greedy_no_cache(model, p, 12) for k, p in prompts.items()}
    got = {k: [] for k in prompts}
    ids = [0, 1, 2]  # request id of each decoder row, in row order
    logits = dec.add_rows([prompts[k] for k in ids])
    pos = torch.tensor([len(prompts[k]) for k in ids])
    joins = {3: [3, 4]}  # before step 3, two rows join
    for step in range(12 + 3):
        if step in joins:
            new = joins[step]
            pool = dec._pool.data_ptr()
            logits = torch.cat([logits, dec.add_rows([prompts[k] for k in new])])
            pos = torch.cat([pos, torch.tensor([len(prompts[k]) for k in new])])
            ids += new
            assert dec.rows == len(ids) and dec._pool.data_ptr() != pool  # grew from 3 to 6 rows
        tok = logits.argmax(-1)
        for k, t in zip(ids, tok.tolist(), strict=True):
            got[k].append(t)
        keep = [j for j, k in enumerate(ids) if len(got[k]) < (12 if k != 1 else 5)]  # 1 leaves early
        if len(keep) < len(ids):
            pool = dec._pool.data_ptr()
            order = dec.drop_rows(keep)
            assert sorted(order) == keep and dec._pool.data_ptr() == pool and dec.rows == len(keep)
            ids = [ids[j] for j in order]
            tok, pos = tok[order], pos[order]
        if not ids:
            break
        logits = dec.step(tok, pos)
        pos = pos + 1
    for k in prompts:
        n = 5 if k == 1 else 12
        if dtype is None:
            assert got[k] == want[k][:n], k
        else:  # fp16-rounded weights: the decoder's own batch-alone answer
            alone = Engine(GPTDecoder(model, dtype)).generate(
                [Request(prompts[k], GenerationParams(temperature=0, max_new_tokens=n))]
            )[0]
            assert got[k] == alone.tokens, k
    assert dec.drop_rows([]) == [] and dec.rows == 0
    pool = dec._pool.data_ptr()
    dec.add_rows([prompts[0]])  # an emptied batch starts again in the same cache
    assert dec._pool.data_ptr() == pool


def test_rows_join_a_batch_prefilled_with_a_shorter_cache():
    """add_rows after prefill(max_len=8): the running row moves into a full-context pool, intact."""
    model = _gpt(40)
    dec = GPTDecoder(model)
    a, b = [1, 2, 3], [9, 8]
    first = dec.prefill([a], max_len=8)
    logits = torch.cat([first, dec.add_rows([b])])
    assert dec.kv.shape[3] == dec.max_len and dec.rows == 2
    got = {0: [], 1: []}
    pos = torch.tensor([len(a), len(b)])
    for _ in range(10):
        tok = logits.argmax(-1)
        for k, t in enumerate(tok.tolist()):
            got[k].append(t)
        logits, pos = dec.step(tok, pos), pos + 1
    assert got[0] == _greedy_no_cache(model, a, 10) and got[1] == _greedy_no_cache(model, b, 10)


def _greedy_sliding(model, prompt: list[int], n: int, block: int) -> list[int]:
    """Reference for the context policy: when the context is full, keep its last block - block//4."""
    ctx, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ctx]))[0][0, -1].argmax())
            out.append(t)
            ctx = ctx + [t] if len(ctx) < block else (ctx + [t])[-(block - block // 4) :]
    return out


def test_generation_slides_past_the_context():
    block = 16
    model = _gpt(40, block=block)
    eng = Engine(GPTDecoder(model), eos_id=None)
    prompts = [[1, 2, 3], list(range(5, 18)), [7]]  # reach the limit at different steps
    reqs = [Request(p, GenerationParams(max_new_tokens=50, temperature=0.0, seed=0)) for p in prompts]
    outs = eng.generate(reqs)
    for p, c in zip(prompts, outs, strict=True):
        assert c.finish_reason == "length" and len(c.tokens) == 50
        assert c.tokens == _greedy_sliding(model, p, 50, block)
    # sampled rows slide too, and stay reproducible alone or batched
    sampled = [
        Request(p, GenerationParams(max_new_tokens=40, temperature=1.0, seed=5 + i))
        for i, p in enumerate(prompts)
    ]
    batched = eng.generate(sampled)
    for r, c in zip(sampled, batched, strict=True):
        assert eng.generate([r])[0].tokens == c.tokens


def test_bf16_decoder_runs_and_mostly_agrees():
    from aigc.generation.decoders import GPTDecoder

    model = _gpt(40)
    ref = Engine(GPTDecoder(model)).generate(
        [Request(PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=8))]
    )
    out = Engine(GPTDecoder(model, torch.bfloat16)).generate(
        [Request(PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=8))]
    )
    assert out[0].tokens[:3] == ref[0].tokens[:3]


def test_same_seed_same_tokens_alone_or_batched():
    from aigc.generation.decoders import make_decoder

    model = _gpt(40, init_std=0.05)
    eng = Engine(make_decoder(model))
    target = Request([5, 6, 7], GenerationParams(temperature=0.9, top_k=20, max_new_tokens=25, seed=1234))
    alone = eng.generate([target])[0].tokens
    neighbours = [
        Request(
            [1, 2], GenerationParams(temperature=0, max_new_tokens=5)
        ),  # finishes early, leaves the batch
        target,
        Request([9, 9, 9, 9, 9, 9], GenerationParams(temperature=1.3, top_p=0.5, max_new_tokens=40, seed=7)),
        Request([4], GenerationParams(min_p=0.1, repetition_penalty=1.3, max_new_tokens=12, seed=8)),
    ]
    batched = eng.generate(neighbours)
    assert batched[1].tokens == alone
    assert len(batched[0].tokens) == 5 and len(batched[3].tokens) == 12
    other_seed = eng.generate(
        [Request([5, 6, 7], GenerationParams(temperature=0.9, top_k=20, max_new_tokens=25, seed=99))]
    )
    assert other_seed[0].tokens != alone


def test_stop_token_and_max_new_tokens():
    from aigc.generation.decoders import make_decoder

    model = _gpt(40)
    eng = Engine(make_decoder(model), eos_id=None)
    free = eng.generate([Request([1, 2, 3], GenerationParams(temperature=0, max_new_tokens=10))])[0]
    stop_at = free.tokens[3]
    c = eng.generate(
        [Request([1, 2, 3], GenerationParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop_at]))]
    )[0]
    assert c.tokens == free.tokens[: free.tokens.index(stop_at) + 1] and c.finish_reason == "stop"
    eng.eos_id = stop_at  # the tokenizer's EOS stops too, unless ignore_eos
    assert (
        eng.generate([Request([1, 2, 3], GenerationParams(temperature=0, max_new_tokens=10))])[
            0
        ].finish_reason
        == "stop"
    )
    c = eng.generate(
        [Request([1, 2, 3], GenerationParams(temperature=0, max_new_tokens=10, ignore_eos=True))]
    )[0]
    assert c.tokens == free.tokens
    assert eng.generate([Request([1], GenerationParams(max_new_tokens=0))])[0].tokens == []


def test_long_prompt_keeps_tail_with_warning(caplog):
    from aigc.generation.decoders import make_decoder

    model = _gpt(40, block=16)
    eng = Engine(make_decoder(model))
    prompt = list(range(1, 31))  # 30 tokens, context 16
    with caplog.at_level(logging.WARNING, logger="aigc.generation"):
        c = eng.generate([Request(prompt, GenerationParams(temperature=0, max_new_tokens=5))])[0]
    assert "kept the last 11 tokens" in caplog.text and c.warnings
    # quiet: the warning's text only, for a caller that says it before the prompt runs elsewhere
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aigc.generation"):
        assert eng.fit_prompt(prompt, 5, quiet=True) == (prompt[-11:], c.warnings)
    assert caplog.records == []
    assert c.prompt_tokens == 11 and len(c.tokens) == 5
    assert c.tokens == _greedy_no_cache(model, prompt[-11:], 5)
    # a prompt that fits but leaves little room: the context slides, all 50 tokens come
    c = eng.generate([Request(list(range(1, 14)), GenerationParams(temperature=0, max_new_tokens=50))])[0]
    assert c.finish_reason == "length" and c.prompt_tokens == 13 and len(c.tokens) == 50
    assert c.tokens == _greedy_sliding(model, list(range(1, 14)), 50, 16)


def test_processors_in_the_engine():
    from aigc.generation.decoders import make_decoder

    model = _gpt(40)
    eng = Engine(make_decoder(model))
    # no_repeat_ngram_size=1: no token may appear twice (prompt included)
    c = eng.generate(
        [Request([1, 2], GenerationParams(temperature=0, max_new_tokens=30, no_repeat_ngram_size=1))]
    )[0]
    assert len(set(c.tokens + [1, 2])) == len(c.tokens) + 2
    # bad words: a token never produced
    free = eng.generate([Request([1, 2], GenerationParams(temperature=0, max_new_tokens=15))])[0]
    banned = free.tokens[0]
    c = eng.generate(
        [Request([1, 2], GenerationParams(temperature=0, max_new_tokens=15, bad_words_ids=[[banned]]))]
    )[0]
    assert banned not in c.tokens
    # frequency penalty spreads the tokens
    c = eng.generate(
        [Request([1], GenerationParams(temperature=0, max_new_tokens=30, frequency_penalty=2.0))]
    )[0]
    assert len(set(c.tokens)) > len(set(free.tokens)) or len(set(c.tokens)) >= 10
    # logprobs
    c = eng.generate(
        [Request([1], GenerationParams(temperature=0, max_new_tokens=4, logprobs=True, top_logprobs=3))]
    )[0]
    assert len(c.logprobs) == 4 and all(
        top[0][0] == t for top, t in zip(c.top_logprobs, c.tokens, strict=True)
    )


def test_engine_rejects_bad_token_ids():
    from aigc.generation.decoders import make_decoder

    eng = Engine(make_decoder(_gpt(40)))
    with pytest.raises(AigcError, match="outside the model's vocabulary"):
        eng.generate([Request([1, 400], GenerationParams(max_new_tokens=2))])


# ---------------------------------------------------------------------------- TextGenerator


@pytest.fixture(scope="module")
def gen(char_tok):
    return TextGenerator(_gpt(char_tok.vocab_size, block=128, init_std=0.1), char_tok, model_id="tiny")


def test_generate_records_provenance_and_reproduces(gen):
    [r] = gen.generate("ROMEO:", max_new_tokens=20, temperature=0.8)
    assert r.model == "tiny" and isinstance(r.seed, int) and r.params["temperature"] == 0.8
    assert r.usage == {
        "prompt_tokens": 6,
        "completion_tokens": len(r.tokens),
        "total_tokens": 6 + len(r.tokens),
    }
    [again] = gen.generate("ROMEO:", **r.params)
    assert again.text == r.text and again.tokens == r.tokens


def test_n_samples_each_reproducible_from_its_seed(gen):
    rs = gen.generate(["ROMEO:", "JULIET:"], n=3, seed=10, max_new_tokens=15)
    assert [r.seed for r in rs] == [10, 11, 12, 10, 11, 12] and [r.index for r in rs] == list(range(6))
    [solo] = gen.generate("JULIET:", seed=11, max_new_tokens=15)
    assert solo.text == rs[4].text


def test_row_params_are_the_copies_replace_makes(gen):
    """A request's per-row copies of its params (not validated again) equal dataclasses.replace's."""
    import dataclasses

    p = make_params(n=3, seed=2**63 - 2, stop=["x"], logit_bias={"5": 1}, bad_words=["oo"], temperature=0.7)
    _, rows = gen._requests("ROMEO:", p)
    extra = {"bad_words_ids": p.bad_words_ids + gen.token_ids(p.bad_words)}
    refs = [dataclasses.replace(p, n=1, seed=(p.seed + k) % 2**63, **extra) for k in range(3)]
    assert rows == refs and [r.seed for r in rows] == [2**63 - 2, 2**63 - 1, 0]
    assert extra["bad_words_ids"] and rows[0].bad_words_ids == extra["bad_words_ids"]
    rows[0].logit_bias[7] = 2.0
    assert p.logit_bias == rows[1].logit_bias == {5: 1.0}  # a dict per copy, as replace makes


def test_stream_equals_generate(gen):
    params = dict(max_new_tokens=40, seed=5, temperature=1.0)
    [r] = gen.generate("JULIET: ", **params)
    stream = gen.stream("JULIET: ", **params)
    deltas = list(stream)
    assert "".join(deltas) == r.text == stream.result.text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_strings_cut_text_and_stop(gen):
    [free] = gen.generate("ROMEO:", max_new_tokens=30, seed=3)
    stop = free.text[5:7]
    assert stop
    [r] = gen.generate("ROMEO:", max_new_tokens=30, seed=3, stop=[stop])
    assert r.text == free.text[: free.text.find(stop)] and r.finish_reason == "stop"
    assert "".join(gen.stream("ROMEO:", max_new_tokens=30, seed=3, stop=[stop])) == r.text


def test_empty_prompt_is_unconditional(gen):
    [r] = gen.generate("", max_new_tokens=5, temperature=0)
    assert len(r.tokens) >= 1 and r.usage["prompt_tokens"] == 1


def test_unknown_character_is_a_clear_error(gen):
    with pytest.raises(AigcError, match="not in the char tokenizer"):
        gen.generate("xyz§", max_new_tokens=3)


def test_invalid_params_from_generate(gen):
    with pytest.raises(AigcError, match="top_p"):
        gen.generate("ROMEO:", top_p=1.5)
    with pytest.raises(AigcError, match="temperature"):
        gen.generate("ROMEO:", temperature=-1)


def test_beam_search_text_generator(gen):
    rs = gen.generate("ROMEO:", num_beams=4, num_return_sequences=2, max_new_tokens=10)
    assert len(rs) == 2 and rs[0].score >= rs[1].score and rs[0].tokens != rs[1].tokens


def test_batch_with_different_params(gen):
    rs = gen.generate_batch(
        [
            ("ROMEO:", GenerationParams(temperature=0, max_new_tokens=8)),
            ("JULIET: 春", GenerationParams(temperature=0.7, top_p=0.9, seed=1, max_new_tokens=12)),
        ]
    )
    [greedy] = gen.generate("ROMEO:", temperature=0, max_new_tokens=8)
    [sampled] = gen.generate("JULIET: 春", temperature=0.7, top_p=0.9, seed=1, max_new_tokens=12)
    assert rs[0].text == greedy.text and rs[1].text == sampled.text


def test_chat_keeps_history_within_context(char_tok):
    gen = TextGenerator(_gpt(char_tok.vocab_size, block=64, init_std=0.1), char_tok)
    chat = ChatSession(gen, params=GenerationParams(max_new_tokens=10, seed=0))
    for _ in range(6):
        "".join(chat.send("ROMEO: light"))
    assert len(chat.messages) == 12
    prompt = gen.chat_prompt(chat.messages + [{"role": "user", "content": "JULIET"}], 10)
    assert len(gen.encode(prompt)) + 10 <= 64 and prompt.endswith("User: JULIET\nAssistant:")
    chat.reset()
    assert chat.messages == []


def test_lstm_text_generator_generate_and_stream(char_tok):
    gen = TextGenerator(_lstm(char_tok.vocab_size), char_tok, model_id="lstm")
    assert gen.context_length is None  # recurrent: no context limit
    [r] = gen.generate("ROMEO:", max_new_tokens=30, seed=2, temperature=0.9, top_k=10)
    assert "".join(gen.stream("ROMEO:", max_new_tokens=30, seed=2, temperature=0.9, top_k=10)) == r.text
    assert len(r.tokens) == 30 or r.finish_reason == "stop"
