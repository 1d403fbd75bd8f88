"""Preference data from the content store: the feedback on one model, checked, capped and split.

    gens = feedback_rows(store, "story", "text")         # generations of story@* with feedback
    data = build_preferences(gens, "dpo", base_dir, tokenizer_id, settings)

Steps (`build_preferences`):
1. refuse feedback on a different model: every generation names `name@version` and the hash of
   the weights that made it; the version's directory must still hold those weights and use the
   tuned model's tokenizer (or `tune.on_mismatch=skip` drops such rows);
2. cap each user's ratings and comparisons (`tune.max_per_user`, oldest kept), so one rater
   cannot outweigh the rest;
3. rows in TRL's shapes via `aigc.feedback.export.rows_from` (majority votes, deduplicated):
   dpo `{prompt, chosen, rejected}`, kto `{prompt, completion, label}`, sft `{prompt, completion}`;
4. a held-out slice, chosen by a hash of the prompt (stable across runs; with fewer than
   `MIN_PROMPTS_FOR_PROMPT_SPLIT` distinct prompts, by a hash of prompt + completion);
5. too few rows for the method -> AigcError saying how many it needs.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from aigc.errors import AigcError
from aigc.feedback.export import load_feedback, rows_from

METHODS = ("dpo", "kto", "sft")
MIN_PROMPTS_FOR_PROMPT_SPLIT = 10
# what each method needs, and the config key that sets the minimum
NEEDS = {
    "dpo": ("pairs", "min_pairs"),
    "kto": ("rated outputs", "min_unpaired"),
    "sft": ("corrections", "min_corrections"),
}


def feedback_rows(store: Any, model_name: str, kind: str) -> list[dict[str, Any]]:
    """Generations of any version of `model_name` (`name`, `name@*`) of `kind` that were rated or
    compared, oldest first, each with its `ratings` and `comparisons` (`export.load_feedback`)."""
    with Session(store.engine) as s:
        return load_feedback(s, kind=kind, models=[model_name])


@dataclass
class PreferenceSettings:
    """The `tune.*` keys preference building reads (a subset of `TuneConfig`)."""

    min_pairs: int = 32
    min_unpaired: int = 32
    min_corrections: int = 8
    max_per_user: int = 2000
    min_gap: float = 1.0
    max_pairs_per_prompt: int = 2000
    heldout_fraction: float = 0.1
    on_mismatch: str = "error"  # error | skip
    seed: int = 0


@dataclass
class PreferenceData:
    method: str
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def heldout_key(row: dict[str, Any], by_prompt: bool) -> str:
    """What decides a row's split: its prompt, or prompt + first output when prompts are few."""
    if by_prompt:
        return row["prompt"]
    return row["prompt"] + "\x00" + row.get("chosen", row.get("completion", ""))


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic: the first 8 hex of sha256(key) as a number in [0, 1)."""
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return h < fraction


def check_sources(
    gens: list[dict[str, Any]], base_dir: Path | None, tokenizer_id: str | None, on_mismatch: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep generations made by a version of this model with this tokenizer (see module doc)."""
    from aigc.tuning.versions import model_id, weights_hash
    from aigc.utils.io import read_json

    if on_mismatch not in ("error", "skip"):
        raise AigcError(f"tune.on_mismatch must be error or skip, got {on_mismatch!r}")
    if base_dir is None:
        return gens, {}
    name, version = model_id(base_dir)
    cache: dict[str, tuple[str | None, str | None] | None] = {}  # model id -> (hash, tokenizer id)

    def source(mid: str) -> tuple[str | None, str | None] | None:
        if mid not in cache:
            _, _, v = mid.partition("@")
            d = (
                (base_dir.parent / v)
                if (v and version is not None)
                else (base_dir if not v and version is None else None)
            )
            if d is None or not (d / "config.json").is_file():
                cache[mid] = None
            else:
                cfg = read_json(d / "config.json")
                tok = ((cfg.get("data") or {}).get("tokenizer") or {}).get("id")
                if tok is None and (d / "tokenizer.json").is_file():
                    from aigc.tokenizers import load_tokenizer

                    tok = load_tokenizer(d).id
                cache[mid] = (weights_hash(d), tok)
        return cache[mid]

    kept, bad = [], defaultdict(int)
    for g in gens:
        src = source(g["model"])
        if src is None:
            bad[f"{g['model']} (no such version on disk)"] += 1
        elif g["model_hash"] is not None and src[0] is not None and g["model_hash"] != src[0]:
            bad[f"{g['model']} (made by other weights, hash {g['model_hash']} != {src[0]})"] += 1
        elif tokenizer_id is not None and src[1] is not None and src[1] != tokenizer_id:
            bad[f"{g['model']} (tokenizer {src[1]} != {tokenizer_id})"] += 1
        else:
            kept.append(g)
    if bad and on_mismatch == "error":
        what = "; ".join(f"{n} from {k}" for k, n in sorted(bad.items()))
        raise AigcError(
            f"refusing feedback that refers to a different model or tokenizer than {base_dir}: {what}; "
            "tune the model that made it, or drop those rows with --set tune.on_mismatch=skip"
        )
    return kept, dict(bad)


