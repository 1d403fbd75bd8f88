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
        gid = first_text(page, server)
        page.click("#fb-go")
        page.wait_for_selector("#fb-new .rating")
        assert "ranked by likelihood" in page.inner_text("#fb-new .who")
        shot(page, "5-regenerate-with-feedback-phone")
        with Store.open(str(server.db)) as s:
            assert s.list_ratings(generation_id=gid)["data"][0]["comment"] is None
            new = s.list_generations(limit=1)["data"][0]
        assert new["params"]["best_of"] == 4 and new["params"]["scorer"] == "logprob"
        page.close()
