"""CLI commands for classifiers: `aigc train classifier` (registered by the `train` group).

Thin: parse options, call `aigc.evaluation.sentiment`, print. Logs go to stderr, the result to
stdout; `AigcError` is turned into one line + exit 1 by `aigc.cli.main`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from aigc.errors import AigcError
from aigc.utils.io import read_json

out = Console()
err = Console(stderr=True)


def parse_label_names(text: str | None) -> dict[str, str] | None:
    """ "0=negative,1=positive" -> {"0": "negative", "1": "positive"}."""
    if not text:
        return None
    names = {}
    for part in text.split(","):
        raw, sep, name = part.partition("=")
        if not sep or not raw.strip() or not name.strip():
            raise AigcError(f"--label-names entry {part!r} is not label=name (e.g. 0=negative,1=positive)")
        names[raw.strip()] = name.strip()
    return names


def train_classifier_cmd(
    data: Annotated[
        list[Path],
        typer.Option(
            "--data",
            "-d",
            help="Labelled file(s): TSV text<TAB>label, CSV text,label, or JSONL (repeatable).",
        ),
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/classifier-<time>).")
    ] = None,
    kind: Annotated[
        str,
        typer.Option("--kind", help="ngram (trained from scratch) or embeddings (local MiniLM + logistic)."),
    ] = "ngram",
    fmt: Annotated[
        str | None, typer.Option("--format", help="tsv, csv or jsonl (default: from the file extension).")
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Allowed labels, comma-separated; any other is an error.")
    ] = None,
    label_names: Annotated[
        str | None, typer.Option("--label-names", help="Display names, e.g. 0=negative,1=positive.")
    ] = None,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Held-out share (stratified).")
    ] = 0.2,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data (ngram kind).")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the training.")] = 0,
    encoder: Annotated[
        Path | None, typer.Option("--encoder", help="Local sentence-embedding model dir (embeddings kind).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")
    ] = False,
) -> None:
    """Train a text classifier (e.g. sentiment) on your labelled data; report held-out accuracy."""
    from aigc.evaluation.sentiment import ClassifierTrainConfig, train_classifier

    if kind not in ("ngram", "embeddings"):
        raise AigcError(f"--kind {kind!r} is not allowed; use ngram or embeddings")
    if fmt is not None and fmt not in ("tsv", "csv", "jsonl"):
        raise AigcError(f"--format {fmt!r} is not allowed; use tsv, csv or jsonl")
    if epochs < 1:
        raise AigcError(f"--epochs must be >= 1, got {epochs}")
    cfg = ClassifierTrainConfig(
        kind=kind,  # type: ignore[arg-type]
        test_fraction=test_fraction,
        seed=seed,
        epochs=epochs,
        encoder=str(encoder) if encoder else None,
    )
    target = out_dir or Path("runs") / time.strftime("classifier-%Y%m%d-%H%M%S")
    allowed = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    path = train_classifier(
        [str(p) for p in data],
        target,
        cfg,
        label_names=parse_label_names(label_names),
        labels=allowed,
        format=fmt,  # type: ignore[arg-type]
        overwrite=overwrite,
        log=lambda s: err.print(s, highlight=False),
    )
    metrics = (path / "metrics.jsonl").read_text(encoding="utf-8").strip().splitlines()
    test = json.loads(metrics[-1])
    labels_out = read_json(path / "config.json")["labels"]
    out.print(
        f"{path}  held-out accuracy {test['accuracy']:.4f} ({test['n']} examples, labels: {', '.join(labels_out)})",
        highlight=False,
        soft_wrap=True,
    )


def train_family(
    family: str,
    data: str,
    out: str,
    preset: str | None = None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    resume: bool = False,
    init_from: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log=None,
):
    """Adapter for the `aigc train FAMILY` command (`TRAINERS["classifier"]`).

    `--data` is a labelled file, or several joined by commas; settings come as `--set kind=embeddings`
    (or `--set train.kind=...`), keys of `ClassifierTrainConfig`. Returns an
    `aigc.training.TrainResult` (steps = optimizer steps; final = the held-out metrics).
    """
    import math

    from aigc.config import from_dict, parse_overrides
    from aigc.evaluation.sentiment import ClassifierTrainConfig, train_classifier
    from aigc.training.trainer import TrainResult

    if resume or init_from:
        raise AigcError(
            "a classifier trains in seconds: --resume / --init-from are not supported; rerun with --overwrite"
        )
    if preset not in (None, "auto"):
        raise AigcError(
            "the classifier has no presets; change settings with --set, e.g. --set kind=embeddings"
        )
    sets = parse_overrides(overrides)
    sets = {**{k: v for k, v in sets.items() if k != "train"}, **sets.get("train", {})}
    cfg = from_dict(ClassifierTrainConfig, sets, prefix="train.")
    t0 = time.perf_counter()
    files = [f.strip() for f in str(data).split(",") if f.strip()]
    path = train_classifier(files, out, cfg, overwrite=overwrite, log=log)
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text(encoding="utf-8").strip().splitlines()]
    test = rows[-1]
    refit = max((i for i, r in enumerate(rows) if "refit_on" in r), default=-1)
    epochs = sum(1 for r in rows[refit + 1 :] if "epoch" in r)  # of the final fit
    steps = epochs * math.ceil(test["train_n"] / cfg.batch_size) if cfg.kind == "ngram" else epochs
    final = {"accuracy": test["accuracy"], "nll": test["nll"], "n": test["n"]}
    return TrainResult(path, steps, time.perf_counter() - t0, "epochs", None, final)
