"""Feedback as TRL data sets: dpo (prompt / chosen / rejected), kto (prompt / completion / label)
and sft (prompt / completion), the shapes `trl`'s DPOTrainer, KTOTrainer and SFTTrainer read.

Only generations with a text output take part (images and audio have no completion text).
Rows are deduplicated; contradicting votes are settled by majority, and explicit comparisons
take precedence over differences in ratings.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from aigc.errors import AigcError
from aigc.feedback.schema import Comparison, Generation, Rating

EXPORT_FORMATS = ("dpo", "kto", "sft")


def export_rows(s: Session, format: str, *, min_gap: float = 1.0) -> list[dict[str, Any]]:
    """Feedback as TRL data set rows, deduplicated. Only text outputs take part.

    dpo: prompt / chosen / rejected, from comparisons (majority vote per pair; ties dropped) and
         from uncompared same-prompt generations whose mean ratings differ by >= `min_gap` stars;
    kto: prompt / completion / label, one row per generation with thumbs (label = majority);
    sft: prompt / completion, from the corrections users wrote.
    """
    if format not in EXPORT_FORMATS:
        raise AigcError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format == "sft":
        rows = s.execute(
            sa.select(Generation.prompt, Rating.correction)
            .join(Rating, Rating.generation_id == Generation.id)
            .where(Rating.correction.is_not(None))
            .order_by(Rating.id)
        )
        out = [{"prompt": p, "completion": c} for p, c in rows if c.strip()]
    elif format == "kto":
        votes = s.execute(
            sa.select(Generation.prompt, Generation.output_text, sa.func.sum(Rating.value))
            .join(Rating, Rating.generation_id == Generation.id)
            .where(Rating.kind == "thumb", Generation.output_text.is_not(None))
            .group_by(Generation.id, Generation.prompt, Generation.output_text)
            .order_by(Generation.id)
        )
        out = [{"prompt": p, "completion": c, "label": v > 0} for p, c, v in votes if v != 0]
    else:
        out = _dpo_rows(s, min_gap)
    return _dedupe(out)


def _dpo_rows(s: Session, min_gap: float) -> list[dict[str, Any]]:
    # prompt and text of every generation that was rated or compared (not the whole history)
    involved = (
        Generation.rating.is_not(None)
        | Generation.id.in_(sa.select(Comparison.a_id))
        | Generation.id.in_(sa.select(Comparison.b_id))
    )
    texts = {
        gid: (prompt, text)
        for gid, prompt, text in s.execute(
            sa.select(Generation.id, Generation.prompt, Generation.output_text).where(
                Generation.output_text.is_not(None), involved
            )
        )
    }
    # 1. explicit comparisons: count wins per unordered pair, keep the majority
    wins: Counter[tuple[int, int]] = Counter()
    for a, b, w in s.execute(sa.select(Comparison.a_id, Comparison.b_id, Comparison.winner_id)):
        loser = b if w == a else a
        wins[(w, loser)] += 1
    out, compared = [], {frozenset(pair) for pair in wins}  # ties too: no rating-gap pair for them
    for (w, lo), n in sorted(wins.items()):
        if n <= wins.get((lo, w), 0):
            continue  # a tie or the minority view
        if w in texts and lo in texts and texts[w][0] == texts[lo][0]:
            out.append({"prompt": texts[w][0], "chosen": texts[w][1], "rejected": texts[lo][1]})
    # 2. rating gaps between outputs of the same prompt (pairs users compared are left to that)
    by_prompt: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for gid, prompt, rating in s.execute(
        sa.select(Generation.id, Generation.prompt, Generation.rating).where(
            Generation.rating.is_not(None), Generation.output_text.is_not(None)
        )
    ):
        by_prompt[prompt].append((rating, gid))
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


__all__ = ["EXPORT_FORMATS", "export_rows"]
