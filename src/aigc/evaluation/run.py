"""`aigc eval`: evaluate a trained run on its data and write a report beside it.

    report = evaluate("runs/shakespeare", n=1000, seed=0)      # -> runs/shakespeare/eval/report.json

The glue between a run, its prepared data and the metrics: it loads the run through `aigc.load`
(TextGenerator for gpt/lstm, ImageGenerator for diffusion/gan/vae), finds the data (the prepared
directory the run's config.json records, or `data=`), checks the two fit (same tokenizer / image
shape), generates `n` samples with a recorded seed and sampler, and hands them to
`report.text_report` / `report.image_report` (or the music metrics). The result is written as
report.json + report.md (+ PNGs), atomically, and linked from the run's card.md.

Sample i is generated with seed `seed + i` (the TextGenerator's own rule for n samples), so any
single sample of a report can be reproduced alone.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aigc.errors import AigcError
from aigc.registry import IMAGE_FAMILIES, TEXT_FAMILIES

DEFAULT_TEXT_TOKENS = 128  # new tokens per text sample (at most context - 1) without --max-new-tokens
MUSIC_BARS = 8  # bars per generated piece (MusicGenerator's default length)
MAX_LOSS_TOKENS = 131_072  # held-out tokens scored for val loss (the mean settles long before)
TEXT_BATCH = 128  # prompts per TextGenerator.generate call
IMAGE_VAL_FRACTION = 0.05  # as training/image_tasks._ImageTask: the last 5% (<= 512) are held out
EXAMPLES = 5  # decoded samples kept in the report
# the generation settings recorded in the protocol (the rest of GenerationParams stays at defaults)
SAMPLER_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")


def evaluate(
    run: str | Path,
    data: str | Path | None = None,
    n: int = 1000,
    seed: int = 0,
    out: str | Path | None = None,
    classifier: str | Path | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 64,
    feature_cfg: Any | None = None,
    link_card: bool = True,
    dtype: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate run directory `run` and write its report; returns the report dict.

    `data`: a prepared directory (default: the one recorded in the run's config.json).
    `n`: samples to generate (capped, with a warning, at what the real held-out set supports).
    `out`: the report path (default `run/eval/report.json`; report.md and PNGs go beside it).
    `classifier`: a sentiment classifier run, adds the positive share of text samples.
    Text/music: `max_new_tokens`, `temperature`, `top_k`, `top_p`. Images: `sampler`, `steps`,
    `guidance` (diffusion), `batch_size`, `dtype` (diffusion sampling precision: auto = bf16
    autocast where it beats fp32 on this CPU, or fp32; recorded in the protocol); `feature_cfg`
    (`images.FeatureTrainConfig`) for the feature network. Warnings (e.g. a capped `n`) are listed in `report["warnings"]`.
    """
    from aigc.evaluation.report import link_in_card, write_report
    from aigc.utils.io import read_json

    say = log or (lambda msg: None)
    run = Path(run)
    if not (run / "config.json").is_file():
        raise AigcError(f"{run} is not a run directory (no config.json); pass the --out of `aigc train`")
    out = Path(out) if out is not None else run / "eval" / "report.json"
    if out.suffix != ".json":
        raise AigcError(f"--out {out} must end in .json (report.md and PNGs are written beside it)")
    cfg = read_json(run / "config.json")
    family = cfg.get("family")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if family in IMAGE_FAMILIES:
            if classifier is not None or max_new_tokens is not None:
                raise AigcError("--classifier and --max-new-tokens apply to text runs; drop them for images")
            report, images = _evaluate_images(
                run, cfg, data, n, seed, sampler, steps, guidance, batch_size, feature_cfg, say, dtype
            )
        elif family in TEXT_FAMILIES:
            if sampler is not None or steps is not None or guidance is not None or dtype != "auto":
                raise AigcError(
                    "--sampler/--steps/--guidance/--dtype apply to diffusion runs; drop them for text"
                )
            sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
            report, images = _evaluate_tokens(
                run, cfg, data, n, seed, classifier, max_new_tokens, sampling, say
            )
        else:
            raise AigcError(
                f"{run} holds a {family!r} model; aigc eval takes text ({', '.join(TEXT_FAMILIES)}) "
                f"or image ({', '.join(IMAGE_FAMILIES)}) runs"
            )
    # the user's warnings (e.g. a capped --n); library deprecation noise is only re-emitted
    report["warnings"] = list(dict.fromkeys(str(w.message) for w in caught if w.category is UserWarning))
    report["protocol"]["seconds"] = round(time.perf_counter() - t0, 2)
    for w in caught:  # re-emitted outside the recording block, so callers see them too
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    samples = report.pop("_samples", None)
    if samples is not None:  # every decoded sample with its seed, one JSON object per line
        from aigc.utils.io import atomic_write_text

        lines = [json.dumps(s, ensure_ascii=False) for s in samples]
        atomic_write_text(out.with_name(f"{out.stem}-samples.jsonl"), "\n".join(lines) + "\n")
    write_report(out, report, images, title=f"Evaluation of {run.name}")
    if link_card:
        link_in_card(run, out)
    say(f"wrote {out} ({report['protocol']['seconds']} s)")
    return report


