"""`aigc eval` / `aigc.evaluate`: tiny runs trained in the test, evaluated end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from aigc.errors import AigcError
from serve_helpers import TEXT, TINY_GPT


def prepared_text(tmp_path: Path, text: str = TEXT, name: str = "data") -> Path:
    from aigc.data import prepare_text

    src = tmp_path / f"{name}.txt"
    src.write_text(text, encoding="utf-8")
    prepare_text(str(src), tmp_path / name)
    return tmp_path / name


def text_run(tmp_path: Path, data: Path | None = None, out: str = "run", steps: int = 3) -> Path:
    from aigc.training.text import train_text

    data = data or prepared_text(tmp_path)
    train_text("gpt", data, tmp_path / out, overrides=TINY_GPT, max_steps=steps, progress=False)
    return tmp_path / out


@pytest.fixture(scope="module")
def _trained_text(tmp_path_factory) -> Path:
    """One tiny GPT trained 3 steps on a prepared char corpus; tests get their own copy."""
    root = tmp_path_factory.mktemp("text")
    return text_run(root)


@pytest.fixture
def run(_trained_text, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(_trained_text, tmp_path / "run"))


def _finite_numbers(d: dict) -> list[str]:
    """Keys of `d` whose scalar number is not finite (None counts: a metric must be computed)."""
    return [
        k
        for k, v in d.items()
        if not isinstance(v, (dict, list, str)) and (v is None or not math.isfinite(v))
    ]


# ----------------------------------------------------------------------------- text


def test_eval_text_run_end_to_end(run, run_cli):
    code, stdout, stderr = run_cli(
        "eval", "--model", run, "--n", "8", "--max-new-tokens", "12", "--seed", "3"
    )
    assert code == 0, stderr
    assert "distinct_1" in stdout and "self_bleu" in stdout  # the summary table
    report = json.loads((run / "eval" / "report.json").read_text())
    model, real, proto = report["model"], report["real"], report["protocol"]
    for key in ("val_loss", "perplexity", "bits_per_byte", "distinct_1", "distinct_2", "distinct_3",
                "self_bleu", "repetition_rate", "lcs_mean", "ngram_overlap"):  # fmt: skip
        assert key in model, key
    assert not _finite_numbers(model) and not _finite_numbers(real)
    assert model["perplexity"] == pytest.approx(math.exp(model["val_loss"]))
    # a char tokenizer on ASCII: one byte per token, so bits/byte = bits/token
    assert model["bits_per_byte"] == pytest.approx(model["val_loss"] / math.log(2))
    assert proto["samples"] == 8 and proto["seed"] == 3 and proto["sampler"]["max_new_tokens"] == 12
    assert real["ngram_overlap"] > 0.5  # held-out lines of this corpus repeat training 8-grams
    assert (run / "eval" / "report.md").is_file()
    assert (
        "## Evaluation" in (run / "card.md").read_text()
        and "eval/report.json" in (run / "card.md").read_text()
    )
    # every sample is recorded with its own seed and reproduces alone
    rows = [json.loads(line) for line in (run / "eval" / "report-samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(range(3, 11))
    import aigc

    again = aigc.load(run).generate("", seed=rows[5]["seed"], max_new_tokens=12)[0]
    assert again.text == rows[5]["text"]


def test_eval_text_out_path_classifier_and_capping(run, tmp_path):
    import aigc
    from aigc.evaluation.sentiment import ClassifierTrainConfig, train_classifier

    lines = [f"The fox was {'great' if i % 2 else 'awful'} really\t{i % 2}" for i in range(60)]
    (tmp_path / "s.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    clf = train_classifier(tmp_path / "s.tsv", tmp_path / "clf", ClassifierTrainConfig(epochs=3))
    out = tmp_path / "elsewhere" / "r.json"
    with pytest.warns(UserWarning, match="--n 100000 is more than"):
        report = aigc.evaluate(run, n=100_000, out=out, classifier=clf)  # 15 tokens: context 16
    val_tokens = json.loads((run / "config.json").read_text())["data"]["val_tokens"]
    assert report["protocol"]["samples"] == val_tokens // 15  # as many as held-out windows
    assert any("--n 100000" in w for w in report["warnings"])
    assert 0.0 <= report["model"]["positive_share"] <= 1.0 and report["protocol"]["scorer"] == str(clf)
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert str(out) in (run / "card.md").read_text()  # outside the run: linked by its path


def test_eval_cli_capping_warning_is_printed(run, run_cli):
    code, _, stderr = run_cli("eval", "--model", run, "--n", "500", "--max-new-tokens", "10")
    assert code == 0, stderr
    assert "warning: --n 500 is more than the held-out split" in stderr


def test_eval_mismatched_tokenizer_is_one_line(run, tmp_path, run_cli):
    other = prepared_text(tmp_path, text="ABCDEFG xyz\n" * 300, name="other")
    code, stdout, stderr = run_cli("eval", "--model", run, "--data", other, "--n", "4")
    assert code == 1 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "tokenizer" in stderr and "differs" in stderr
    assert not (run / "eval").exists()  # nothing written


def test_eval_bad_input(run, tmp_path, run_cli):
    code, _, stderr = run_cli("eval", "--model", tmp_path / "nope", "--n", "4")
    assert code == 1 and "not a run directory" in stderr
    code, _, stderr = run_cli("eval", "--model", run, "--data", tmp_path / "missing", "--n", "4")
    assert code == 1 and "not found" in stderr
    code, _, stderr = run_cli("eval", "--model", run, "--n", "4", "--steps", "3")
    assert code == 1 and "diffusion" in stderr
    code, _, stderr = run_cli("eval", "--model", run, "--n", "0")
    assert code == 1 and "--n must be >= 1" in stderr
    code, _, stderr = run_cli("eval", "--model", run, "--n", "2", "--out", tmp_path / "r.txt")
    assert code == 1 and ".json" in stderr
    code, stdout, _ = run_cli("eval", "--help")
    assert code == 0 and "--max-new-tokens" in stdout and "--classifier" in stdout


# ----------------------------------------------------------------------------- images

TINY_UNET = ["model.block_out_channels=[8,16]", "model.attention_levels=[1]", "model.norm_num_groups=4"]


@pytest.fixture
def image_run(tmp_path):
    """A tiny class-conditional diffusion model trained 2 steps on 8x8 digits (400 images)."""
    from aigc.data.images import prepare_images
    from aigc.training.image_tasks import train_image

    prepare_images("digits", tmp_path / "digits", overrides=["size=8", "limit=400"])
    over = [
        *TINY_UNET,
        "conditional=true",
        "train.batch_size=8",
        "train.eval_batches=1",
        "train.warmup_steps=1",
    ]
    train_image(
        "diffusion", tmp_path / "digits", tmp_path / "pix", preset="tiny",
        overrides=[*over, "model.steps=2", "train.max_steps=2"], progress=False,
    )  # fmt: skip
    return tmp_path / "pix"


@pytest.mark.slow
def test_eval_conditional_image_run(image_run, tmp_path, run_cli):
    import aigc
    from aigc.evaluation.images import FeatureTrainConfig

    feat = FeatureTrainConfig(steps=30, batch_size=32)
    with pytest.warns(UserWarning, match="more than the real set"):  # 400 images: 20 held out
        report = aigc.evaluate(image_run, n=30, seed=1, steps=2, feature_cfg=feat)
    proto, model, real = report["protocol"], report["model"], report["real"]
    assert proto["samples"] == 20 and proto["sampler"]["steps"] == 2 and proto["feature_network_hash"]
    assert 0.0 <= proto["feature_network_test_accuracy"] <= 1.0
    for key in ("fd", "kid", "kid_std", "precision", "recall"):
        assert math.isfinite(model[key]) and math.isfinite(real[key]), key
    assert set(model["label_accuracy"]["per_label"]) == set(range(10))  # labels cycle 0..9
    assert 0.0 <= model["label_accuracy"]["accuracy"] <= 1.0
    assert 0.0 <= model["copies"]["flagged_share"] <= 1.0 and 0.0 <= real["copies"]["flagged_share"] <= 1.0
    for name in ("report.json", "report.md", "report-copies.png", "report-samples.png"):
        assert (image_run / "eval" / name).is_file(), name
    assert "eval/report.json" in (image_run / "card.md").read_text()

    # data of another shape: one line, before any sampling
    from aigc.data.images import prepare_images

    prepare_images("digits", tmp_path / "big", overrides=["size=16", "limit=50"])
    code, _, stderr = run_cli("eval", "--model", image_run, "--data", tmp_path / "big", "--n", "4")
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "(1, 16, 16)" in stderr and "(1, 8, 8)" in stderr
    with pytest.raises(AigcError, match="apply to text runs"):
        aigc.evaluate(image_run, n=2, max_new_tokens=5)


# ----------------------------------------------------------------------------- music


@pytest.mark.slow  # trains its own music run
def test_eval_music_run(tmp_path):
    import aigc
    from aigc.data.music import prepare_music
    from aigc.generation.music_render import midi_bytes
    from aigc.tokenizers.music import Note, Piece
    from aigc.training.text import train_text

    src = tmp_path / "midi"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        notes = [Note(4 * j, 4, int(rng.integers(55, 80)), 79) for j in range(12)]
        piece = Piece(notes, key="D minor" if i % 2 else "F major", meter="4/4", name=f"p{i}")
        (src / f"p{i}.mid").write_bytes(midi_bytes(piece))
    prepare_music(str(src), tmp_path / "music", overrides=["val_fraction=0.33", "style=folk"])
    over = [o.replace("block_size=16", "block_size=64") for o in TINY_GPT]
    train_text("gpt", tmp_path / "music", tmp_path / "mrun", overrides=over, max_steps=3, progress=False)
    report = aigc.evaluate(tmp_path / "mrun", n=4, max_new_tokens=40)
    assert report["kind"] == "music" and report["protocol"]["samples"] == 4
    for side in ("model", "real", "baseline"):
        for key in ("valid_midi_share", "pc_distance", "duration_distance"):
            assert 0.0 <= report[side][key] <= 1.0, (side, key)
    assert report["real"]["valid_midi_share"] == 1.0 and math.isfinite(report["model"]["val_loss"])
    assert "baseline" in (tmp_path / "mrun" / "eval" / "report.md").read_text()
