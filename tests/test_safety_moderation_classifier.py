"""Moderation with a classifier trained on the user's own labelled examples ([classifier] table)."""

from __future__ import annotations

import pytest

from aigc.errors import AigcError
from aigc.safety.moderation import Moderator, StreamGuard

pytestmark = pytest.mark.slow  # trains a small classifier once (~5-12 s)

# a made-up "insult" class with words the default rules do not know
RUDE = [
    "you are a dimwit",
    "what a nincompoop",
    "dimwit nincompoop go away",
    "such a buffoon",
    "buffoon dimwit",
]
KIND = ["you are very kind", "what a lovely day", "thank you friend", "such a good idea", "nice work today"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from aigc.evaluation.sentiment import ClassifierTrainConfig, train_classifier

    tmp = tmp_path_factory.mktemp("clf")
    lines = [f"{t} {i}\ttoxic" for i in range(12) for t in RUDE] + [
        f"{t} {i}\tok" for i in range(12) for t in KIND
    ]
    (tmp / "labelled.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_classifier(tmp / "labelled.tsv", tmp / "toxicity", ClassifierTrainConfig(epochs=6))


def _rules(tmp_path, classifier, policy="block", extra="") -> Moderator:
    f = tmp_path / "rules.toml"
    f.write_text(
        f"""
[categories.insult]
policy = "{policy}"
words = []

[classifier]
model = "{classifier}"
threshold = 0.7
{extra}
[classifier.labels]
toxic = "insult"
""",
        encoding="utf-8",
    )
    return Moderator.load(f)


def test_classifier_matches_what_the_rules_miss_and_reports_its_score(tmp_path, classifier):
    mod = _rules(tmp_path, classifier)
    bad = mod.check("you absolute dimwit buffoon")
    assert bad.blocked and bad.categories["insult"]
    assert any(m.startswith("classifier:insult") for m in bad.matches["insult"])
    assert bad.to_openai()["category_scores"]["insult"] >= 0.7
    good = mod.check("thank you, what a lovely idea")
    assert good.action == "allow" and not good.categories["insult"]
    assert 0.0 <= good.to_openai()["category_scores"]["insult"] < 0.7
    # rules-only moderators are unchanged: no classifier, scores 0/1
    assert Moderator.load().check("you absolute dimwit buffoon").scores is None


def test_classifier_blocks_a_stream_and_flag_policy_only_flags(tmp_path, classifier):
    guard = StreamGuard(_rules(tmp_path, classifier))
    sent = guard.feed("hello there, ") + guard.feed("you dimwit nincompoop buffoon") + guard.finish()
    assert guard.blocked and "dimwit" not in sent
    flag = _rules(tmp_path, classifier, policy="flag").check("such a buffoon")
    assert flag.action == "flag" and flag.flagged


def test_classifier_config_errors_are_one_clear_line(tmp_path, classifier):
    with pytest.raises(AigcError, match="no label 'rude'"):
        f = tmp_path / "r1.toml"
        f.write_text(f'[classifier]\nmodel = "{classifier}"\n[classifier.labels]\nrude = "violence"\n')
        Moderator.load(f).check("anything at all")
    f = tmp_path / "r2.toml"
    f.write_text(f'[classifier]\nmodel = "{classifier}"\n[classifier.labels]\ntoxic = "nosuch"\n')
    with pytest.raises(AigcError, match="unknown category 'nosuch'"):
        Moderator.load(f)
    f.write_text(
        f'[classifier]\nmodel = "{classifier}"\nthreshold = 2\n[classifier.labels]\ntoxic = "violence"\n'
    )
    with pytest.raises(AigcError, match=r"threshold 2 must be in \(0, 1\]"):
        Moderator.load(f)
    f.write_text("[classifier]\nthreshold = 0.5\n")
    with pytest.raises(AigcError, match="needs model"):
        Moderator.load(f)
    f.write_text(f'[classifier]\nmodel = "{tmp_path / "missing"}"\n[classifier.labels]\ntoxic = "violence"\n')
    with pytest.raises(AigcError):
        Moderator.load(f).check("some text")


def test_server_moderations_route_uses_the_classifier(tmp_path, classifier, monkeypatch):
    from fastapi.testclient import TestClient

    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings

    _rules(tmp_path, classifier)
    monkeypatch.setenv("AIGC_MODERATION", str(tmp_path / "rules.toml"))
    settings = Settings(
        models_dirs=[tmp_path / "models"], db=str(tmp_path / "s.db"), outputs_dir=tmp_path / "o"
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/moderations", json={"input": ["what a nincompoop dimwit", "nice work today"]})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert res[0]["flagged"] and res[0]["categories"]["insult"] and not res[1]["flagged"]
        assert res[0]["category_scores"]["insult"] >= 0.7 > res[1]["category_scores"]["insult"]
