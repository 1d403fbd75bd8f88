"""Evaluation reports: model samples beside a real-vs-real floor, with the protocol recorded.

`text_report` and `image_report` take samples that were already generated (the `aigc eval`
command generates them through the Generator and calls these), compute the metrics of
`text.py` / `images.py` for the samples and for held-out real data under the same protocol (the
floor a perfect model would reach), and return one JSON-ready dict. `write_report` saves it as
JSON + a short Markdown summary (+ PNG plots), atomically; `link_in_card` adds a link to a run's
card.md.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aigc.errors import AigcError


def cap_samples(requested: int, available: int, what: str) -> int:
    """`requested` capped at what the data supports, with a warning (never an error)."""
    if requested < 1:
        raise AigcError(f"--n must be >= 1, got {requested}")
    if available < 1:
        raise AigcError(f"the {what} is empty: there is nothing to compare the samples with")
    if requested > available:
        warnings.warn(
            f"--n {requested} is more than the {what} supports ({available}); using {available}",
            stacklevel=2,
        )
        return available
    return requested


def check_same_tokenizer(model_tokenizer_id: str, data_tokenizer_id: str) -> None:
    """A model is evaluated on data encoded with its own tokenizer, or the numbers mean nothing."""
    if model_tokenizer_id != data_tokenizer_id:
        raise AigcError(
            f"the model's tokenizer ({model_tokenizer_id}) differs from the data's ({data_tokenizer_id}); "
            "evaluate on data prepared with the model's tokenizer "
            "(aigc data prepare SOURCE --out DIR --tokenizer RUN_DIR)"
        )


# ----------------------------------------------------------------------------- text


def _text_metrics(seqs: list[list[int]], index: Any | None) -> dict[str, Any]:
    from aigc.evaluation.text import distinct_n, memorization, repetition_rate, self_bleu

    out: dict[str, Any] = {f"distinct_{n}": distinct_n(seqs, n) for n in (1, 2, 3)}
    out["self_bleu"] = self_bleu(seqs) if len(seqs) > 1 else None
    out["repetition_rate"] = repetition_rate(seqs)
    if index is not None:
        mem = memorization(seqs, index)
        out.update({k: v for k, v in mem.items() if k != "lcs"})
    return out


def real_snippets(tokens: np.ndarray, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` non-overlapping windows of `length` tokens from a real split, at seeded random slots."""
    slots = len(tokens) // length
    n = cap_samples(n, slots, f"real set ({len(tokens)} tokens in windows of {length})")
    pick = np.sort(np.random.default_rng(seed).choice(slots, size=n, replace=False))
    return [np.asarray(tokens[i * length : (i + 1) * length]).tolist() for i in pick]


def text_report(
    samples: Sequence[Sequence[int]],
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    seed: int = 0,
    index: Any | None = None,
    sampler: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    scorer: Any | None = None,
) -> dict[str, Any]:
    """Metrics of generated token sequences and of as many real held-out windows of the same length.

    `index`: a `TrainingIndex` of `train_tokens` (built here when None). `sampler`: the generation
    settings, recorded in the protocol. `extra`: more entries for "model" (e.g. val loss).
    `decode` + `scorer` (a trained classifier with a `positive` label): adds `positive_share`.
    """
    from aigc.evaluation.text import TrainingIndex

    seqs = [list(map(int, s)) for s in samples]
    if not seqs:
        raise AigcError("no samples to evaluate")
    length = max(1, int(np.median([len(s) for s in seqs])))
    real = real_snippets(val_tokens, len(seqs), length, seed)
    seqs = seqs[: len(real)]  # same number on both sides, so distinct-n and self-BLEU compare
    index = index or TrainingIndex.build(np.asarray(train_tokens))
    model_m, real_m = {**(extra or {}), **_text_metrics(seqs, index)}, _text_metrics(real, index)
    if scorer is not None and decode is not None:
        model_m["positive_share"] = scorer.positive_share([decode(x) for x in seqs])
        real_m["positive_share"] = scorer.positive_share([decode(x) for x in real])
    return {
        "kind": "text",
        "protocol": {
            "samples": len(seqs),
            "sample_tokens": length,
            "seed": seed,
            "ngram_n": index.n,
            "train_tokens": len(train_tokens),
            "sampler": sampler or {},
            "scorer": str(scorer.path) if scorer is not None and decode is not None else None,
        },
        "model": model_m,
        "real": real_m,
    }


# ----------------------------------------------------------------------------- images


