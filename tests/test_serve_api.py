"""The HTTP API through FastAPI's TestClient: OpenAI shapes, errors, auth, limits, registry, metrics."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from aigc.generation import load_generator
from aigc.serve import settings as S
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import models_dir, write_text_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(Settings(models_dirs=[root]))) as c:
        yield c


def test_models_list_and_versions(client):
    data = client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"tiny", "rnn", "story", "pix"}
    assert by_id["story"]["versions"] == ["story@1", "story@2"] and by_id["pix"]["kind"] == "image"
    card = client.get("/v1/models/story").json()
    assert (card["id"], card["root"]) == ("story", "story@2")  # plain name: newest version
    assert client.get("/v1/models/nope").status_code == 404


def test_completion_equals_text_generator(client, root):
    """Same seed, same request -> same text via the server as via TextGenerator."""
    body = {
        "model": "tiny",
        "prompt": "ROMEO:",
        "max_tokens": 20,
        "seed": 11,
        "temperature": 0.8,
        "top_k": 10,
        "n": 2,
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    refs = load_generator(root / "tiny").generate(
        "ROMEO:", max_new_tokens=20, seed=11, temperature=0.8, top_k=10, n=2
    )
    assert [c["text"] for c in out["choices"]] == [ref.text for ref in refs]
    assert [c["seed"] for c in out["choices"]] == [11, 12] and out["seed"] == 11
    assert out["parameters"]["temperature"] == 0.8 and out["parameters"]["seed"] == 11
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 40, "total_tokens": 46}
    # several prompts: OpenAI's order (prompt-major), echo, logprobs
    r = client.post("/v1/completions", json={"model": "rnn", "prompt": ["soft", "light"], "max_tokens": 4,
                                             "temperature": 0, "echo": True, "logprobs": 2})  # fmt: skip
    ch = r.json()["choices"]
    assert ch[0]["text"].startswith("soft") and ch[1]["text"].startswith("light")
    # with echo, the logprobs cover the prompt's tokens too (the first one has none)
    lp = ch[0]["logprobs"]
    assert len(lp["tokens"]) == 4 + 4 and lp["top_logprobs"][0] is None and len(lp["top_logprobs"][4]) == 2


def test_chat_and_streaming(client, root):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "soft"}]
    body = {"model": "story@1", "messages": msgs, "max_tokens": 15, "seed": 4}
    full = client.post("/v1/chat/completions", json=body).json()
    gen = load_generator(root / "story" / "1")
    [ref] = gen.generate(gen.chat_prompt(msgs, 15), max_new_tokens=15, seed=4, stop=gen.chat_stops())
    assert full["choices"][0]["message"]["content"] == ref.text.lstrip()
    assert full["model"] == "story@1" and full["object"] == "chat.completion"
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == full["usage"] and all(c["seed"] == 4 for c in chunks)
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope", "prompt": "a"}, 404, ["not found", "tiny", "story@2"]),
        ({"model": "../tiny", "prompt": "a"}, 422, ["model"]),
        (
            {"model": "tiny", "prompt": "a", "max_tokens": S.MAX_TOKENS + 1},
            400,
            ["max_tokens", str(S.MAX_TOKENS)],
        ),
        ({"model": "tiny", "prompt": "a", "n": S.MAX_N + 1}, 400, ["n", str(S.MAX_N)]),
        ({"model": "tiny", "prompt": "a", "temperature": "hot"}, 422, ["temperature"]),
        ({"model": "tiny", "prompt": "a", "bogus": 1}, 422, ["bogus"]),
        ({"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}, 422, ["logit_bias"]),
        ({"model": "pix", "prompt": "a"}, 400, ["image model"]),
        ({"model": "tiny", "prompt": "Zebra"}, 400, ["'Z'", "vocabulary"]),  # char not in the tokenizer
        ({"model": "tiny", "prompt": "a", "stream": True, "logprobs": 1}, 400, ["logprobs"]),
    ],
)
def test_bad_requests(client, body, status, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["detail"] == err["error"]["message"] and "Traceback" not in r.text
    for w in words:
        assert w in err["detail"]


def test_malformed_json_body_size_and_long_prompt(client):
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    big = "a" * (S.MAX_BODY_BYTES + 10)
    r = client.post("/v1/completions", content=json.dumps({"model": "tiny", "prompt": big}),
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413

    def chunked():  # no Content-Length: counted while read
        yield from [b"x" * 50_000] * (S.MAX_BODY_BYTES // 50_000 + 1)

    r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "smaller" in r.json()["detail"]
    # over the context (64): the prompt's tail is kept, and the response says so
    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "soft " * 40, "max_tokens": 5, "seed": 1}
    )
    assert r.status_code == 200 and "kept the last" in r.json()["warnings"][0]


def test_images_b64_and_url(client):
    from PIL import Image

    body = {"model": "pix", "n": 2, "seed": 3, "steps": 2, "sampler": "ddim", "size": "8x8"}
    a = client.post("/v1/images/generations", json=body).json()
    b = client.post("/v1/images/generations", json={**body, "response_format": "url"}).json()
    assert len(a["data"]) == 2 and a["seed"] == 3 and a["parameters"]["steps"] == 2
    img_a = Image.open(io.BytesIO(base64.b64decode(a["data"][0]["b64_json"])))
    assert img_a.size == (8, 8) and json.loads(img_a.text["parameters"])["seed"] == 3  # params in the PNG
    url = b["data"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    img_b = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img_b.tobytes() == img_a.tobytes()  # same seed, same pixels
    r = client.post("/v1/images/generations", json={**body, "size": "16x16"})
    assert r.status_code == 400 and "8x8" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={**body, "steps": S.MAX_STEPS + 1})
    assert r.status_code == 400 and "steps" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={**body, "n": 1, "sampler": "dpm-sde"})
    assert r.status_code == 200 and r.json()["data"][0]["parameters"]["sampler"] == "dpm-sde"


def test_health_metrics_and_docs_offline(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ("aigc_requests_total", "aigc_queue_depth", "aigc_time_to_first_token_seconds_count",
                 "aigc_generated_tokens_total", "aigc_model_loads_total", "aigc_queue_wait_seconds"):  # fmt: skip
        assert name in text
    assert 'aigc_model_loads_total{model="tiny"} 1' in text

    # counted by route template and status, streamed responses and unknown paths included
    def count(line: str) -> int:
        m = re.search(re.escape(f"aigc_requests_total{{{line}}} ") + r"(\d+)", client.get("/metrics").text)
        return int(m.group(1)) if m else 0

    ok, missing = (
        'method="POST",route="/v1/completions",status="200"',
        'method="GET",route="unmatched",status="404"',
    )
    before = count(ok), count(missing)
    client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3, "stream": True})
    client.get("/no/such/path")
    assert (count(ok), count(missing)) == (before[0] + 1, before[1] + 1)
    docs = client.get("/docs").text
    assert "openapi.json" in docs and "cdn" not in docs.lower()
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_api_keys_cors_and_rate_limits(tmp_path, root):
    keys = tmp_path / "keys"
    keys.write_text(f"# team\n{hash_key('s3cret')}\n")
    settings = Settings(models_dirs=[root], api_keys_file=keys, cors_origins=["http://studio.local"],
                        max_inflight_per_key=0)  # fmt: skip
    with TestClient(create_app(settings)) as c:
        assert c.get("/health").status_code == 200  # open to load balancers
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert (
            c.get("/openapi.json").status_code == 401 and c.get("/docs").status_code == 200
        )  # page: no data
        assert (
            "/v1/completions"
            in c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()["paths"]
        )
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=auth)
        assert r.status_code == 429 and r.headers["Retry-After"] == str(S.RETRY_AFTER_S)
        ok = c.options(
            "/v1/models", headers={"Origin": "http://studio.local", "Access-Control-Request-Method": "GET"}
        )
        assert ok.headers["access-control-allow-origin"] == "http://studio.local"
        assert "access-control-allow-credentials" not in ok.headers
        bad = c.get("/v1/models", headers={**auth, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in bad.headers
    with TestClient(create_app(Settings(models_dirs=[root], max_queue=0))) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
        assert r.status_code == 503 and "Retry-After" in r.headers
    keys.write_text("s3cret\n")
    with pytest.raises(Exception, match="not a hashed key"):
        create_app(Settings(models_dirs=[root], api_keys_file=keys))


def test_hot_new_version_and_memory_budget(tmp_path):
    root = tmp_path / "models"
    write_text_run(root / "poem" / "1", seed=1)
    write_text_run(root / "other", seed=3)
    body = {"model": "poem", "prompt": "soft", "max_tokens": 12, "seed": 5, "temperature": 2.0}
    with TestClient(create_app(Settings(models_dirs=[root], memory_budget_bytes=1))) as c:
        one = c.post("/v1/completions", json=body).json()
        assert one["model"] == "poem@1"
        write_text_run(root / "poem" / "2", seed=2)
        time.sleep(S.RESCAN_INTERVAL_S + 0.1)
        two = c.post("/v1/completions", json=body).json()
        assert two["model"] == "poem@2" and two["choices"][0]["text"] != one["choices"][0]["text"]
        assert c.post("/v1/completions", json={**body, "model": "poem@1"}).json()["choices"] == one["choices"]
        c.post("/v1/completions", json={**body, "model": "other"})
        # a budget of 1 byte keeps only the model in use loaded
        assert c.get("/health").json()["models_loaded"] == ["other"]
        shutil.rmtree(root / "poem" / "2")
        time.sleep(S.RESCAN_INTERVAL_S + 0.1)
        assert c.post("/v1/completions", json=body).json()["model"] == "poem@1"


def test_jobs_progress_events_and_cancel(client):
    r = client.post(
        "/v1/jobs",
        json={"type": "images.generations", "input": {"model": "pix", "n": 3, "seed": 5, "steps": 2}},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["progress"]["total"] == 3
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[-1]["status"] == "succeeded" and events[-1]["step"] == 3
    assert any("preview" in e for e in events) and all(e["total"] == 3 for e in events)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert [d["seed"] for d in done["result"]["data"]] == [5, 6, 7]
    # image i of a job is the single image of a plain request with seed + i
    one = client.post("/v1/images/generations", json={"model": "pix", "n": 1, "seed": 6, "steps": 2}).json()
    from PIL import Image

    def pixels(b64):
        return Image.open(io.BytesIO(base64.b64decode(b64))).tobytes()

    assert pixels(done["result"]["data"][1]["b64_json"]) == pixels(one["data"][0]["b64_json"])
    # cancel: a finished job stays finished; a long one stops before its next image
    long = client.post(
        "/v1/jobs", json={"type": "images.generations", "input": {"model": "pix", "n": 8, "steps": 50}}
    ).json()
    cancelled = client.post(f"/v1/jobs/{long['id']}/cancel").json()
    assert cancelled["status"] in ("cancelled", "running")
    with client.stream("GET", f"/v1/jobs/{long['id']}/events") as s:
        last = [ln for ln in s.iter_lines() if ln][-2]
    assert json.loads(last[6:])["status"] == "cancelled" and json.loads(last[6:])["step"] < 8
    assert client.get("/v1/jobs/job-" + "0" * 24).status_code == 404
    assert client.get("/v1/jobs/../etc").status_code in (404, 422)
    r = client.post("/v1/jobs", json={"type": "images.generations", "input": {"model": "nope"}})
    assert r.status_code == 404


def test_cli_serve_help_and_refusals(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli("serve", "--help")
    assert code == 0 and all(f in out for f in ("--models", "--host", "--port", "--api-key-file", "--cors"))
    code, _, err = run_cli("serve", "--models", str(tmp_path), "--host", "0.0.0.0")
    assert code == 1 and "--api-key-file" in err
    code, _, err = run_cli("serve", "--models", str(tmp_path / "missing"))
    assert code == 1 and "not a directory" in err


def test_hf_models_from_config_batch_without_joining(tmp_path, root):
    """hf: entries serve transformers models; their rows start batches together (no mid-run join)."""
    import asyncio

    import httpx

    from aigc.export import export_hf
    from aigc.registry import load_artifact

    art = load_artifact(root / "tiny")
    hf_dir = export_hf(art.model, art.tokenizer, tmp_path / "hf")
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models": {"tiny-hf": f"hf:{hf_dir}"}}))
    app = create_app(Settings(models_dirs=[tmp_path / "none"], models_config=cfg))
    bodies = [{"model": "tiny-hf", "prompt": "soft", "max_tokens": 6 + i, "seed": i} for i in range(4)]

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    with TestClient(app):  # lifespan
        rs = asyncio.run(run())
    gen = load_generator(f"hf:{hf_dir}")
    for b, r in zip(bodies, rs, strict=True):
        assert r.status_code == 200, r.text
        [ref] = gen.generate("soft", max_new_tokens=b["max_tokens"], seed=b["seed"])
        assert r.json()["choices"][0]["text"] == ref.text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"x": "/etc"}}))
    with pytest.raises(Exception, match="hf:"):
        create_app(Settings(models_dirs=[], models_config=bad))


def test_a_stream_failing_before_its_first_chunk_is_an_http_error(root, monkeypatch):
    """A stream's headers go with its first chunk, so rows that time out before they produce
    anything (here: rows that never run) give a 504 with its detail, not a 200 and a cut stream."""
    from aigc.serve.batching import Row, Scheduler, Ticket

    def held(self, prompt, params, emit):  # rows queued forever: the scheduler never starts them
        return Ticket([Row(prompt, [0], params, 0, emit)])

    with TestClient(create_app(Settings(models_dirs=[root], request_timeout_s=0.2))) as c:
        monkeypatch.setattr(Scheduler, "submit", held)
        r = c.post(
            "/v1/completions", json={"model": "rnn", "prompt": "soft", "max_tokens": 4, "stream": True}
        )
        assert r.status_code == 504 and "limit" in r.json()["detail"]
        assert r.headers["content-type"].startswith("application/json")


def test_streamed_text_requests_take_the_lane_and_answer_as_the_fastapi_routes(tmp_path, root, monkeypatch):
    """Streamed completions and chats skip FastAPI's routing (serve/lane.py); what is not streamed,
    or does not validate, goes on to the FastAPI route. Both check the key, count in /metrics and
    answer errors the same way."""
    from aigc.serve.lane import StreamLane

    passed = []
    orig = StreamLane._pass

    async def counting_pass(self, scope, raw, receive, send):
        passed.append(self.path)
        return await orig(self, scope, raw, receive, send)

    monkeypatch.setattr(StreamLane, "_pass", counting_pass)
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key('s3cret')}\n")
    auth = {"Authorization": "Bearer s3cret"}
    body = {"model": "tiny", "prompt": "soft", "max_tokens": 8, "seed": 3}

    def streamed(c, path, b, headers=auth):
        with c.stream("POST", path, json={**b, "stream": True}, headers=headers) as r:
            return r.status_code, r.headers["content-type"], "".join(r.iter_text())

    with TestClient(create_app(Settings(models_dirs=[root], api_keys_file=keys))) as c:
        # no key, a wrong key: 401 from the lane as from the routes
        for headers in ({}, {"Authorization": "Bearer nope"}):
            status, ctype, text = streamed(c, "/v1/completions", body, headers)
            assert (
                status == 401 and ctype.startswith("application/json") and "key" in json.loads(text)["detail"]
            )
        assert passed == []
        status, ctype, text = streamed(c, "/v1/completions", body)
        assert status == 200 and ctype.startswith("text/event-stream") and passed == []
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        full = c.post("/v1/completions", json=body, headers=auth)  # not streamed: the FastAPI route
        assert passed == ["/v1/completions"] and full.status_code == 200
        assert "".join(ch["text"] for x in chunks for ch in x["choices"]) == full.json()["choices"][0]["text"]
        assert text.endswith("data: [DONE]\n\n")
        # chat, streamed through the lane
        msgs = {
            "model": "story",
            "messages": [{"role": "user", "content": "soft"}],
            "max_tokens": 5,
            "seed": 1,
        }
        status, _, text = streamed(c, "/v1/chat/completions", msgs)
        assert status == 200 and '"chat.completion.chunk"' in text and passed == ["/v1/completions"]
        # errors: raised by the endpoint in the lane (404, 400) or by validation on the route (400, 422)
        status, _, text = streamed(c, "/v1/completions", {**body, "model": "nope"})
        assert status == 404 and "tiny" in json.loads(text)["detail"]
        status, _, text = streamed(c, "/v1/completions", {**body, "logprobs": 1})
        assert status == 400 and "logprobs" in json.loads(text)["detail"]
        status, _, text = streamed(c, "/v1/completions", {**body, "max_tokens": S.MAX_TOKENS + 1})
        assert status == 400 and str(S.MAX_TOKENS) in json.loads(text)["detail"]
        status, _, text = streamed(c, "/v1/chat/completions", {**msgs, "messages": "hi"})
        assert status == 422 and "messages" in json.loads(text)["detail"]
        assert passed == ["/v1/completions", "/v1/completions", "/v1/chat/completions"]
        # a JSON body sent as text/plain (what a cross-site form can send) is FastAPI's to refuse
        r = c.post("/v1/completions", content=json.dumps({**body, "stream": True}),
                   headers={**auth, "content-type": "text/plain"})  # fmt: skip
        assert r.status_code == 415 and passed[-1] == "/v1/completions" and len(passed) == 4
        metrics = c.get("/metrics", headers=auth).text
        assert 'method="POST",route="/v1/completions",status="200"} 2' in metrics
        assert 'method="POST",route="/v1/chat/completions",status="422"} 1' in metrics


def test_request_timeout_cancels(root):
    with TestClient(create_app(Settings(models_dirs=[root], request_timeout_s=0.05))) as c:
        body = {"model": "rnn", "prompt": "soft", "max_tokens": S.MAX_TOKENS, "ignore_eos": True}
        c.post("/v1/completions", json={**body, "max_tokens": 1})  # load the model first
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and "limit" in r.json()["detail"]
        deadline = time.monotonic() + 10
        while c.app.state.registry.queue_depth()["rnn"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.app.state.registry.queue_depth()["rnn"] == 0  # the rows were cancelled


def test_response_ids_are_unique_and_not_repeated_in_a_forked_child():
    import os

    from aigc.serve.routes.common import new_id

    ids = {new_id("cmpl") for _ in range(2000)}
    assert len(ids) == 2000 and all(re.fullmatch(r"cmpl-[0-9a-f]{24}", i) for i in ids)
    r, w = os.pipe()
    pid = os.fork()  # (uvicorn --workers forks too): the child's ids are its own
    if pid == 0:
        os.write(w, new_id("x").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 100).decode() != new_id("x")
