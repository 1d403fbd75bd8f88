"""The text routes' inputs and what they say back: the truncation warning in a stream, echo with
logprobs, token-id prompts, errors that name the field or the bound, strict JSON types. Each
streamed case goes through the fast lane (serve/lane.py) and its plain twin through the FastAPI
route: both must answer alike."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fastapi.testclient import TestClient

from aigc.generation import load_generator
from aigc.serve import settings as S
from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import models_dir

LONG = "soft " * 40  # 200 characters: over the tiny GPT's context of 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(Settings(models_dirs=[root]))) as c:
        yield c


@pytest.fixture(scope="module")
def gen(root):
    return load_generator(root / "tiny")


def stream(client, path: str, body: dict) -> tuple[int, list[dict] | dict]:
    """(status, the chunks before [DONE]) of a streamed request, or (status, error body)."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        text = "".join(r.iter_text())
        if r.status_code != 200:
            return r.status_code, json.loads(text)
    assert text.endswith("data: [DONE]\n\n")
    return 200, [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]


def error(r) -> tuple[int, str]:
    body = r.json()
    assert body["detail"] == body["error"]["message"] and "Traceback" not in r.text
    return r.status_code, body["detail"]


# ---------------------------------------------------------------------------- 1. truncation warning


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_says_the_prompt_was_cut_in_its_first_chunk(client, echo):
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 5, "seed": 1, "echo": echo}
    full = client.post("/v1/completions", json=body).json()
    assert full["warnings"] and "kept the last" in full["warnings"][0]
    status, chunks = stream(client, "/v1/completions", body)
    assert status == 200 and chunks[0]["warnings"] == full["warnings"]
    assert all("warnings" not in c for c in chunks[1:])
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == full["choices"][0]["text"]
    # a prompt that fits: no warnings anywhere
    status, chunks = stream(client, "/v1/completions", {**body, "prompt": "soft"})
    assert status == 200 and not any("warnings" in c for c in chunks)


def test_a_streamed_prompt_that_is_cut_is_logged_once(client, caplog):
    """The route says the warning before the scheduler runs the prompt (a quiet fit_prompt); the
    scheduler logs it, once."""
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 5, "seed": 1}
    with caplog.at_level(logging.WARNING, logger="aigc.generation"):
        status, chunks = stream(client, "/v1/completions", body)
    assert status == 200 and "kept the last" in chunks[0]["warnings"][0]
    assert [r.getMessage() for r in caplog.records if "kept the last" in r.getMessage()] == chunks[0][
        "warnings"
    ]