def cap_per_user(gens: list[dict[str, Any]], max_per_user: int) -> tuple[list[dict[str, Any]], int]:
    """Each user's oldest `max_per_user` ratings and comparisons (0 = no cap); returns the dropped count."""
    if max_per_user <= 0:
        return gens, 0
    ratings = sorted((r["id"], r["user"]) for g in gens for r in g["ratings"])
    comparisons = sorted({(c["id"], c["user"]) for g in gens for c in g["comparisons"]})
    keep_r, keep_c, dropped = set(), set(), 0
    for rows, keep in ((ratings, keep_r), (comparisons, keep_c)):
        count: dict[Any, int] = defaultdict(int)
        for rid, user in rows:
            count[user] += 1
            if count[user] <= max_per_user:
                keep.add(rid)
            else:
                dropped += 1
    out = []
    for g in gens:
        g = dict(g, ratings=[r for r in g["ratings"] if r["id"] in keep_r],
                 comparisons=[c for c in g["comparisons"] if c["id"] in keep_c])  # fmt: skip
        if g["ratings"] or g["comparisons"]:
            out.append(g)
    return out, dropped


def _cap_pairs(rows: list[dict[str, Any]], per_prompt: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of at most `per_prompt` pairs per prompt (rating gaps pair every liked
    output with every disliked one: n^2 pairs from n outputs)."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_prompt[r["prompt"]].append(i)
    rng = random.Random(seed)
    keep = set()
    for idx in by_prompt.values():
        keep.update(idx if len(idx) <= per_prompt else rng.sample(idx, per_prompt))
    return [r for i, r in enumerate(rows) if i in keep]


def rated_models(store: Any, kind: str, limit: int = 5) -> list[tuple[str, int]]:
    """(model name as recorded, rated outputs) for the store's most rated models of `kind`."""
    import sqlalchemy as sa

    from aigc.feedback.schema import Generation

    query = (
        sa.select(Generation.model, sa.func.count())
        .where(Generation.kind == kind, Generation.rating_count > 0)
        .group_by(Generation.model)
        .order_by(sa.func.count().desc(), Generation.model)
        .limit(limit)
    )
    with Session(store.engine) as s:
        return [(m, n) for m, n in s.execute(query)]


def no_feedback_message(store: Any, name: str, kind: str, method: str) -> str:
    """Why there is nothing to tune on: the name looked for, and the names the store has ratings
    for (a run recorded under another name, e.g. a path, shows up here)."""
    what = NEEDS[method][0] if method in NEEDS else "rated outputs"
    others = rated_models(store, kind)
    held = (
        "it holds ratings for " + ", ".join(f"{m!r} ({n})" for m, n in others)
        if others
        else f"it holds no rated {kind} outputs at all"
    )
    return (
        f"0 usable {what}: the store {getattr(store, 'where', '')} has no rated or compared {kind} outputs of model "
        f"{name!r} (looked for {name!r} and {name + '@*'!r}); {held}; rate outputs of this model "
        f"(aigc generate {kind} --record, then aigc feedback rate ID 1), or tune another name's feedback "
        "with --set tune.model_name=NAME"
    )


def _more_feedback(gens: list[dict[str, Any]], method: str) -> str:
    """What feedback `method` is short of, said from what the store holds."""
    if method == "sft":
        return (
            "SFT trains on corrections, not thumbs: rate outputs with the text they should have been "
            "(aigc feedback rate ID -1 --correction TEXT, or the studio's correction field)"
        )
    if method == "kto":
        return "collect more feedback (rate more outputs, thumbs up or down)"
    scores = {
        round(sum(_score(r) for r in g["ratings"]) / len(g["ratings"]), 6) for g in gens if g["ratings"]
    }
    same = ""
    if len(scores) == 1 and not any(g["comparisons"] for g in gens):
        n = sum(1 for g in gens if g["ratings"])
        same = f"all {n} rated outputs are rated the same, so none can be paired; "
    return (
        f"{same}DPO pairs need two outputs of one prompt rated differently (>= tune.min_gap stars apart, "
        "e.g. one thumb up and one down) or a comparison of two; rate or compare more outputs "
        "(or use --method kto, which takes single ratings)"
    )


def _score(rating: dict[str, Any]) -> float:
    """A rating in stars (a thumb is 1 or 5), as the DPO rating gaps are measured."""
    return (3.0 + 2.0 * rating["value"]) if rating["kind"] == "thumb" else float(rating["value"])


def build_preferences(
    gens: list[dict[str, Any]],
    method: str,
    base_dir: Path | None,
    tokenizer_id: str | None,
    settings: Any,
) -> PreferenceData:
    """Training and held-out rows for `method` from `feedback_rows` output (see the module doc).

    `settings`: a `PreferenceSettings` or `TuneConfig` (the same attribute names).
    """
    if method not in METHODS:
        raise AigcError(f"unknown tuning method {method!r}; valid: {', '.join(METHODS)}")
    gens, mismatched = check_sources(gens, base_dir, tokenizer_id, settings.on_mismatch)
    gens, capped = cap_per_user(gens, settings.max_per_user)
    rows = rows_from(gens, method, min_gap=settings.min_gap)
    if method == "dpo":
        rows = _cap_pairs(rows, settings.max_pairs_per_prompt, settings.seed)
    by_prompt = len({r["prompt"] for r in rows}) >= MIN_PROMPTS_FOR_PROMPT_SPLIT
    train, heldout = [], []
    for r in rows:
        (heldout if is_heldout(heldout_key(r, by_prompt), settings.heldout_fraction) else train).append(r)
    what, key = NEEDS[method]
    need = getattr(settings, key)
    if len(train) < need:
        raise AigcError(
            f"{len(train)} usable {what} (after {len(heldout)} held out); {method.upper()} needs at least "
            f"{need} (config tune.{key}); {_more_feedback(gens, method)}, or lower it with --set tune.{key}=N"
        )
    users = {r["user"] for g in gens for r in g["ratings"]} | {
        c["user"] for g in gens for c in g["comparisons"]
    }
    stats = {
        "generations": len(gens),
        "ratings": sum(len(g["ratings"]) for g in gens),
        "comparisons": len({c["id"] for g in gens for c in g["comparisons"]}),
        "users": len(users),
        "capped": capped,
        "mismatched": mismatched,
        "rows": len(rows),
        "train": len(train),
        "heldout": len(heldout),
        "heldout_by": "prompt" if by_prompt else "prompt+completion",
        "prompts": len({r["prompt"] for r in rows}),
    }
    if method == "kto":
        stats["desirable"] = sum(r["label"] for r in train)
        stats["undesirable"] = len(train) - stats["desirable"]
    return PreferenceData(method, train, heldout, stats)


__all__ = [
    "METHODS",
    "PreferenceData",
    "PreferenceSettings",
    "build_preferences",
    "cap_per_user",
    "check_sources",
    "feedback_rows",
    "is_heldout",
    "no_feedback_message",
    "rated_models",
]
