"""Scorers (aigc.evaluation.scorers): classifier probabilities, the digit scorer, user functions,
and one clear line for every bad spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aigc.errors import AigcError
from aigc.evaluation.scorers import load_scorer, parse_spec

POS = ["great", "love", "excellent", "wonderful", "perfect", "amazing"]
NEG = ["awful", "hate", "terrible", "broken", "worst", "boring"]
THINGS = ["phone", "movie", "pizza", "service", "case", "plot", "battery", "staff"]


def write_tsv(path: Path, n: int = 160) -> Path:
    """A small separable sentiment set in the UCI format (text<TAB>0|1)."""
    lines = []
    for i in range(n):
        words = POS if i % 2 else NEG
        k = i // 2
        lines.append(f"The {THINGS[k % len(THINGS)]} was {words[k % len(words)]} really\t{i % 2}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_sentiment(out: Path) -> Path:
    from aigc.evaluation.sentiment import train_classifier

    return train_classifier(write_tsv(out.parent / f"{out.name}.tsv"), out)


@pytest.fixture
def clf_dir(tmp_path) -> Path:
    """A sentiment classifier where `sentiment` (newest in the registry) finds it."""
    home = tmp_path / "aigc-home" / "models"
    home.mkdir(parents=True)
    return train_sentiment(home / "sent")


HAPPY = ["The pizza was great really", "The staff was wonderful really"]
SAD = ["The phone was awful really", "The plot was boring really"]


def test_sentiment_scorer_is_the_classifiers_positive_probability(clf_dir):
    from aigc.evaluation.sentiment import load_classifier

    scorer = load_scorer("sentiment")  # the newest classifier in the registry
    assert scorer.kind == "text" and scorer.name == "sentiment"
    scores = scorer.score(HAPPY + SAD)
    clf = load_classifier(clf_dir)
    want = clf.predict_proba(HAPPY + SAD)[:, clf.labels.index("positive")]
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    assert min(scores[:2]) > 0.5 > max(scores[2:])
    by_path = load_scorer(f"sentiment:{clf_dir}")
    np.testing.assert_allclose(by_path.score(HAPPY + SAD), scores, rtol=1e-6)
    assert load_scorer("sentiment") is scorer  # cached: a server loads it once
    assert scorer.score([]) == []


def test_label_scorer_any_label(clf_dir):
    pos = load_scorer(f"label:positive@{clf_dir}").score(HAPPY + SAD)
    neg = load_scorer(f"label:negative@{clf_dir}").score(HAPPY + SAD)
    np.testing.assert_allclose(np.add(pos, neg), 1.0, rtol=1e-5)
    assert load_scorer("label:negative").score(SAD)[0] > 0.5  # newest classifier
    with pytest.raises(AigcError, match="label 'joy' is not one of .*negative, positive"):
        load_scorer(f"label:joy@{clf_dir}")


def test_classifier_without_positive_label(tmp_path):
    from aigc.evaluation.sentiment import train_classifier

    f = tmp_path / "topics.tsv"
    f.write_text("\n".join(f"the {w} thing {i}\t{w}" for i in range(40) for w in ("cat", "dog")) + "\n")
    out = train_classifier(f, tmp_path / "topics")
    with pytest.raises(AigcError, match="no `positive` label .*label:NAME@PATH"):
        load_scorer(f"sentiment:{out}")
    assert load_scorer(f"label:cat@{out}").score(["the cat thing 3"])[0] > 0.5


def test_text_scorer_input_checks(clf_dir):
    scorer = load_scorer("sentiment")
    with pytest.raises(AigcError, match="one string"):
        scorer.score("The pizza was great")
    with pytest.raises(AigcError, match="scores texts"):
        scorer.score([1, 2])


def test_no_classifier_is_one_clear_line(tmp_path):
    with pytest.raises(AigcError, match="no trained classifier found .*aigc train classifier"):
        load_scorer("sentiment")
    with pytest.raises(AigcError, match="not found"):
        load_scorer(f"sentiment:{tmp_path / 'nope'}")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "unknown scorer spec ''; allowed: sentiment"),
        ("bleu", "unknown scorer spec 'bleu'"),
        ("label:", "unknown scorer spec"),
        ("digit:7", r"digit:K@DATA_DIR"),
        ("digit:@/tmp", r"digit:K@DATA_DIR"),
        ("python:nofunc", r"python:FILE.py:FUNC"),
        ("python:x.py:not-an-identifier", r"python:FILE.py:FUNC"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(AigcError, match=match) as e:
        load_scorer(spec)
    assert "\n" not in str(e.value)


def test_parse_spec():
    assert parse_spec("sentiment") == ("sentiment", None, None)
    assert parse_spec("sentiment:/r/c") == ("sentiment", None, "/r/c")
    assert parse_spec("label:joy@/r/c") == ("label", "joy", "/r/c")
    assert parse_spec("digit:7@/d") == ("digit", "7", "/d")
    assert parse_spec("python:a/b.py:f") == ("python", "a/b.py:f", None)


# ----------------------------------------------------------------------------- python scorers


def test_python_file_scorer(tmp_path):
    f = tmp_path / "my_scorer.py"
    f.write_text(
        "def exclaim(items):\n    return [t.count('!') for t in items]\n\n"
        "def bright(images):\n    return [float(im.mean()) for im in images]\n"
        "bright.kind = 'image'\n\n"
        "def wrong_length(items):\n    return [1.0]\n\n"
        "def boom(items):\n    raise ValueError('bad day')\n\n"
        "def not_numbers(items):\n    return ['a' for _ in items]\n\n"
        "def odd_kind(items):\n    return []\nodd_kind.kind = 'audio'\n"
    )
    s = load_scorer(f"python:{f}:exclaim")
    assert s.kind == "text" and s.score(["a!", "b!!!", "c"]) == [1.0, 3.0, 0.0]
    img = load_scorer(f"python:{f}:bright")
    assert img.kind == "image"
    assert img.score(np.stack([np.zeros((1, 4, 4), np.uint8), np.full((1, 4, 4), 8, np.uint8)])) == [0.0, 8.0]
    with pytest.raises(AigcError, match="returned 1 scores for 2 items"):
        load_scorer(f"python:{f}:wrong_length").score(["a", "b"])
    with pytest.raises(AigcError, match=r"my_scorer.py:boom raised ValueError: bad day"):
        load_scorer(f"python:{f}:boom").score(["a"])
    with pytest.raises(AigcError, match="list of numbers"):
        load_scorer(f"python:{f}:not_numbers").score(["a"])
    with pytest.raises(AigcError, match="kind='audio'; allowed: text, image"):
        load_scorer(f"python:{f}:odd_kind")
    with pytest.raises(AigcError, match="has no function 'missing'"):
        load_scorer(f"python:{f}:missing")
    with pytest.raises(AigcError, match="not found"):
        load_scorer(f"python:{tmp_path / 'nope.py'}:f")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(items:\n")
    with pytest.raises(AigcError, match=r"broken.py failed to load: SyntaxError"):
        load_scorer(f"python:{broken}:f")


def test_python_module_scorer(tmp_path, monkeypatch):
    (tmp_path / "scoremod_x1.py").write_text("def length(items):\n    return [len(t) for t in items]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_scorer("python:scoremod_x1:length").score(["ab", "abcd"]) == [2.0, 4.0]
    with pytest.raises(AigcError, match="no_such_module_zz failed to load: ModuleNotFoundError"):
        load_scorer("python:no_such_module_zz:f")


# ----------------------------------------------------------------------------- digit scorer


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from aigc.data.images import prepare_images

    out = tmp_path_factory.mktemp("digits") / "d8"
    prepare_images("digits", out, overrides=["size=8", "limit=600"])
    return out


def test_digit_scorer_prefers_its_class(digits):
    from PIL import Image

    from aigc.data.images import load_prepared_images
    from aigc.evaluation.images import FeatureTrainConfig

    cfg = FeatureTrainConfig(steps=150, batch_size=64)
    scorer = load_scorer(f"digit:3@{digits}", feature_cfg=cfg)
    assert scorer.kind == "image" and scorer.info["test_accuracy"] > 0.7
    data = load_prepared_images(digits)
    x, y = np.asarray(data.images), np.asarray(data.labels)
    threes, others = x[y == 3][:20], x[y != 3][:60]
    s3, so = scorer.score(threes), scorer.score(others)
    assert np.mean(s3) > 0.6 > 0.2 > np.mean(so)
    assert all(0.0 <= v <= 1.0 for v in s3 + so)
    # PIL images give the same scores as the uint8 array
    pil = [Image.fromarray(im[0]) for im in threes[:4]]
    np.testing.assert_allclose(scorer.score(pil), s3[:4], rtol=1e-6)
    # a class name works as well as an index; the cache keeps one scorer per spec
    assert load_scorer(f"digit:3@{digits}", feature_cfg=cfg) is scorer
    with pytest.raises(AigcError, match="trained on 1x8x8 images, got 1x16x16"):
        scorer.score(np.zeros((1, 1, 16, 16), np.uint8))
    with pytest.raises(AigcError, match="uint8"):
        scorer.score(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(AigcError, match="class 'eleven' is not in .*allowed: 0, 1, 2"):
        load_scorer(f"digit:eleven@{digits}", feature_cfg=cfg)
    with pytest.raises(AigcError, match="class '12' has no images"):
        load_scorer(f"digit:12@{digits}", feature_cfg=cfg)
    with pytest.raises(AigcError, match="not a prepared image data set"):
        load_scorer(f"digit:3@{digits.parent / 'nothing'}")