def test_streamed_chat_says_the_prompt_was_cut_in_its_first_chunk(client):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": LONG}],
        "max_tokens": 5,
        "seed": 1,
        "n": 2,
    }
    full = client.post("/v1/chat/completions", json=body).json()
    assert full["warnings"] and "kept the last" in full["warnings"][0]
    status, chunks = stream(client, "/v1/chat/completions", body)
    assert status == 200 and chunks[0]["warnings"] == full["warnings"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("warnings" not in c for c in chunks[1:])
    short = {**body, "messages": [{"role": "user", "content": "soft"}]}
    status, chunks = stream(client, "/v1/chat/completions", short)
    assert status == 200 and not any("warnings" in c for c in chunks)


# ---------------------------------------------------------------------------- 2. echo + logprobs


def test_echo_logprobs_cover_the_prompt_and_offsets_index_the_text(client):
    body = {"model": "tiny", "prompt": "ROMEO", "max_tokens": 2, "temperature": 0, "logprobs": 1}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    c = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    lp = c["logprobs"]
    assert c["text"] == "ROMEO" + plain["text"]
    assert lp["tokens"] == [*"ROMEO", *plain["logprobs"]["tokens"]] and "".join(lp["tokens"]) == c["text"]
    # OpenAI: offsets into the returned text; the first prompt token has no logprob
    assert lp["text_offset"] == list(range(7))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["token_logprobs"][5:] == plain["logprobs"]["token_logprobs"]


def test_echo_prompt_logprobs_match_the_decoded_ones(client):
    """Oracle: the prompt's logprobs (one forward pass) equal what incremental decoding (KV cache)
    gave the same tokens when it generated them."""
    body = {"model": "tiny", "prompt": "ROMEO", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    gen = client.post("/v1/completions", json=body).json()["choices"][0]
    again = {**body, "prompt": "ROMEO" + gen["text"], "max_tokens": 0, "echo": True}
    lp = client.post("/v1/completions", json=again).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 + 6
    assert lp["token_logprobs"][5:] == pytest.approx(gen["logprobs"]["token_logprobs"], abs=1e-4)
    for got, want in zip(lp["top_logprobs"][5:], gen["logprobs"]["top_logprobs"], strict=True):
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(
            list(want.values()), abs=1e-4
        )


def test_prompt_logprobs_of_a_prompt_longer_than_the_context(gen):
    ids = gen.encode(LONG)
    out = gen.prompt_logprobs(ids, top_n=1)
    ctx = gen.context_length
    assert len(out) == len(ids) and [o["token"] for o in out] == ids
    # only what the last window's pass sees has a logprob
    assert all(o["logprob"] is None for o in out[: len(ids) - ctx + 1])
    assert all(o["logprob"] is not None for o in out[len(ids) - ctx + 1 :])
    with torch.no_grad():
        logits, _ = gen.model(torch.tensor([ids[-ctx:]]))  # (1, T, V)
    ref = torch.log_softmax(logits[0, -2], -1)[ids[-1]].item()
    assert out[-1]["logprob"] == pytest.approx(ref, abs=1e-5)


# ---------------------------------------------------------------------------- 3. token-id prompts


def test_token_id_prompts_as_text_prompts_plain_and_streamed(client, gen):
    ids = gen.encode("ROMEO")
    body = {"model": "tiny", "max_tokens": 6, "seed": 3}
    want = client.post("/v1/completions", json={**body, "prompt": "ROMEO"}).json()
    got = client.post("/v1/completions", json={**body, "prompt": ids, "echo": True}).json()
    assert got["choices"][0]["text"] == "ROMEO" + want["choices"][0]["text"]
    assert got["usage"] == want["usage"]
    two = client.post("/v1/completions", json={**body, "prompt": [ids, gen.encode("soft")]}).json()
    assert [c["text"] for c in two["choices"]][0] == want["choices"][0]["text"] and len(two["choices"]) == 2
    status, chunks = stream(client, "/v1/completions", {**body, "prompt": ids})
    assert status == 200
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == want["choices"][0]["text"]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([5, 99999], ["prompt", "99999", "vocabulary"]),
        ([[5], [6, 10**6]], ["prompt[1]", "vocabulary"]),
        ([], ["prompt", "at least 1"]),
        ([[]], ["prompt", "at least 1"]),
        ([[1]] * (S.MAX_PROMPTS + 1), ["prompt", str(S.MAX_PROMPTS)]),
        ([-1], ["prompt", "greater than or equal to 0"]),
    ],
)
def test_bad_token_id_prompts_are_400_naming_the_bound(client, gen, prompt, words, streamed):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
    if streamed:
        status, err = stream(client, "/v1/completions", body)
        status, detail = status, err["detail"]
    else:
        status, detail = error(client.post("/v1/completions", json=body))
    assert status == 400, detail
    for w in words:
        assert w in detail
    if "vocabulary" in words:
        assert str(gen.vocab_size - 1) in detail


def test_wrong_types_in_a_prompt_list_are_422_naming_the_field(client):
    for prompt, field in (
        ([1, "a"], "prompt.1"),
        (5, "prompt"),
        ([True], "prompt.0"),
        ([[1, 2], "x"], "prompt.1"),
    ):
        status, detail = error(client.post("/v1/completions", json={"model": "tiny", "prompt": prompt}))
        assert status == 422 and detail.startswith(field + ":"), detail


# ---------------------------------------------------------------------------- 4. list errors


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        (
            "/v1/completions",
            {"prompt": ["a"] * (S.MAX_PROMPTS + 1)},
            400,
            ["prompt", f"at most {S.MAX_PROMPTS}"],
        ),
        ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, ["stop.0", "at least 1 character"]),
        (
            "/v1/completions",
            {"prompt": "a", "stop": ["a"] * (S.MAX_STOP + 1)},
            400,
            ["stop", f"at most {S.MAX_STOP}"],
        ),
        ("/v1/completions", {"prompt": "a", "stop": 3}, 422, ["stop", "a string or a list of strings"]),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        ],
                    }
                ]
            },
            400,
            ["messages[0].content[1]", "image inputs are not supported by text models"],
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            422,
            ["messages.0.content.0", "'text', 'image_url'"],
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 422, ["messages.0.content"]),
    ],
)
def test_list_errors_name_the_bound_or_the_problem(client, path, body, status, words, streamed):
    body = {"model": "tiny", "max_tokens": 2, **body}
    if streamed:
        got, err = stream(client, path, body)
        detail = err["detail"]
    else:
        got, detail = error(client.post(path, json=body))
    assert got == status, detail
    assert "valid string" not in detail
    for w in words:
        assert w in detail


