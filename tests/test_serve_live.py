"""A live uvicorn on a random loopback port: the official `openai` client, 32 concurrent streaming
clients, and property-based fuzzing of the OpenAPI spec (never a 5xx)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from aigc.generation import load_generator
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, models_dir

KEY = "test-key"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def live(root, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(hash_key(KEY) + "\n")
    with LiveServer(create_app(Settings(models_dirs=[root], api_keys_file=keys))) as server:
        yield server


def test_openai_client(live, root):
    import openai

    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {"tiny", "rnn", "story", "pix"}

    c = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=2, temperature=0.7)
    [ref] = load_generator(root / "tiny").generate("ROMEO:", max_new_tokens=12, seed=2, temperature=0.7)
    assert c.choices[0].text == ref.text and c.usage.completion_tokens == 12
    assert c.model_extra["seed"] == 2 and c.model_extra["parameters"]["temperature"] == 0.7

    stream = client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "soft"}], max_tokens=10, seed=1, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    full = client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "soft"}], max_tokens=10, seed=1
    )
    assert (
        text == full.choices[0].message.content and chunks[-1].usage.total_tokens == full.usage.total_tokens
    )

    img = client.images.generate(
        model="pix", prompt=None, n=1, size="8x8", extra_body={"seed": 1, "steps": 2}
    )
    assert base64.b64decode(img.data[0].b64_json)[:4] == b"\x89PNG"

    with pytest.raises(openai.NotFoundError, match="available"):
        client.completions.create(model="missing", prompt="a")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=10**6)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_32_concurrent_streams_all_complete(live):
    """Bounded load test: 32 streaming clients at once, no errors, every stream ends with [DONE]."""
    import httpx

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 24, "seed": i, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        lines = []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"

        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        return text, chunks[-1]["usage"]["completion_tokens"]

    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), timeout=120)

    results = asyncio.run(main())
    assert len(results) == 32 and all(n == 24 for _, n in results)
    assert len({t for t, _ in results}) > 1  # each stream its own seed


@pytest.mark.slow
def test_fuzz_openapi_never_5xx(root):
    """Hypothesis: random JSON bodies for every POST route of the spec give 2xx/4xx, never 5xx."""
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app = create_app(Settings(models_dirs=[root]))
    client = TestClient(app)
    paths = [p for p, ops in app.openapi()["paths"].items() if "post" in ops]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/images/generations"} <= set(paths)
    scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=12)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                          max_leaves=6)  # fmt: skip
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
              "logit_bias", "logprobs", "top_logprobs", "size", "steps", "label", "guidance", "echo", "top_k"]  # fmt: skip
    model = st.sampled_from(["tiny", "rnn", "pix", "story@1", "nope", "../x"])
    body = st.fixed_dictionaries({"model": model}, optional={f: values for f in fields[1:]})
    small = {"max_tokens": st.integers(0, 3), "steps": st.integers(1, 2), "n": st.integers(1, 2)}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), body=body, sizes=st.fixed_dictionaries({}, optional=small))
    def check(path, body, sizes):
        # json.dumps writes NaN / Infinity too: the server must refuse them cleanly
        content = json.dumps({**body, **sizes})
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (path, body, r.text)
        statuses.add(r.status_code)

    statuses: set[int] = set()
    with client:
        check()
    assert 200 in statuses and 422 in statuses  # the fuzzing reached both valid and invalid requests


def test_disconnected_client_frees_its_slot(live):
    """A stream whose client goes away stops decoding: the model's queue depth returns to 0."""
    import re
    import time

    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": "rnn",
        "prompt": "soft",
        "max_tokens": 4096,
        "ignore_eos": True,
        "stream": True,
        "seed": 1,
    }
    with httpx.Client(base_url=live.url, headers=headers, timeout=30) as client:

        def metric(pattern: str) -> int:
            return int(re.search(pattern, client.get("/metrics").text).group(1))

        before = metric(r"aigc_generated_tokens_total (\d+)")
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 10
        while metric(r'aigc_queue_depth\{model="rnn"\} (\d+)') and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(r'aigc_queue_depth\{model="rnn"\} (\d+)') == 0
        assert metric(r"aigc_generated_tokens_total (\d+)") - before < 4096  # stopped long before max_tokens