# ----------------------------------------------------------------------------- data


def _data_dir(run: Path, cfg: dict[str, Any], data: str | Path | None, key: str) -> Path:
    """`data`, or the prepared directory the run's config.json records under data.<key>."""
    if data is not None:
        path = Path(data)
    else:
        recorded = (cfg.get("data") or {}).get(key)
        if not recorded:
            raise AigcError(f"{run}/config.json does not record its data directory; pass --data PREPARED")
        path = Path(recorded)
        if not path.is_absolute() and not path.exists():
            path = run / path
    if not (path / "meta.json").is_file():
        hint = "" if data is not None else f" (recorded in {run}/config.json)"
        raise AigcError(
            f"prepared data {path}{hint} not found (no meta.json); pass --data with the directory "
            "made by `aigc data prepare`"
        )
    return path


# ----------------------------------------------------------------------------- text and music


def _lm_scores(model: Any, val: np.ndarray, meta: dict[str, Any]) -> tuple[dict[str, float], int]:
    """Val loss, perplexity, bits per token and per byte on (at most MAX_LOSS_TOKENS of) the held-out split."""
    from aigc.evaluation.text import bits_per_byte, bits_per_token, lm_loss, perplexity

    block = int(model.config.block_size)
    batch = 64  # measured: 5x less CPU per token than batches of 16 for a tiny GPT
    max_batches = max(1, math.ceil(MAX_LOSS_TOKENS / (block * batch)))
    loss, scored = lm_loss(model, np.asarray(val), block, batch_size=batch, max_batches=max_batches)
    # bits/byte uses the whole split's tokens/bytes ratio: the scored part is a prefix of it
    bpb = (
        bits_per_byte(loss, int(meta["val_tokens"]), int(meta["val_bytes"]))
        if meta.get("val_bytes")
        else None
    )
    scores = {"val_loss": loss, "perplexity": perplexity(loss), "bits_per_token": bits_per_token(loss)}
    return {**scores, "bits_per_byte": bpb}, scored


def _load_token_data(path: Path) -> tuple[Any, str]:
    from aigc.utils.io import read_json

    kind = read_json(path / "meta.json").get("kind")
    if kind == "music":
        from aigc.data.music import load_prepared_music

        return load_prepared_music(path), kind
    if kind == "text":
        from aigc.data import load_prepared

        return load_prepared(path), kind
    raise AigcError(f"{path} holds {kind!r} data; a text run is evaluated on prepared text or music data")


