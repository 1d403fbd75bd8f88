"""`aigc train classifier`: the adapter registered in `aigc.cli.TRAINERS`.

Thin: parse options, call `aigc.evaluation.sentiment`, print. Logs go to stderr, the result to
stdout; `AigcError` is turned into one line + exit 1 by `aigc.cli.main`.
"""

from __future__ import annotations

import json
import time

from rich.console import Console

from aigc.errors import AigcError

out = Console()
err = Console(stderr=True)


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
