"""The web studio in a real browser: Playwright (Python) driving Debian's chromium headless against
a live server on loopback with tiny models. Screenshots go to test-output/ (gitignored).

Skips when chromium or playwright is absent (`.ci/run` installs chromium; playwright is in the
dev extra). Never `playwright install`: the system chromium is the browser."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from aigc.feedback.blobs import Blobs
from aigc.feedback.store import Store
from aigc.generation import load_generator
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_image_run, write_text_run

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "studio"
KEY = "studio-key"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    write_text_run(root / "story" / "1", seed=1)
    write_image_run(root / "pix")
    home = tmp_path_factory.mktemp("home")
    keys = home / "keys.txt"
    keys.write_text(hash_key(KEY) + "\n")
    settings = Settings(
        models_dirs=[root], api_keys_file=keys, db=str(home / "aigc.db"), outputs_dir=home / "out"
    )
    with LiveServer(create_app(settings)) as live:
        live.root, live.db, live.outputs = root, home / "aigc.db", home / "out"
        yield live


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def pixels(png: bytes) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).tobytes()


def store(server) -> Store:
    return Store.open(str(server.db))


def test_studio_end_to_end(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append((r.url, r.post_data or "")))
    page.goto(server.url + "/")
    # first paint on loopback under 1 s
    fcp = page.evaluate(
        "() => new Promise(r => { const e = performance.getEntriesByName('first-contentful-paint');"
        " if (e.length) r(e[0].startTime); else new PerformanceObserver(l => r(l.getEntries()[0].startTime))"
        ".observe({type: 'paint', buffered: true}); })"
    )
    assert fcp < 1000, f"first contentful paint {fcp:.0f} ms"
    print(f"\nstudio first contentful paint: {fcp:.0f} ms")
    # no key yet: the server says 401 and the page asks for the key
    page.wait_for_selector("#status.error")
    assert "API key" in page.inner_text("#status")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.querySelectorAll('#text-model option').length >= 2")

    # 1. text, streamed: the same text as the library gives for the seed
    page.select_option("#text-model", "tiny")
    page.fill("#text-prompt", "ROMEO:")
    page.fill("#text-params [name=max_tokens]", "24")
    page.fill("#text-params [name=temperature]", "0.8")
    page.fill("#text-params [name=seed]", "5")
    page.check("#text-params [name=seed_lock]")
    page.click("#text-go")
    page.wait_for_function("document.querySelector('#text-meta').textContent.startsWith('#')")
    [ref] = load_generator(server.root / "tiny").generate(
        "ROMEO:", max_new_tokens=24, seed=5, temperature=0.8
    )
    assert page.inner_text("#text-output .gen") == ref.text
    assert any(u.endswith("/v1/completions") and '"stream":true' in body for u, body in requests)
    gid = int(page.inner_text("#text-meta").split()[0][1:])
    with store(server) as s:
        row = s.get_generation(gid)
    assert row["output_text"] == ref.text and row["seed"] == 5

    # 2. rate it: thumb up and 4 stars
    page.click("#text-actions .thumb.up")
    page.wait_for_selector("#text-actions .note:has-text('+1')")
    page.click("#text-actions .star[data-v='4']")
    page.wait_for_selector("#text-actions .note:has-text('4★')")
    with store(server) as s:
        assert s.get_generation(gid)["rating_count"] == 2
        assert {(r["kind"], r["value"]) for r in s.list_ratings(generation_id=gid)["data"]} == {
            ("thumb", 1),
            ("stars", 4),
        }
    shot(page, "1-text")

    # 3. images
    page.click("#tabs [data-tab=image]")
    page.select_option("#image-model", "pix")
    page.fill("#image-params [name=steps]", "2")
    page.fill("#image-params [name=n]", "2")
    page.click("#image-go")
    page.wait_for_function("document.querySelectorAll('#image-results figure img').length == 2")
    with store(server) as s:
        assert len(s.list_generations(kind="image")["data"]) == 2
    assert any(u.endswith("/events") and "/v1/jobs/" in u for u, _ in requests)  # progress over SSE
    shot(page, "2-image")

    # 4. side-by-side compare, blind: pick the first card
    page.click("#tabs [data-tab=compare]")
    page.select_option("#cmp-model-a", "tiny")
    page.select_option("#cmp-model-b", "story")
    page.fill("#cmp-prompt", "soft")
    page.click("#cmp-go")
    page.wait_for_function("document.querySelectorAll('#cmp-pair .side').length == 2")
    assert page.inner_text("#cmp-pair .side .who") == "hidden model"  # blind until the pick
    winner = int(page.get_attribute("#cmp-pair .side >> nth=0", "data-gid"))
    page.click("#cmp-pair .side >> nth=0 >> .pick")
    page.wait_for_function("document.querySelector('#cmp-pair .pick').disabled")
    with store(server) as s:
        [cmp] = s.list_comparisons()["data"]
    assert cmp["winner"] == winner and winner in (cmp["a"], cmp["b"])
    assert page.inner_text("#cmp-pair .side >> nth=0 >> .who").endswith("winner")
    shot(page, "3-compare")

    # 5. reload: the key is remembered, the history survives, filters work
    page.reload()
    page.click("#tabs [data-tab=history]")
    page.wait_for_selector(f"#history-list [data-id='{gid}']")
    assert page.locator("#history-list .hist").count() == 5  # text + 2 images + 2 compared samples
    page.wait_for_function(
        "[...document.querySelectorAll('#history-list img')].every(i => i.complete && i.src)"
    )
    shot(page, "4-history-all")
    # an image regenerates exactly: the same image as the stored one
    with store(server) as s:
        img_row = s.list_generations(kind="image", limit=1)["data"][0]
    png = Blobs(server.outputs).get(img_row["output_ref"])
    page.click(f"#history-list [data-id='{img_row['id']}'] .regenerate")
    page.wait_for_selector("#image-results figure img")
    src = page.get_attribute("#image-results figure img", "src")
    # same pixels (the PNG's text chunk differs: it records the time it was made)
    assert pixels(base64.b64decode(src.split(",", 1)[1])) == pixels(png)
    page.click("#tabs [data-tab=history]")
    models = page.eval_on_selector_all("#history-filters [name=model] option", "os => os.map(o => o.value)")
    assert "story@1" in models and "story" not in models  # rows name the exact version
    page.fill("#history-filters [name=q]", "ROMEO")
    page.select_option("#history-filters [name=kind]", "text")
    page.click("#history-filters button")
    page.wait_for_function("document.querySelectorAll('#history-list .hist').length == 1")
    shot(page, "4-history")

    # 6. restore settings, then regenerate exactly: the same text again
    card = f"#history-list [data-id='{gid}']"
    page.eval_on_selector("#text-prompt", "e => e.value = 'something else'")  # (tab not shown)
    page.click(f"{card} .restore")
    assert page.is_visible("#tab-text")
    assert (
        page.input_value("#text-prompt") == "ROMEO:" and page.input_value("#text-params [name=seed]") == "5"
    )
    assert (
        page.input_value("#text-model") == "tiny"
        and page.input_value("#text-params [name=max_tokens]") == "24"
    )
    page.click("#tabs [data-tab=history]")
    page.wait_for_selector(card)
    page.click(f"{card} .regenerate")
    page.wait_for_function(f"!document.querySelector('#text-meta').textContent.startsWith('#{gid} ')"
                           " && document.querySelector('#text-meta').textContent.startsWith('#')")  # fmt: skip
    assert page.inner_text("#text-output .gen") == ref.text

    # 7. a chat generation made through the API regenerates exactly through the chat route
    import httpx

    chat = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "tiny", "messages": [{"role": "user", "content": "soft"}], "max_tokens": 12, "seed": 9,
    }).json()  # fmt: skip
    cid = chat["generation_ids"][0]
    page.click("#tabs [data-tab=history]")
    page.fill("#history-filters [name=q]", "")
    page.click("#history-filters button")
    page.wait_for_selector(f"#history-list [data-id='{cid}']")
    before = page.inner_text("#text-meta")
    page.click(f"#history-list [data-id='{cid}'] .regenerate")
    page.wait_for_function(
        "m => { const t = document.querySelector('#text-meta').textContent; return t.startsWith('#') && t !== m; }",
        arg=before,
    )
    assert page.inner_text("#text-output .gen") == chat["choices"][0]["message"]["content"]

    # 7. 中文
    page.click("#lang")
    assert page.inner_text("#tabs [data-tab=text]") == "文本"
    shot(page, "5-zh")
    page.close()


def test_studio_phone_width(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, device_scale_factor=2)
    page.goto(server.url + "/")
    page.evaluate(f"localStorage.setItem('aigc.key', {KEY!r})")
    page.reload()
    page.wait_for_function("document.querySelectorAll('#text-model option').length >= 2")
    # nothing wider than the screen: no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "6-phone")
    page.close()


def test_studio_music_tab(browser, tmp_path_factory):
    """The Music tab appears with the music route, generates a piece, plays it and shows its roll."""
    pytest.importorskip("music21")
    from aigc.data.music import prepare_music
    from aigc.training.music import train_music
    from test_music_generate import STEPS, TINY

    root = tmp_path_factory.mktemp("music-models")
    prepare_music("music21:bach", root / "data", overrides=["limit=4"])
    train_music(
        "music", root / "data", root / "models" / "chorale", overrides=TINY, max_steps=STEPS, progress=False
    )
    home = tmp_path_factory.mktemp("music-home")
    (home / "keys.txt").write_text(hash_key(KEY) + "\n")
    settings = Settings(
        models_dirs=[root / "models"], api_keys_file=home / "keys.txt", db=str(home / "aigc.db"),
        outputs_dir=home / "out",
    )  # fmt: skip
    with LiveServer(create_app(settings)) as live:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(live.url + "/")
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")
        page.wait_for_selector("#tabs [data-tab=music]:not([hidden])")
        page.click("#tabs [data-tab=music]")
        page.wait_for_function("document.querySelectorAll('#music-model option').length >= 1")
        page.select_option("#music-model", "chorale")
        page.fill("#music-params [name=bars]", "2")
        page.click("#music-go")
        page.wait_for_selector("#music-results audio", timeout=60_000)
        assert page.locator("#music-results img[alt='piano roll']").count() == 1
        assert page.get_attribute("#music-results audio", "src").startswith("data:audio/wav;base64,")
        shot(page, "7-music")
        with Store.open(str(home / "aigc.db")) as s:
            assert len(s.list_generations(kind="music")["data"]) == 1


def open_key(browser, server, lang: str = "en", **kw):
    page = browser.new_page(viewport={"width": 1200, "height": 900}, **kw)
    page.goto(server.url + "/")
    page.evaluate(f"localStorage.setItem('aigc.key', {KEY!r}); localStorage.setItem('aigc.lang', {lang!r})")
    page.reload()
    page.wait_for_function("document.querySelectorAll('#text-model option').length >= 2")
    return page


def test_studio_guards(browser, server):
    """The feedback box follows the result shown; busy buttons stay off; the same model compared
    with itself samples two seeds; nothing to pick means no button; the form checks its limits."""
    page = open_key(browser, server)
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.post_data or "")))
    completions = lambda: [b for u, b in sent if u.endswith("/v1/completions")]  # noqa: E731

    # 1. a result, then a failed generation: its feedback box goes (it would thumb the old one down)
    page.select_option("#text-model", "tiny")
    page.fill("#text-prompt", "ROMEO:")
    page.fill("#text-params [name=max_tokens]", "8")
    page.click("#text-go")
    page.wait_for_function("document.querySelector('#text-meta').textContent.startsWith('#')")
    assert page.is_visible("#text-feedback")
    page.route("**/v1/completions", lambda r: r.fulfill(status=500, json={"detail": "the model broke"}))
    page.fill("#text-prompt", "soft")
    page.click("#text-go")
    page.wait_for_selector("#status.error")
    assert not page.is_visible("#text-feedback")
    assert "the model broke" in page.inner_text("#text-meta")  # the card says what happened
    page.unroute("**/v1/completions")
    # 3. regenerate with feedback: one press, one thumbs-down and one request; then the button is spent
    page.click("#text-go")
    page.wait_for_function("document.querySelector('#text-meta').textContent.startsWith('#')")
    page.dblclick("#fb-go")
    page.wait_for_selector("#fb-new .rating")
    assert len([b for b in completions() if '"best_of":4' in b]) == 1 and page.is_disabled("#fb-go")

    # 7. the form's limits: a clear message and no request
    page.click("#tabs [data-tab=image]")
    page.fill("#image-params [name=steps]", "0")
    page.click("#image-go")
    assert "Steps" in page.inner_text("#status.error") and "1 to 1000" in page.inner_text("#status")
    assert not any("/v1/jobs" in u for u, _ in sent)
    page.fill("#image-params [name=steps]", "2")

    # 2 + 3. the same model on both sides, double-clicked: one pair, seeds s and s + 1
    page.click("#tabs [data-tab=compare]")
    assert page.inner_text("#status") == ""  # 4. the status line stays with its tab
    page.select_option("#cmp-model-a", "tiny")
    page.select_option("#cmp-model-b", "tiny")
    page.fill("#cmp-prompt", "soft")
    before = len(completions())
    page.dblclick("#cmp-go")
    page.wait_for_function("document.querySelectorAll('#cmp-pair .side .pick').length == 2")
    assert len(completions()) - before == 2
    seeds = sorted(
        int(s) for s in page.eval_on_selector_all("#cmp-pair .side", "ss => ss.map(s => s.dataset.seed)")
    )
    assert seeds[1] == seeds[0] + 1 and "differ only by seed" in page.inner_text("#status")
    with store(server) as s:
        pair = s.list_generations(limit=2)["data"]
    assert sorted(g["seed"] for g in pair) == seeds and {g["model"] for g in pair} == {"tiny"}

    # 12. a filter applies as it is picked; nothing found says so
    page.click("#tabs [data-tab=history]")
    page.wait_for_selector("#history-list .hist")
    page.select_option("#history-filters [name=kind]", "music")
    page.wait_for_selector("#history-list p:has-text('No matches.')")

    # 5. nothing to pick: the button is off and the page says why (no request to be refused)
    page.wait_for_selector("#tabs [data-tab=music]:not([hidden])")
    page.click("#tabs [data-tab=music]")
    assert page.is_disabled("#music-go")
    assert page.inner_text("#music-model") == "No models of this kind on the server."
    page.click("#tabs [data-tab=train]")
    page.wait_for_selector("#tr-status:has-text('No prepared data sets')")
    assert page.is_disabled("#tr-go")
    page.close()


def test_studio_chinese_strings(browser, server):
    """Every word the studio writes follows the language switch (checked as text: no CJK font here)."""
    page = open_key(browser, server)
    page.wait_for_selector("#tabs [data-tab=music]:not([hidden])")
    page.click("#lang")
    assert page.inner_text("#music-model") == "服务器上没有这类模型。"  # made before the switch
    assert page.get_attribute("#image-params [name=guidance]", "placeholder") == "默认"
    assert page.get_attribute("#image-params [name=label]", "placeholder") == "类别"
    assert page.inner_text("#image-params [name=sampler] option >> nth=0") == "默认"
    assert page.get_attribute("#tr-chart", "aria-label") == "训练损失"
    assert page.get_attribute("#mp-chart", "aria-label") == "损失曲线"
    assert page.get_attribute("#text-prompt", "aria-label") == "提示词"
    page.select_option("#text-model", "tiny")
    page.fill("#text-prompt", "soft")
    page.fill("#text-params [name=max_tokens]", "4")
    page.click("#text-go")
    page.wait_for_function("document.querySelector('#text-meta').textContent.startsWith('#')")
    meta = page.inner_text("#text-meta")
    assert "种子" in meta and "达到长度上限" in meta and "seed" not in meta and "length" not in meta
    page.click("#fb-go")  # this server's default scorer (sentiment) has no classifier: by likelihood
    page.wait_for_selector("#fb-new .rating")
    after = page.inner_text("#fb-pair") + page.inner_text("#fb-new .meta")
    assert "对数概率" in after and "得分" in after and "logprob" not in after and "score" not in after
    page.click("#tabs [data-tab=history]")
    page.wait_for_selector("#history-list .hist")
    hist = page.inner_text("#history-list .hist .meta >> nth=0")
    assert "文本" in hist and "text" not in hist and "seed" not in hist
    page.click("#lang")  # and back: the same words in English
    assert "seed" in page.inner_text("#history-list .hist .meta >> nth=0")
    page.close()
