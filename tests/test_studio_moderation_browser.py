"""The studio shows what moderation did to a text output (Playwright + Debian's chromium, the
`browser` fixture of conftest): a flagged output is delivered with a note naming the category, a
blocked one is withheld (finish_reason content_filter) with an error line."""

from __future__ import annotations

import pytest

from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_text_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("policy", ["flag", "block"])
def test_text_output_moderation_is_shown(browser, tmp_path, monkeypatch, policy):
    # a category matching any character but the prompt's (text is casefolded before matching): the
    # prompt passes, and the output of the locked seed has other characters (the tiny random model
    # gives 16 characters all from {r, o, m, e, space} for ~0.5 % of seeds, e.g. 267 and 352: an
    # unlocked, random seed made this test fail that often)
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f'[categories.anything]\npolicy = "{policy}"\nregex = ["[^rome\\\\s]"]\n', encoding="utf-8"
    )
    monkeypatch.setenv("AIGC_MODERATION", str(rules))
    write_text_run(tmp_path / "models" / "tiny")
    settings = Settings(
        models_dirs=[tmp_path / "models"], db=str(tmp_path / "s.db"), outputs_dir=tmp_path / "o"
    )
    with LiveServer(create_app(settings)) as live:
        page = browser.new_page()
        page.goto(live.url + "/")
        page.wait_for_function("document.querySelectorAll('#text-model option').length >= 1")
        page.fill("#text-prompt", "ROMEO")
        page.fill("#text-params [name=max_tokens]", "16")
        page.fill("#text-params [name=temperature]", "1.5")
        page.fill("#text-params [name=seed]", "7")
        page.check("#text-params [name=seed_lock]")
        page.click("#text-go")
        page.wait_for_function("document.querySelector('#text-meta').textContent.startsWith('#')")
        meta, status = page.inner_text("#text-meta"), page.inner_text("#status")
        assert "seed 7 " in meta
        if policy == "flag":
            assert "Flagged by moderation: anything" in status and "content_filter" not in meta
        else:
            assert "Withheld by moderation: anything" in status and "content_filter" in meta
            # clean text before the block may have streamed; no part of a blocked phrase did
            shown = page.inner_text("#text-output .gen")
            assert all(ch.casefold() in "rome" or ch.isspace() for ch in shown), shown
        page.close()