def image_report(
    samples: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    heldout_images: np.ndarray,
    seed: int = 0,
    requested_labels: np.ndarray | None = None,
    sampler: dict[str, Any] | None = None,
    max_train_for_copies: int = 20000,
    feature_cfg: Any | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of generated images and of held-out real images (the floor), in the feature space
    of the data set's own classifier. Returns (report, copy grid uint8 (H, W, C))."""
    from aigc.evaluation.images import (
        as_float_images,
        check_same_shape,
        conditional_accuracy,
        copy_grid,
        extract_features,
        feature_classifier,
        image_metrics,
        nearest_neighbour_copy_check,
    )

    fake = as_float_images(samples)
    train = as_float_images(train_images)
    held = as_float_images(heldout_images)
    check_same_shape(fake, train, "samples", "training images")
    check_same_shape(held, train, "held-out images", "training images")
    model, info = feature_classifier(train, train_labels, feature_cfg)  # cached by data hash
    n = cap_samples(len(fake), min(len(held), len(train)), "real set (held-out and training images)")
    rng = np.random.default_rng(seed)
    fake = fake[:n]
    held_n = held[np.sort(rng.choice(len(held), n, replace=False))]
    train_n = train[np.sort(rng.choice(len(train), n, replace=False))]
    f_train, f_fake, f_held = (extract_features(model, x) for x in (train_n, fake, held_n))
    # copy check: the threshold is the 1% quantile of held-out images' distances to the training
    # set, so by construction about 1% of real unseen images are flagged (the floor below)
    copies_pool = train[:max_train_for_copies]
    check = nearest_neighbour_copy_check(fake, copies_pool, reference=held_n)
    model_metrics = {**image_metrics(f_train, f_fake, seed=seed), "copies": check.summary()}
    if requested_labels is not None:
        model_metrics["label_accuracy"] = conditional_accuracy(model, fake, np.asarray(requested_labels)[:n])
    floor_check = nearest_neighbour_copy_check(held_n, copies_pool, threshold=check.threshold)
    report = {
        "kind": "images",
        "protocol": {
            "samples": n,
            "seed": seed,
            "feature_network": info["network"],
            "feature_network_hash": info["hash"],
            "feature_network_test_accuracy": info["test_accuracy"],
            "feature_dim": info["feature_dim"],
            "precision_recall_k": 3,
            "copy_threshold": check.threshold,
            "sampler": sampler or {},
        },
        "model": model_metrics,
        "real": {**image_metrics(f_train, f_held, seed=seed), "copies": floor_check.summary()},
    }
    return report, copy_grid(fake, copies_pool, check)


# ----------------------------------------------------------------------------- writing


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def summary_markdown(report: dict[str, Any], title: str = "Evaluation") -> str:
    """A short Markdown summary: the protocol, then metric | model | real floor."""
    proto = ", ".join(f"{k} {_fmt(v)}" for k, v in report["protocol"].items() if not isinstance(v, dict))
    keys = [k for k, v in report["model"].items() if not isinstance(v, (dict, list))]
    sides = ["model", "real"] + (["baseline"] if "baseline" in report else [])  # music: unigram baseline
    head = "| metric | model | real vs real |" + (" baseline |" if "baseline" in report else "")
    rows = "\n".join(f"| {k} | " + " | ".join(_fmt(report[s].get(k)) for s in sides) + " |" for k in keys)
    sampler = json.dumps(report["protocol"].get("sampler") or {})
    return (
        f"# {title}\n\nProtocol: {proto}; sampler {sampler}.\n\n"
        f"{head}\n|{'---|' * (len(sides) + 1)}\n{rows}\n"
    )


def write_report(
    out: str | Path,
    report: dict[str, Any],
    images: dict[str, np.ndarray] | None = None,
    title: str = "Evaluation",
) -> Path:
    """`out` (report.json) + `out`.md summary + one PNG per entry of `images`, all atomic."""
    from aigc.utils.io import atomic_write, atomic_write_json, atomic_write_text

    out = Path(out)
    md = summary_markdown(report, title)
    for name, arr in (images or {}).items():
        try:
            from PIL import Image
        except ImportError:  # plots are a bonus; the numbers are in the JSON
            break
        png = out.with_name(f"{out.stem}-{name}.png")
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        atomic_write(png, lambda p, im=pil: im.save(p, format="PNG"))
        md += f"\n![{name}]({png.name})\n"
    atomic_write_json(out, report)
    atomic_write_text(out.with_suffix(".md"), md)
    return out


def link_in_card(run_dir: str | Path, report_path: str | Path) -> None:
    """Add (or replace) an "## Evaluation" section in the run's card.md linking the report."""
    from aigc.utils.io import atomic_write_text

    card = Path(run_dir) / "card.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# {Path(run_dir).name}\n"
    rel = Path(report_path)
    if rel.resolve().is_relative_to(Path(run_dir).resolve()):  # inside the run: a relative link
        rel = rel.resolve().relative_to(Path(run_dir).resolve())
    section = f"## Evaluation\n\nReport: [{rel}]({rel}) ([summary]({rel.with_suffix('.md')}))\n"
    if re.search(r"^## Evaluation\n", text, flags=re.M):
        text = re.sub(r"^## Evaluation\n.*?(?=^## |\Z)", section + "\n", text, flags=re.M | re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(card, text)