def _evaluate_tokens(
    run: Path,
    cfg: dict[str, Any],
    data: str | Path | None,
    n: int,
    seed: int,
    classifier: str | Path | None,
    max_new_tokens: int | None,
    sampling: dict[str, Any],
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import aigc
    from aigc.evaluation.report import cap_samples, check_same_tokenizer

    prepared, kind = _load_token_data(_data_dir(run, cfg, data, "path"))
    gen = aigc.load(run)
    check_same_tokenizer(gen.tokenizer.id, prepared.tokenizer.id)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise AigcError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    say(f"scoring the held-out split of {prepared.path} ({len(prepared.val):,} tokens)")
    scores, scored = _lm_scores(gen.model, prepared.val, prepared.meta)
    if kind == "music":
        return _music_report(gen, prepared, n, seed, max_new_tokens, sampling, scores, scored, say)

    # default: samples fit the model's context (a longer one would be judged past what it was trained on)
    context = gen.context_length
    length = max_new_tokens or min(DEFAULT_TEXT_TOKENS, context - 1 if context else DEFAULT_TEXT_TOKENS)
    # the real floor needs as many held-out windows of the samples' length as there are samples
    n = cap_samples(
        n, len(prepared.val) // length, f"held-out split ({len(prepared.val)} tokens, {length} per sample)"
    )
    scorer = None
    if classifier is not None:
        from aigc.evaluation.sentiment import load_classifier

        scorer = load_classifier(classifier)
    say(f"generating {n} samples of up to {length} tokens (seed {seed})")
    results = []
    for start in range(0, n, TEXT_BATCH):  # seeds seed+start+k: sample i has seed seed+i
        b = min(TEXT_BATCH, n - start)
        results += gen.generate("", n=b, seed=seed + start, max_new_tokens=length, **sampling)
    samples = [r.tokens for r in results]
    sampler = {k: results[0].params.get(k) for k in SAMPLER_KEYS} | {"seed": seed, "n": n}
    from aigc.evaluation.report import text_report
    from aigc.evaluation.text import cached_index

    say(f"memorization index of the training split ({len(prepared.train):,} tokens, cached)")
    index = cached_index(
        np.asarray(prepared.train), key=f"{prepared.meta.get('source_hash')}-{prepared.tokenizer.id}"
    )
    report = text_report(
        samples,
        prepared.train,
        prepared.val,
        seed=seed,
        index=index,
        sampler=sampler,
        extra=scores,
        decode=gen.decode,
        scorer=scorer,
    )
    report["protocol"]["val_tokens_scored"] = scored
    report["run"], report["data"] = str(run), str(prepared.path)
    report["examples"] = [r.text for r in results[:EXAMPLES]]
    report["_samples"] = [{"seed": r.seed, "text": r.text, "finish_reason": r.finish_reason} for r in results]
    return report, {}


def _music_report(
    gen: Any,
    prepared: Any,
    n: int,
    seed: int,
    max_new_tokens: int | None,
    sampling: dict[str, Any],
    scores: dict[str, float],
    scored: int,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`n` pieces of MUSIC_BARS bars through the MusicGenerator, conditioned in turn on each
    held-out piece's style, key and meter; compared with the held-out pieces, beside the
    training pieces (the floor) and the unigram baseline (what a model must beat)."""
    from aigc.evaluation.music import compare, unigram_baseline, valid_midi_share
    from aigc.generation.music import MAX_N
    from aigc.generation.music_render import midi_bytes
    from aigc.tokenizers.music import METERS

    if n < 1:
        raise AigcError(f"--n must be >= 1, got {n}")
    if not hasattr(gen, "prompt_ids"):
        raise AigcError(f"{gen.model_id} did not load as a music model; evaluate it on prepared text data")
    tok = prepared.tokenizer
    val, train = list(prepared.pieces("val")), list(prepared.pieces("train"))
    if not val or not train:
        raise AigcError(f"{prepared.path} needs pieces in both splits to compare music; prepare more pieces")
    # 1. one condition per sample, taken from the held-out pieces in turn; grouped into calls
    groups: dict[tuple, int] = {}
    for i in range(n):
        p = val[i % len(val)]
        cond = (
            p.key or "C major",
            p.meter if p.meter in METERS else "4/4",
            p.style if p.style in tok.styles else None,
        )
        groups[cond] = groups.get(cond, 0) + 1
    say(f"generating {n} pieces of {MUSIC_BARS} bars over {len(groups)} conditions (seed {seed})")
    results, offset = [], 0
    for (key, meter, style), count in groups.items():
        for start in range(0, count, MAX_N):  # seeds seed+offset, seed+offset+1, ...: all distinct
            m = min(MAX_N, count - start)
            results += gen.generate(
                n=m, key=key, meter=meter, style=style, bars=MUSIC_BARS, seed=seed + offset,
                formats=("mid",), max_new_tokens=max_new_tokens,
                **{k: v for k, v in sampling.items() if v is not None},
            )  # fmt: skip
            offset += m
    pieces = [r.piece for r in results]

    def midi_share(ps: list[Any]) -> float:
        files = []
        for p in ps:
            try:
                files.append(midi_bytes(p))
            except (AigcError, ValueError):  # e.g. an empty piece: not a valid MIDI file
                files.append(b"")
        return valid_midi_share(files)

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        stats = {k: v for k, v in d.pop("generated").items() if k != "pieces"}
        d.pop("reference")
        return {**d, **stats}

    events = sum(len(r.tokens) for r in results)
    model = {
        **scores,
        "valid_midi_share": valid_midi_share([r.midi or b"" for r in results]),
        "skipped_event_share": sum(r.skipped for r in results) / max(1, events),
        **flat(compare(pieces, val)),
    }
    floor_pieces = train[: max(len(val), min(n, len(train)))]
    baseline = unigram_baseline(train, n, bars=MUSIC_BARS, seed=seed)
    report = {
        "kind": "music",
        "protocol": {
            "samples": n,
            "seed": seed,
            "bars": MUSIC_BARS,
            "reference_pieces": len(val),
            "floor": f"{len(floor_pieces)} training pieces vs the held-out pieces",
            "baseline": "unigram: pitches and durations drawn independently from the training histograms",
            "val_tokens_scored": scored,
            "sampler": {**results[0].params, "seed": seed, "n": n, "conditions": len(groups)},
        },
        "model": model,
        "real": {"valid_midi_share": midi_share(floor_pieces), **flat(compare(floor_pieces, val))},
        "baseline": {"valid_midi_share": midi_share(baseline), **flat(compare(baseline, val))},
        "run": str(gen.model_id),
        "data": str(prepared.path),
        "examples": [tok.decode(r.tokens[:64]) for r in results[:EXAMPLES]],
    }
    report["_samples"] = [r.to_dict() for r in results]
    return report, {}


# ----------------------------------------------------------------------------- images


def _evaluate_images(
    run: Path,
    cfg: dict[str, Any],
    data: str | Path | None,
    n: int,
    seed: int,
    sampler: str | None,
    steps: int | None,
    guidance: float | None,
    batch_size: int,
    feature_cfg: Any | None,
    say: Callable[[str], None],
    dtype: str = "auto",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Images from the run vs the training images, with the held-out images as the real floor.

    Held-out images: the last 5% (<= 512) of the training data, as training held them out; or,
    when `data` is another data set (e.g. MNIST's test split), all of it.
    """
    import torch

    import aigc
    from aigc.data.images import load_prepared_images
    from aigc.evaluation.report import cap_samples, image_report

    run_data = cfg.get("data") or {}
    path = _data_dir(run, cfg, data, "dir")
    prepared = load_prepared_images(path)
    want = list(run_data.get("shape") or [])
    got = list(prepared.meta.get("shape") or [])
    if want and got != want:
        raise AigcError(
            f"{path} holds images of shape {tuple(got)} (C, H, W) but {run.name} makes {tuple(want)}; "
            "evaluate on data prepared at the run's size and channels (aigc data prepare --set size=...)"
        )
    same_data = run_data.get("source_hash") in (None, prepared.meta.get("source_hash"))
    recorded = Path(run_data["dir"]) if run_data.get("dir") else None
    if same_data or recorded is None or not (recorded / "meta.json").is_file():
        count = len(prepared.images)
        val_count = min(512, int(count * IMAGE_VAL_FRACTION)) if count >= 40 else 0
        train_x, train_y = prepared.images[: count - val_count], prepared.labels[: count - val_count]
        held = prepared.images[count - val_count :]
        held_desc = f"the last {val_count} images of {path} (held out in training)"
    else:  # another data set of the same shape: all of it is unseen
        training = load_prepared_images(recorded)
        train_x, train_y, held = training.images, training.labels, prepared.images
        held_desc = f"all {len(held)} images of {path}"
    n = cap_samples(n, min(len(held), len(train_x)), f"real set ({held_desc})")

    gen = aigc.load(run)
    say(f"generating {n} images (seed {seed})")
    result = gen.generate(
        n=n, seed=seed, guidance=guidance, sampler=sampler, steps=steps, batch_size=batch_size, dtype=dtype
    )
    lo, hi = (run_data.get("value_range") or prepared.meta.get("value_range") or (-1.0, 1.0))[:2]
    x = ((result.tensor.float().clamp(lo, hi) - lo) / (hi - lo) * 255).round()  # model range -> uint8
    samples = x.to(torch.uint8).numpy()  # (n, C, H, W)
    p0 = result.params[0]
    sampler_rec = {k: p0.get(k) for k in ("sampler", "steps", "guidance")} | {"seed": seed, "n": n}
    if "dtype" in p0:  # diffusion: the sampling precision is part of the protocol
        sampler_rec["dtype"] = p0["dtype"]
    labels = np.array([p["label"] for p in result.params]) if getattr(gen, "conditional", False) else None
    say("feature network (cached by data hash), Frechet distance, KID, precision/recall, copy check")
    report, grid = image_report(
        samples,
        train_x,
        train_y,
        held,
        seed=seed,
        requested_labels=labels,
        sampler=sampler_rec,
        feature_cfg=feature_cfg,
    )
    report["protocol"]["held_out"] = held_desc
    report["run"], report["data"] = str(run), str(path)
    from aigc.generation.image_io import make_grid

    sample_grid = np.asarray(make_grid(result.images[:64]))
    sample_grid = sample_grid[..., None] if sample_grid.ndim == 2 else sample_grid
    return report, {"copies": grid, "samples": sample_grid}


__all__ = ["evaluate"]
