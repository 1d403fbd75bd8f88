"""The studio's "regenerate with feedback" in a real browser (Playwright + Debian's chromium,
headless, against a live server on loopback; the fixtures follow tests/test_studio_browser.py).

A text result is thumbed down with a comment; the studio stores the rating and asks for a new
completion of the same prompt (new seed, best_of=4, the server's default scorer) and shows it next
to the old one. Screenshots go to test-output/studio/."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc.evaluation.sentiment import load_classifier, train_classifier
from aigc.feedback.store import Store
from aigc.generation import load_generator
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_text_run

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "studio"
KEY = "studio-key"

pytestmark = pytest.mark.slow


def sentiment_classifier(home: Path) -> Path:
    pos, neg = ["great", "love", "wonderful"], ["awful", "hate", "boring"]
    f = home / "sent.tsv"
    f.write_text(
        "\n".join(f"the {w} thing {i}\t{int(w in pos)}" for i in range(30) for w in pos + neg) + "\n"
    )
    return train_classifier(f, home / "sentiment")


def live(tmp_path_factory, scorers: list[str] | None):
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    home = tmp_path_factory.mktemp("home")
    keys = home / "keys.txt"
    keys.write_text(hash_key(KEY) + "\n")
    clf = sentiment_classifier(home)
    settings = Settings(models_dirs=[root], api_keys_file=keys, db=str(home / "aigc.db"),
                        outputs_dir=home / "out", scorers=[f"sentiment:{clf}"] if scorers is None else scorers)  # fmt: skip
    server = LiveServer(create_app(settings))
    server.root, server.db, server.clf = root, home / "aigc.db", clf
    return server


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def first_text(page, server) -> int:
    """Open the studio with the key, generate one text; returns its generation id."""
    page.goto(server.url + "/")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.querySelectorAll('#text-model option').length >= 1")
    page.select_option("#text-model", "tiny")
    page.fill("#text-prompt", "ROMEO:")
    page.fill("#text-params [name=max_tokens]", "16")
    page.fill("#text-params [name=seed]", "5")
    page.check("#text-params [name=seed_lock]")
    assert not page.is_visible("#text-feedback")
    page.click("#text-go")
    page.wait_for_function("document.querySelector('#text-meta').textContent.startsWith('#')")
    assert page.is_visible("#text-feedback")
    return int(page.inner_text("#text-meta").split()[0][1:])


def test_regenerate_with_feedback(browser, tmp_path_factory):
    server = live(tmp_path_factory, None)
    with server:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append((r.url, r.post_data or "")))
        gid = first_text(page, server)
        old_text = page.inner_text("#text-output .gen")
        page.fill("#fb-comment", "too gloomy")
        page.click("#fb-go")
        page.wait_for_selector("#fb-new .rating")
        shot(page, "5-regenerate-with-feedback")

        # 1. the thumbs-down and its comment are stored on the old generation
        with Store.open(str(server.db)) as s:
            [rating] = s.list_ratings(generation_id=gid)["data"]
            assert (rating["kind"], rating["value"], rating["comment"]) == ("thumb", -1, "too gloomy")
            new = s.list_generations(limit=1)["data"][0]
        assert new["id"] != gid and new["prompt"] == "ROMEO:"
        assert new["params"]["best_of"] == 4 and new["params"]["scorer"] == f"sentiment:{server.clf}"
        # 2. the request was a plain completion with best_of=4 and the server's default scorer
        bodies = [b for u, b in requests if u.endswith("/v1/completions") and '"best_of":4' in b]
        assert len(bodies) == 1 and '"aigc_scorer":"default"' in bodies[0] and '"stream"' not in bodies[0]
        # 3. old and new side by side; the new text is what its own seed gives (oracle: the library)
        sides = page.locator("#fb-pair .side")
        assert sides.count() == 2
        assert sides.nth(0).locator("pre").inner_text() == "ROMEO:" + old_text
        p = new["params"]
        [ref] = load_generator(server.root / "tiny").generate(
            "ROMEO:", seed=new["seed"], max_new_tokens=16, temperature=p["temperature"], top_p=p["top_p"],
            top_k=p["top_k"],
        )  # fmt: skip
        assert new["output_text"] == ref.text
        assert sides.nth(1).locator("pre").inner_text() == "ROMEO:" + ref.text
        p_pos = float(load_classifier(server.clf).predict_proba([ref.text])[0, 1])
        assert f"score {p_pos:.3f}" in page.inner_text("#fb-new .meta")
        assert f"#{new['id']}" in page.inner_text("#fb-new .meta")
        # 4. the new one can be rated like any other
        page.click("#fb-new .thumb.up")
        page.wait_for_selector("#fb-new .note:has-text('+1')")
        with Store.open(str(server.db)) as s:
            assert s.get_generation(new["id"])["rating_count"] == 1
        # 5. 中文
        page.click("#lang")
        assert page.inner_text("#fb-go") == "按反馈重新生成"
        shot(page, "5-regenerate-with-feedback-zh")
        page.click("#lang")
        page.close()


def test_regenerate_with_feedback_without_a_scorer(browser, tmp_path_factory):
    """A server that allows no scorer: the studio falls back to best_of by likelihood and says so."""
    server = live(tmp_path_factory, [])
    with server:
        page = browser.new_page(viewport={"width": 390, "height": 844})  # phone width
        failed, icons = [], []  # the browser logs every 4xx: the studio asks first (GET /v1/scorers)
        page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)
        page.on("request", lambda r: icons.append(r.url) if r.url.endswith("favicon.ico") else None)
        gid = first_text(page, server)
        failed.clear()  # (the first paint's 401, before the key was typed)
        page.click("#fb-go")
        page.wait_for_selector("#fb-new .rating")
        assert "ranked by likelihood" in page.inner_text("#fb-new .who")
        assert failed == [] and icons == []  # (the icon is inline: no /favicon.ico 404 either)
        shot(page, "5-regenerate-with-feedback-phone")
        with Store.open(str(server.db)) as s:
            assert s.list_ratings(generation_id=gid)["data"][0]["comment"] is None
            new = s.list_generations(limit=1)["data"][0]
        assert new["params"]["best_of"] == 4 and new["params"]["scorer"] == "logprob"
        page.close()


def test_rating_widget_shows_my_choice(browser, tmp_path_factory):
    """A click lights the stars up to the value and presses the thumb; rating again moves the choice
    (the server replaces the caller's rating: no second vote); a row's my_rating sets it up."""
    server = live(tmp_path_factory, [])
    with server:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        gid = first_text(page, server)
        box = "#text-actions .rating"
        lit = lambda: page.eval_on_selector_all(f"{box} .star.on", "bs => bs.map(b => +b.dataset.v)")  # noqa: E731
        pressed = lambda: page.eval_on_selector_all(  # noqa: E731
            f"{box} .thumb[aria-pressed=true]", "bs => bs.map(b => +b.dataset.v)"
        )
        page.click(f"{box} .star[data-v='4']")
        page.wait_for_selector(f"{box} .note:has-text('4.0★ (1)')")
        assert lit() == [1, 2, 3, 4] and pressed() == []
        page.click(f"{box} .thumb.up")  # a thumb keeps the stars and the mean in view
        page.wait_for_selector(f"{box} .note:has-text('+1')")
        assert lit() == [1, 2, 3, 4] and pressed() == [1]
        assert page.inner_text(f"{box} .note") == "Rated +1 · 4.5★ (2)"
        page.click(f"{box} .star[data-v='2']")  # rating again: replaced, still two ratings
        page.wait_for_selector(f"{box} .note:has-text('3.5★ (2)')")
        assert lit() == [1, 2] and pressed() == [1]
        with Store.open(str(server.db)) as s:
            assert sorted((r["kind"], r["value"]) for r in s.list_ratings(generation_id=gid)["data"]) == [
                ("stars", 2),
                ("thumb", 1),
            ]
        shot(page, "5-rating-my-choice")
        # a widget made from a stored row shows the caller's own rating from the start
        page.evaluate(
            """async (gid) => { const r = await api(`v1/generations/${gid}`); const w = ratingWidget(r.id,
               r.rating, r.my_rating, r.rating_count); w.id = "again"; document.body.append(w); }""",
            gid,
        )
        assert page.eval_on_selector_all("#again .star.on", "bs => bs.map(b => +b.dataset.v)") == [1, 2]
        assert page.eval_on_selector_all("#again .thumb[aria-pressed=true]", "bs => bs.length") == 1
        assert page.inner_text("#again .note") == "3.5★ (2)"
        page.close()
