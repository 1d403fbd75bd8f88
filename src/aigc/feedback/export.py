"""Feedback as TRL data sets: dpo (prompt / chosen / rejected), kto (prompt / completion / label)
and sft (prompt / completion), the shapes `trl`'s DPOTrainer, KTOTrainer and SFTTrainer read.

Two steps, so tuning can filter in between (one model's generations, per-user caps):
`load_feedback` reads the rated or compared generations with their ratings and comparisons as
plain dicts; `rows_from` turns such a list into rows. `export_rows` is both, for the whole store.

Only generations with a text output take part in dpo and kto (images and audio have no
completion text). Rows are deduplicated; contradicting votes are settled by majority, and
explicit comparisons take precedence over differences in ratings.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from aigc.errors import AigcError
from aigc.feedback.schema import Comparison, Generation, Rating

EXPORT_FORMATS = ("dpo", "kto", "sft")


def _stars(kind: str, value: int) -> float:  # = store.stars_score (not imported: store imports us)
    return (3.0 + 2.0 * value) if kind == "thumb" else float(value)


def load_feedback(
    s: Session, *, kind: str | None = None, models: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Every generation that was rated or compared, oldest first, as a dict with its `ratings`
    (`id, kind, value, user, correction`, oldest first) and `comparisons` (`id, a, b, winner, user`;
    only those whose both sides are in the list).

    `kind`: only generations of this kind; `models`: only these model names, any version
    (`name` matches `name` and `name@*`).
    """
    compared = sa.select(Comparison.a_id).union(sa.select(Comparison.b_id))
    query = sa.select(Generation).where((Generation.rating_count > 0) | Generation.id.in_(compared))
    if kind is not None:
        query = query.where(Generation.kind == kind)
    if models:
        query = query.where(
            sa.or_(
                *[
                    (Generation.model == m) | Generation.model.startswith(m + "@", autoescape=True)
                    for m in models
                ]
            )
        )
    gens: dict[int, dict[str, Any]] = {}
    for g in s.scalars(query.order_by(Generation.id)):
        row = g.to_dict()
        row["ratings"], row["comparisons"] = [], []
        gens[g.id] = row
    if not gens:
        return []
    ids = list(gens)
    for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500)):  # bound the IN list
        for r in s.scalars(sa.select(Rating).where(Rating.generation_id.in_(chunk)).order_by(Rating.id)):
            gens[r.generation_id]["ratings"].append(
                {"id": r.id, "kind": r.kind, "value": r.value, "user": r.user_id, "correction": r.correction}
            )
    for c in s.scalars(sa.select(Comparison).order_by(Comparison.id)):
        if c.a_id in gens and c.b_id in gens:
            row = {"id": c.id, "a": c.a_id, "b": c.b_id, "winner": c.winner_id, "user": c.user_id}
            gens[c.a_id]["comparisons"].append(row)
            gens[c.b_id]["comparisons"].append(row)
    for g in gens.values():
        g["ratings"].sort(key=lambda r: r["id"])
    return list(gens.values())


def rows_from(
    generations: list[dict[str, Any]], format: str, *, min_gap: float = 1.0
) -> list[dict[str, Any]]:
    """TRL rows from `load_feedback`'s generations (possibly filtered), deduplicated.

    dpo: prompt / chosen / rejected, from comparisons (majority vote per pair; ties dropped) and
         from uncompared same-prompt generations whose mean ratings differ by >= `min_gap` stars;
    kto: prompt / completion / label, one row per generation with thumbs (label = majority);
    sft: prompt / completion, from the corrections users wrote.
    """
    if format not in EXPORT_FORMATS:
        raise AigcError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format == "sft":
        fixes = sorted((r["id"], g["prompt"], r["correction"]) for g in generations for r in g["ratings"]
                       if r["correction"] is not None)  # fmt: skip
        out = [{"prompt": p, "completion": c} for _, p, c in fixes if c.strip()]
    elif format == "kto":
        out = []
        for g in generations:
            thumbs = [r["value"] for r in g["ratings"] if r["kind"] == "thumb"]
            if thumbs and g["output_text"] is not None and sum(thumbs) != 0:
                out.append({"prompt": g["prompt"], "completion": g["output_text"], "label": sum(thumbs) > 0})
    else:
        out = _dpo_rows(generations, min_gap)
    return _dedupe(out)


def export_rows(s: Session, format: str, *, min_gap: float = 1.0) -> list[dict[str, Any]]:
    """Feedback of the whole store as TRL data set rows (see `rows_from`)."""
    if format not in EXPORT_FORMATS:
        raise AigcError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    return rows_from(load_feedback(s), format, min_gap=min_gap)


def _dpo_rows(generations: list[dict[str, Any]], min_gap: float) -> list[dict[str, Any]]:
    texts = {g["id"]: (g["prompt"], g["output_text"]) for g in generations if g["output_text"] is not None}
    # 1. explicit comparisons: count wins per unordered pair, keep the majority
    wins: Counter[tuple[int, int]] = Counter()
    seen: set[int] = set()
    for g in generations:
        for c in g["comparisons"]:
            if c["id"] in seen:
                continue  # each comparison sits on both of its generations
            seen.add(c["id"])
            w = c["winner"]
            wins[(w, c["b"] if w == c["a"] else c["a"])] += 1
    out, compared = [], {frozenset(pair) for pair in wins}  # ties too: no rating-gap pair for them
    for (w, lo), n in sorted(wins.items()):
        if n <= wins.get((lo, w), 0):
            continue  # a tie or the minority view
        if w in texts and lo in texts and texts[w][0] == texts[lo][0]:
            out.append({"prompt": texts[w][0], "chosen": texts[w][1], "rejected": texts[lo][1]})
    # 2. rating gaps between outputs of the same prompt (pairs users compared are left to that)
    by_prompt: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for g in generations:
        if g["ratings"] and g["output_text"] is not None:
            scores = [_stars(r["kind"], r["value"]) for r in g["ratings"]]
            by_prompt[g["prompt"]].append((sum(scores) / len(scores), g["id"]))
    for prompt, rated in by_prompt.items():
        for (ra, ga), (rb, gb) in itertools.combinations(sorted(rated, reverse=True), 2):
            if ra - rb >= min_gap and frozenset((ga, gb)) not in compared:
                out.append({"prompt": prompt, "chosen": texts[ga][1], "rejected": texts[gb][1]})
    return [r for r in out if r["chosen"] != r["rejected"]]


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


__all__ = ["EXPORT_FORMATS", "export_rows", "load_feedback", "rows_from"]