def test_moderation_input_list_errors(client):
    status, detail = error(client.post("/v1/moderations", json={"input": []}))
    assert status == 400 and "input" in detail and "at least 1" in detail
    status, detail = error(client.post("/v1/moderations", json={"input": ["a"] * 33}))
    assert status == 400 and "at most 32" in detail
    status, detail = error(client.post("/v1/moderations", json={"input": 5}))
    assert status == 422 and "input" in detail and "valid string" not in detail
    assert client.post("/v1/moderations", json={"input": ["a", "b"]}).status_code == 200


# ---------------------------------------------------------------------------- 5. strict inputs


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        ('"temperature": NaN', 422, ["temperature", "finite number"]),
        ('"top_p": Infinity', 422, ["top_p", "finite number"]),
        ('"max_tokens": true', 422, ["max_tokens", "valid integer"]),
        ('"max_tokens": "5"', 422, ["max_tokens", "valid integer"]),
        ('"n": 1.0', 422, ["n", "valid integer"]),
        ('"stream": "yes"', 422, ["stream", "valid boolean"]),
        ('"stream_options": {"include_usage": true}', 400, ["stream_options", "stream: true"]),
        (
            '"stream": false, "stream_options": {"include_usage": true}',
            400,
            ["stream_options", "stream: true"],
        ),
        ('"logit_bias": {"99999": 100}', 400, ["logit_bias", "99999", "vocabulary"]),
        ('"logit_bias": {"²": 1}', 422, ["logit_bias"]),
        ('"stream": true, "logit_bias": {"99999": 100}', 400, ["logit_bias", "vocabulary"]),  # the lane
    ],
)
def test_loose_inputs_are_refused_naming_the_field(client, gen, path, raw, status, words):
    base = (
        '"prompt": "soft"'
        if path == "/v1/completions"
        else '"messages": [{"role": "user", "content": "soft"}]'
    )
    content = f'{{"model": "tiny", "max_tokens": 2, {base}, {raw}}}'
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    got, detail = error(r)
    assert got == status, detail
    for w in words:
        assert w in detail
    if "vocabulary" in words:
        assert str(gen.vocab_size - 1) in detail


def test_proper_json_types_still_pass(client, gen):
    """What the official client sends: ints for floats, a logit_bias inside the vocabulary, a stream
    with stream_options."""
    body = {"model": "tiny", "prompt": "soft", "max_tokens": 3, "temperature": 1, "top_p": 1, "seed": 2,
            "logit_bias": {str(gen.vocab_size - 1): 100}, "stop": ["\n"], "n": 1}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == gen.decode([gen.vocab_size - 1]) * 3  # the bias wins
    status, chunks = stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert status == 200 and chunks[-1]["usage"]["completion_tokens"] == 3


def test_the_official_client_sends_ids_reads_echo_logprobs_and_stream_warnings(client, gen):
    import openai

    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)
    c = oa.completions.create(model="tiny", prompt=gen.encode("ROMEO"), echo=True, logprobs=1, max_tokens=2,
                              temperature=0)  # fmt: skip
    ch = c.choices[0]
    assert ch.text.startswith("ROMEO") and ch.logprobs.text_offset == list(range(7))
    assert ch.logprobs.token_logprobs[0] is None and len(ch.logprobs.tokens) == 7
    chunks = list(oa.completions.create(model="tiny", prompt=LONG, max_tokens=3, seed=1, stream=True))
    assert "kept the last" in chunks[0].model_extra["warnings"][0]
    chunks = list(oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG}],
                                             max_tokens=3, seed=1, stream=True))  # fmt: skip
    assert (
        "kept the last" in chunks[0].model_extra["warnings"][0]
        and chunks[0].choices[0].delta.role == "assistant"
    )
    with pytest.raises(openai.BadRequestError, match="stream: true"):
        oa.completions.create(model="tiny", prompt="a", max_tokens=1, stream_options={"include_usage": True})
