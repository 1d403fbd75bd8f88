"""The studio's presets, model page, Train tab and win rate in a real browser (Playwright + Debian's
chromium, as tests/test_studio_browser.py): save and apply a preset across a reload, open a model
page (loss curve drawn, card escaped), train a tiny model live (loss points stream in, the model
appears in the pickers), blind-compare two versions and see the win rate; phone width.
Screenshots go to test-output/studio-pages/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aigc.feedback.store import Store
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_text_run
from test_studio_browser import KEY

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "studio-pages"
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(300))
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.eval_batches=2", "train.eval_interval=20", "train.log_interval=1", "train.peak_flops=1e9",
        "sample.num=1", "sample.tokens=5"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    from aigc.data import prepare_text

    root = tmp_path / "models"
    write_text_run(root / "tiny")
    write_text_run(root / "story" / "1", seed=1)
    run = write_text_run(root / "story" / "2", seed=2)
    (run / "card.md").write_text(
        "# story, version 2\n\nA tiny GPT. <script>window.pwned = 1</script>\n\n- 1 layer\n- 16 wide\n",
        encoding="utf-8",
    )
    rows = [{"kind": "train", "step": s, "loss": 3 + 1 / s, "time": s} for s in range(1, 801)]
    rows += [{"kind": "eval", "step": s, "val_loss": 3.2 + 1 / s} for s in (200, 400, 800)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval").mkdir()
    report = {"kind": "text", "protocol": {"samples": 20}, "model": {"val_loss": 3.21, "distinct_2": 0.4},
              "real": {"distinct_2": 0.7}, "warnings": []}  # fmt: skip
    (run / "eval" / "report.json").write_text(json.dumps(report))
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_text(str(src), Path(os.environ["AIGC_HOME"]) / "data" / "lines")
    keys = tmp_path / "keys.txt"
    keys.write_text(hash_key(KEY) + "\n")
    settings = Settings(models_dirs=[root], api_keys_file=keys, db=str(tmp_path / "aigc.db"),
                        outputs_dir=tmp_path / "out", max_train_time_s=300)  # fmt: skip
    with LiveServer(create_app(settings)) as live:
        live.root, live.db = root, tmp_path / "aigc.db"
        yield live


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_studio(browser, server, **kw):
    page = browser.new_page(**kw)
    page.goto(server.url + "/")
    page.evaluate(f"localStorage.setItem('aigc.key', {KEY!r}); localStorage.setItem('aigc.lang', 'en')")
    page.reload()
    page.wait_for_function("document.querySelectorAll('#text-model option').length >= 2")
    return page


def inked(page, canvas: str) -> int:
    """Pixels the chart has drawn on (non-transparent)."""
    return page.eval_on_selector(
        canvas,
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
        " for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }",
    )


def test_presets_model_page_training_and_win_rate(browser, server):
    page = open_studio(browser, server, viewport={"width": 1200, "height": 900})
    user = hash_key(KEY)

    # 1. save the text tab's parameters as a preset; it survives a reload and applies back
    page.fill("#text-params [name=temperature]", "1.3")
    page.fill("#text-params [name=top_k]", "7")
    page.fill("#text-params .preset-name", "hot")
    page.click("#text-params .preset-save")
    page.wait_for_function(
        "[...document.querySelectorAll('#text-params .preset-pick option')].some(o => o.text == 'hot')"
    )
    with Store.open(str(server.db)) as s:
        [row] = s.list_presets(user, "text")["data"]
    assert row["name"] == "hot" and row["params"]["temperature"] == 1.3 and row["params"]["top_k"] == 7
    page.fill("#text-params [name=temperature]", "0.2")
    page.fill("#text-params [name=top_k]", "0")
    page.evaluate("localStorage.removeItem('aigc.form.text-params')")  # only the server remembers it
    page.reload()
    page.wait_for_function("document.querySelectorAll('#text-params .preset-pick option').length == 2")
    page.select_option("#text-params .preset-pick", label="hot")
    page.wait_for_function("document.querySelector('#text-params [name=temperature]').value == '1.3'")
    assert page.input_value("#text-params [name=top_k]") == "7"
    shot(page, "1-preset")

    # 2. the model page: loss curve drawn from metrics.jsonl, metrics, eval report, the card as text
    page.click("#tabs [data-tab=models]")
    page.select_option("#mp-model", "story@2")
    page.wait_for_function("document.querySelector('#mp-chart').dataset.points == '503'")  # 500 + 3 evals
    assert inked(page, "#mp-chart") > 500
    card = page.inner_text("#mp-card")
    assert "<script>window.pwned = 1</script>" in card and "story, version 2" in card
    assert page.eval_on_selector("#mp-card", "c => c.querySelectorAll('script').length") == 0
    assert page.evaluate("window.pwned === undefined")
    assert page.locator("#mp-card li").count() == 2
    assert "3.21" in page.inner_text("#mp-eval") and "800" in page.inner_text("#mp-metrics")
    assert page.locator("#mp-versions button").all_inner_texts() == ["story@1", "story@2"]
    shot(page, "2-model-page")

    # 3. train a tiny model from the Train tab: the loss chart fills in live, the model appears
    page.click("#tabs [data-tab=train]")
    page.wait_for_function("document.querySelectorAll('#tr-data option').length == 1")
    page.select_option("#tr-family", "gpt")
    page.select_option("#tr-preset", "tiny")
    page.fill("#tr-name", "fresh")
    page.fill("#tr-time", "120")
    page.fill("#tr-steps", "600")  # a few seconds even on a quiet machine: several 0.25 s polls see it
    page.fill("#tr-set", "\n".join(TINY))
    page.evaluate(
        "window.seen = []; new MutationObserver(() => window.seen.push(document.querySelector('#tr-chart')"
        ".dataset.points)).observe(document.querySelector('#tr-status'), {childList: true, characterData: true,"
        " subtree: true})"
    )
    page.click("#tr-go")
    page.wait_for_function(
        "document.querySelector('#tr-status').textContent.includes('succeeded')", timeout=120_000
    )
    seen = [int(n) for n in page.evaluate("window.seen") if n]
    assert len(set(seen)) >= 3 and seen == sorted(seen)  # several live updates, the curve only grows
    assert page.get_attribute("#tr-chart", "data-points").isdigit()
    assert int(page.get_attribute("#tr-chart", "data-points")) >= 80 and inked(page, "#tr-chart") > 200
    page.wait_for_selector("#status:has-text('fresh@1')")  # after the pickers were reloaded
    assert (server.root / "fresh" / "1" / "model.safetensors").is_file()
    models = page.eval_on_selector_all("#text-model option", "os => os.map(o => o.value)")
    assert "fresh" in models and "fresh@1" in models  # the picker offers the name and its versions
    page.wait_for_selector("#tr-jobs:has-text('fresh@1')")
    shot(page, "3-train")
    page.click("#tr-open")
    page.wait_for_function("document.querySelector('#mp-meta').textContent.startsWith('fresh@1')")
    page.wait_for_function("Number(document.querySelector('#mp-chart').dataset.points) >= 80")

    # 4. blind compare two versions with one prompt and seed; the win rate shows after each pick
    page.click("#tabs [data-tab=compare]")
    page.select_option("#cmp-model-a", "story@1")
    page.select_option("#cmp-model-b", "story@2")
    page.wait_for_selector("#cmp-stats:has-text('no comparisons yet')")
    page.fill("#cmp-prompt", "soft")
    for n in (1, 2):
        page.click("#cmp-go")
        page.wait_for_function(
            "document.querySelectorAll('#cmp-pair .side .pick:not([disabled])').length == 2"
        )
        assert page.inner_text("#cmp-pair .side .who") == "hidden model"
        page.click("#cmp-pair .side >> nth=0 >> .pick")
        page.wait_for_function(f"document.querySelector('#cmp-stats').dataset.n == '{n}'")
    stats = page.inner_text("#cmp-stats")
    assert "story@1 vs story@2" in stats and "win rate" in stats and "95% CI" in stats
    with Store.open(str(server.db)) as s:
        st = s.comparison_stats("story@1", "story@2")
        gens = s.list_generations(limit=10)["data"]
    assert st["n"] == 2 and f"won {st['wins']} of 2" in stats
    assert len({g["seed"] for g in gens[:2]}) == 1 and {g["model"] for g in gens[:2]} == {
        "story@1",
        "story@2",
    }
    shot(page, "4-win-rate")

    # 5. 中文
    page.click("#lang")
    assert (
        page.inner_text("#tabs [data-tab=train]") == "训练"
        and page.inner_text("#tabs [data-tab=models]") == "模型"
    )
    page.click("#tabs [data-tab=models]")
    assert page.inner_text("#tab-models h3 >> nth=0") == "损失曲线"
    shot(page, "5-zh")
    page.close()


def test_pages_at_phone_width(browser, server):
    page = open_studio(
        browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, device_scale_factor=2
    )
    page.click("#tabs [data-tab=models]")
    page.select_option("#mp-model", "story@2")
    page.wait_for_function("document.querySelector('#mp-chart').dataset.points == '503'")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert inked(page, "#mp-chart") > 500
    shot(page, "6-phone-model-page")
    page.click("#tabs [data-tab=train]")
    page.wait_for_function("document.querySelectorAll('#tr-preset option').length > 1")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "7-phone-train")
    page.click("#tabs [data-tab=text]")
    assert page.is_visible("#text-params .preset-save")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "8-phone-presets")
    page.close()


def test_short_training_job_reports_its_last_step(browser, server):
    """A job shorter than one log interval: its one train row is at step 1, its last step only on
    the final eval row. The status and the chart still end at the job's last step."""
    page = open_studio(browser, server, viewport={"width": 1200, "height": 900})
    page.click("#tabs [data-tab=train]")
    page.wait_for_function("document.querySelectorAll('#tr-data option').length == 1")
    page.select_option("#tr-family", "gpt")
    page.select_option("#tr-preset", "tiny")
    page.fill("#tr-name", "short")
    page.fill("#tr-steps", "3")
    page.fill("#tr-set", "\n".join([*TINY, "train.log_interval=50"]))
    page.click("#tr-go")
    page.wait_for_function(
        "document.querySelector('#tr-status').textContent.includes('succeeded')", timeout=120_000
    )
    status = page.inner_text("#tr-status")
    assert "step 3/3" in status and "(at step 1)" in status, status
    assert page.get_attribute("#tr-chart", "data-points") == "2"  # the train row at 1, the eval at 3
    assert page.is_enabled("#tr-go")
    page.close()
