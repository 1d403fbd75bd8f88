"""Safety in the server: output moderation (block / flag) of completions, streaming chat, images and
music with the verdicts in the store, and the watermark detection / verify routes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from aigc.safety import watermark_text as W
from aigc.safety.moderation import Moderator, StreamGuard
from aigc.serve import settings as S
from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import write_image_run, write_text_run

# every output of the tiny model holds a letter or a CJK character; the prompts used are "?" only
ANY_TEXT = r"[^?\s]"


def _resize_run(run, side: int) -> None:
    """Make a tiny diffusion run produce side x side images (a UNet is size-agnostic; the run's
    config names its native size). An untrained model's pixels are ~all 0 or 255, where half of
    the mark's moves are clipped away: 128 px gives each key bit 32 votes, enough to read it."""
    from aigc.utils.io import atomic_write_json, read_json

    cfg = read_json(run / "config.json")
    cfg["model"]["image_size"] = side
    atomic_write_json(run / "config.json", cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from test_serve_music import write_music_run

    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny", block_size=256)
    write_image_run(root / "pix")
    write_image_run(root / "pix128")
    _resize_run(root / "pix128", 128)
    write_music_run(root / "bach")
    return root


@pytest.fixture(scope="module")
def client(root, tmp_path_factory):
    home = tmp_path_factory.mktemp("server")
    settings = Settings(models_dirs=[root], db=str(home / "aigc.db"), outputs_dir=home / "outputs")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def rules(client, tmp_path):
    """rules(policy) -> the app's moderator becomes the defaults + an "everything" category matching
    any output; the app's own rules come back afterwards (an override of app state)."""
    saved = client.app.state.moderator

    def use(policy: str, regex: str = ANY_TEXT) -> Moderator:
        f = tmp_path / f"{policy}.toml"
        f.write_text(
            f'[categories.everything]\npolicy = "{policy}"\nregex = {json.dumps([regex])}\n', encoding="utf-8"
        )
        client.app.state.moderator = Moderator.load(f)
        return client.app.state.moderator

    yield use
    client.app.state.moderator = saved


def generation(client, gid: int) -> dict:
    r = client.get(f"/v1/generations/{gid}")
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# ----------------------------------------------------------------------------- the guard itself


def test_stream_guard_holds_back_and_never_sends_a_blocked_phrase(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[categories.threat]\npolicy = "block"\nwords = ["kill you"]\n', encoding="utf-8")
    mod = Moderator.load(f, defaults=False)
    text = "a long and harmless opening line about the sea and the sky, " * 3 + "i will kill you now"
    guard, sent = StreamGuard(mod, holdback=16), ""
    for i in range(0, len(text), 3):  # deltas of 3 characters
        sent += guard.feed(text[i : i + 3])
    sent += guard.finish(text)
    assert guard.blocked and mod.verdict(guard.result) == "blocked:threat"
    assert "kill" not in sent and text.startswith(sent) and len(sent) > 100  # the clean start went out
    # clean text flows at once: only a possible start of a blocked phrase is held back
    guard = StreamGuard(mod, holdback=16)
    assert guard.feed(text[:50]) == text[:50]
    assert guard.feed(" and then I will ki") == " and then I will "  # "ki" could become "kill you"
    assert guard.feed("ss you") == "kiss you" and not guard.blocked
    assert guard.finish() == "" and mod.verdict(guard.result) is None
    # the look-back window starts at a word start: "skill you" cut as "kill you" is no match
    guard = StreamGuard(mod, holdback=0, window=3)
    assert guard.feed("xx skil") == "xx skil" and guard.feed("l you") == "l you" and not guard.blocked
    guard = StreamGuard(mod, holdback=16, window=3)  # ... while a real one is found across deltas
    assert guard.feed("xx kil") == "xx " and guard.feed("l you") == "" and guard.blocked
    # where partial matching cannot tell (casefolding changes the length: "ß" -> "ss"), the fixed
    # holdback applies
    guard = StreamGuard(mod, holdback=16)
    clean = "Die Straße ist lang und breit, wir gehen"
    assert guard.feed(clean) == clean[:-16] and guard.finish() == clean[-16:]


def test_stream_guard_finish_checks_again_only_what_no_feed_covered(tmp_path, monkeypatch):
    f = tmp_path / "r.toml"
    f.write_text('[categories.threat]\npolicy = "block"\nregex = ["kill .{0,40}you"]\n', encoding="utf-8")
    mod = Moderator.load(f, defaults=False)
    checked = []
    real = mod.check
    monkeypatch.setattr(
        mod, "check", lambda text, normalized=None: checked.append(text) or real(text, normalized)
    )
    guard = StreamGuard(mod, holdback=16)
    sent = guard.feed("a calm sea, ") + guard.feed("a calm sky")
    assert sent + guard.finish("a calm sea, a calm sky") == "a calm sea, a calm sky" and not guard.blocked
    assert checked == ["a calm sea, ", "a calm sea, a calm sky"]  # finish reused the last feed's check
    # the final text differs from what streamed: it is checked, and a blocked phrase there is caught
    guard, checked[:] = StreamGuard(mod, holdback=16), []
    guard.feed("a calm sea, ")
    assert guard.finish("a calm sea, i kill you") == "" and guard.blocked and len(checked) == 2
    # a text longer than the look-back window: the feeds saw only its end, so finish checks it whole
    guard, checked[:] = StreamGuard(mod, holdback=0, window=8), []
    guard.feed("kill and then some ")
    guard.feed("more words: you")
    assert not guard.blocked and guard.finish() == "" and guard.blocked
    assert checked[-1] == "kill and then some more words: you"


def test_verdict_combines_prompt_and_output_checks():
    mod = Moderator.load()
    flag, block, clean = mod.check("kill them all"), mod.check("how to make a bomb"), mod.check("the sea")
    assert mod.verdict(clean) is None and mod.verdict(flag) == "flagged:violence"
    assert mod.verdict(flag, block) == "blocked:illicit" and mod.verdict(None, clean) is None
    assert len(mod.verdict(*[mod.check("kill them all, you are worthless, subhuman")])) <= 64


# ----------------------------------------------------------------------------- text outputs


def test_completion_output_blocked_and_flagged(client, rules):
    body = {"model": "tiny", "prompt": "?", "max_tokens": 12, "seed": 3, "n": 2}
    plain = client.post("/v1/completions", json=body).json()
    assert all(c["moderation"] is None for c in plain["choices"])

    rules("block")
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    for choice, gid in zip(out["choices"], out["generation_ids"], strict=True):
        assert choice["text"] == "" and choice["finish_reason"] == "content_filter"
        assert choice["moderation"] == {"action": "block", "categories": ["everything"]}
        row = generation(client, gid)
        assert row["moderation"] == "blocked:everything" and row["output_text"] is None  # withheld there too

    rules("flag")
    out = client.post("/v1/completions", json=body).json()
    for choice, ref, gid in zip(out["choices"], plain["choices"], out["generation_ids"], strict=True):
        assert choice["text"] == ref["text"] and choice["finish_reason"] == ref["finish_reason"]  # delivered
        assert choice["moderation"] == {"action": "flag", "categories": ["everything"]}
        row = generation(client, gid)
        assert row["moderation"] == "flagged:everything" and row["output_text"] == ref["text"]


def test_streaming_completion_and_chat_stop_at_a_block(client, rules):
    body = {"model": "tiny", "prompt": "?", "max_tokens": 12, "seed": 5, "stream": True}
    rules("block")
    events = sse_events(client.post("/v1/completions", json=body).text)
    texts = [c["text"] for e in events for c in e["choices"]]
    assert "".join(texts) == ""  # the first letter blocks: nothing of it was sent (held back)
    [last] = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert last["finish_reason"] == "content_filter" and last["moderation"]["action"] == "block"
    assert generation(client, last["generation_id"])["moderation"] == "blocked:everything"

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "?"}], "max_tokens": 12, "seed": 5}
    events = sse_events(client.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    content = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    [last] = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert content == "" and last["finish_reason"] == "content_filter"
    row = generation(client, last["generation_id"])
    assert row["moderation"] == "blocked:everything" and row["output_text"] is None
    r = client.post("/v1/chat/completions", json=chat).json()
    assert (
        r["choices"][0]["message"]["content"] == "" and r["choices"][0]["finish_reason"] == "content_filter"
    )

    # flag: the stream delivers the whole reply (the held-back tail at the end), marked
    rules("flag")
    ref = client.post("/v1/chat/completions", json=chat).json()["choices"][0]
    events = sse_events(client.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    content = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    [last] = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert content == ref["message"]["content"] and content
    assert last["finish_reason"] == ref["finish_reason"] and last["moderation"]["action"] == "flag"
    assert generation(client, last["generation_id"])["output_text"] == content


def test_stream_sends_text_before_a_late_block(client, rules):
    """A block found late: text before it may have been sent, the blocked phrase never."""
    import re

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "?"}], "max_tokens": 150, "seed": 9}
    rules("flag")
    full = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert len(full) > 100
    # the shortest tail of the reply that occurs nowhere earlier in it
    tail = next(
        full[-k:] for k in range(3, 40) if not re.search(re.escape(full[-k:]), full[:-1], re.IGNORECASE)
    )
    rules("block", regex=re.escape(tail))  # they arrive last: the stream stops before them
    events = sse_events(client.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    content = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    [last] = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert last["finish_reason"] == "content_filter"
    assert full.startswith(content) and len(content) <= len(full) - len(tail)


def test_blocked_prompts_are_recorded_and_filtered(client, rules):
    for path, body in [
        ("/v1/completions", {"model": "tiny", "prompt": "how to make a bomb", "max_tokens": 3}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "cook meth"}]}),
        ("/v1/images/generations", {"model": "pix", "prompt": "build a bomb", "n": 1}),
        ("/v1/images/generations", {"model": "nope", "prompt": "build a bomb", "n": 1}),
        ("/v1/jobs", {"type": "images.generations", "input": {"model": "pix", "prompt": "build a bomb"}}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked", r.text
    blocked = client.get("/v1/generations", params={"moderation": "blocked", "limit": 100}).json()["data"]
    by_prompt = {g["prompt"]: g for g in blocked}
    assert by_prompt["how to make a bomb"]["moderation"] == "blocked:illicit"
    assert by_prompt["how to make a bomb"]["output_text"] is None
    assert by_prompt["cook meth"]["kind"] == "text" and by_prompt["build a bomb"]["kind"] == "image"
    assert sorted(g["model"] for g in blocked if g["prompt"] == "build a bomb") == ["nope", "pix", "pix"]
    assert all(g["moderation"].startswith("blocked:") for g in blocked)
    flagged = client.get("/v1/generations", params={"moderation": "flagged", "limit": 100}).json()["data"]
    assert all(g["moderation"].startswith("flagged:") for g in flagged)
    assert client.get("/v1/generations", params={"moderation": "maybe"}).status_code == 422


def test_images_and_music_prompts(client, rules):
    r = client.post("/v1/images/generations", json={"model": "pix", "n": 1, "seed": 1})
    assert r.status_code == 200 and r.json()["data"][0]["moderation"] is None
    assert generation(client, r.json()["generation_ids"][0])["moderation"] is None
    # the music "prompt" is its key, meter and style: a rule on a style word flags it
    rules("flag", regex=r"\bchorale\b")
    r = client.post("/v1/audio/music", json={"model": "bach", "bars": 1, "seed": 1, "style": "chorale"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["moderation"] == {"action": "flag", "categories": ["everything"]}
    assert generation(client, r.json()["generation_ids"][0])["moderation"] == "flagged:everything"
    rules("block", regex=r"\bchorale\b")
    r = client.post("/v1/audio/music", json={"model": "bach", "bars": 1, "seed": 1, "style": "chorale"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked"


# ----------------------------------------------------------------------------- detection routes


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _texture(seed: int = 0, side: int = 64):
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(60, 200, (side // 8, side // 8, 3)).repeat(8, 0).repeat(8, 1)
    return Image.fromarray((a + rng.integers(-20, 20, a.shape)).clip(0, 255).astype(np.uint8))


def test_detect_image_route(client, monkeypatch):
    from aigc.safety.watermark_image import embed

    monkeypatch.setenv(W.KEY_ENV, "server key")
    marked = _png(embed(_texture(), W.load_config()))
    other = _png(embed(_texture(), W.WatermarkConfig(key="someone else's key")))
    clean = _png(_texture())
    r = client.post("/v1/watermark/detect", files={"file": ("m.png", marked, "image/png")})
    assert r.status_code == 200, r.text
    d = r.json()
    assert (
        d["detected"]
        and d["key_id_match"]
        and d["bit_accuracy"] == 1.0
        and d["key_id"] == W.load_config().key_id
    )
    d = client.post("/v1/watermark/detect", json={"image": base64.b64encode(marked).decode()}).json()
    assert d["detected"] and d["kind"] == "image"
    for data in (clean, other):  # no mark, or another deployment's: a clean "not detected" with the score
        d = client.post("/v1/watermark/detect", files={"file": ("x.png", data, "image/png")}).json()
        assert d["detected"] is False and d["status"] == "not detected" and d["bit_accuracy"] < 29 / 32
    # corrupted / truncated / not an image: 400; too big: 413 with a detail
    for bad in (marked[: len(marked) // 2], marked[:100] + b"\0" * 50 + marked[150:], b"hello"):
        r = client.post("/v1/watermark/detect", files={"file": ("bad.png", bad, "image/png")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    r = client.post("/v1/watermark/detect", json={"image": "not base64!"})
    assert r.status_code == 400
    huge = b"\x89PNG" + b"\0" * (S.MAX_UPLOAD_BYTES + 10)
    r = client.post("/v1/watermark/detect", files={"file": ("huge.png", huge, "image/png")})
    assert r.status_code == 413 and "request body over" in r.json()["detail"]
    from PIL import Image

    buf = io.BytesIO()  # small file, far too many pixels (a decompression bomb)
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    r = client.post("/v1/watermark/detect", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_image_watermark_per_request(client, monkeypatch):
    monkeypatch.setenv(W.KEY_ENV, "server key")
    body = {"model": "pix128", "n": 2, "seed": 1, "steps": 2}
    marked = client.post("/v1/images/generations", json={**body, "watermark": True}).json()
    plain = client.post("/v1/images/generations", json=body).json()
    assert marked["parameters"]["watermark_key_id"] == W.load_config().key_id
    for m, p in zip(marked["data"], plain["data"], strict=True):
        d = client.post("/v1/watermark/detect", json={"image": m["b64_json"]}).json()
        assert d["detected"] and d["matched_bits"] == 32
        d = client.post("/v1/watermark/detect", json={"image": p["b64_json"]}).json()
        assert not d["detected"]
    r = client.post("/v1/images/generations", json={"model": "pix", "n": 1, "watermark": True})
    assert r.status_code == 400 and "24x24" in r.json()["detail"]  # 8 px: too small to hold the mark


def test_detect_text_route(client, root, monkeypatch):
    from aigc.generation import load_generator

    monkeypatch.setenv(W.KEY_ENV, "server key")
    body = {"model": "tiny", "prompt": "", "max_tokens": 150, "seed": 4, "temperature": 1.0}
    marked = client.post("/v1/completions", json={**body, "watermark": True}).json()["choices"][0]["text"]
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    d = client.post("/v1/watermark/detect", json={"text": marked, "model": "tiny"}).json()
    gen = load_generator(root / "tiny")
    ref = W.detect_text(marked, gen, gen.decoder.vocab_size, W.load_config())
    assert (
        d["detected"]
        and d["z_score"] == pytest.approx(ref.z_score)
        and d["p_value"] == pytest.approx(ref.p_value)
    )
    assert d["tokens_scored"] == ref.scored and d["green_fraction"] == pytest.approx(ref.green_fraction)
    d = client.post("/v1/watermark/detect", json={"text": plain, "model": "tiny"}).json()
    assert not d["detected"] and d["z_score"] < 4
    monkeypatch.setenv(W.KEY_ENV, "a different deployment")  # wrong key: not detected, no crash
    d = client.post("/v1/watermark/detect", json={"text": marked, "model": "tiny"}).json()
    assert not d["detected"]
    for bad, status in [({"text": "x"}, 422), ({"text": "x", "image": "eA==", "model": "tiny"}, 422),
                        ({"text": "x", "model": "nope"}, 404), ({"text": "x", "model": "pix"}, 400),
                        ({"text": "x", "model": "tiny", "extra": 1}, 422)]:  # fmt: skip
        r = client.post("/v1/watermark/detect", json=bad)
        assert r.status_code == status, (bad, r.text)


def test_verify_route(client, monkeypatch, tmp_path):
    from aigc.safety.provenance import make_record, save_png
    from aigc.safety.watermark_image import embed

    monkeypatch.setenv(W.KEY_ENV, "server key")
    cfg = W.load_config()
    record = make_record("image", "pix@1", {"steps": 2}, seed=7, watermark_key_id=cfg.key_id)
    save_png(embed(_texture(), cfg), tmp_path / "out.png", record)
    r = client.post(
        "/v1/verify", files={"file": ("out.png", (tmp_path / "out.png").read_bytes(), "image/png")}
    )
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["file"] == "out.png" and rep["type"] == "png" and rep["metadata"]["seed"] == 7
    assert rep["watermark"]["detected"] and rep["c2pa"] in ("none", "not checked")
    # text: scored when a served model is named
    r = client.post(
        "/v1/verify", files={"file": ("t.txt", b"ROMEO: But soft", "text/plain")}, data={"model": "tiny"}
    )
    assert r.status_code == 200 and r.json()["watermark"]["status"] == "not detected"
    r = client.post("/v1/verify", files={"file": ("t.txt", b"ROMEO", "text/plain")})
    assert "not tested" in r.json()["watermark"]["status"]
    bad = (tmp_path / "out.png").read_bytes()[:300]
    r = client.post("/v1/verify", files={"file": ("cut.png", bad, "image/png")})
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    assert client.post("/v1/verify", json={"x": 1}).status_code == 400
    r = client.post("/v1/verify", files={"file": ("t.txt", b"x", "text/plain")}, data={"model": "/etc"})
    assert r.status_code == 404  # a model is a served id, never a path
