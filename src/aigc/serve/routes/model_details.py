"""GET /v1/models/{id}/details: what the studio's model page shows about one model (version).

    {"id", "object": "model.details", "name", "version", "kind", "family", "created", "versions",
     "config": {"family", "model", "train", "data"},      scalars only, no host paths
     "card": str | null, "card_truncated": bool,          card.md as text, host paths reduced to names
     "metrics": {"train": [[step, loss], ...], "eval": [[step, val_loss], ...],   <= 500 points each
                 "last_train": {...}, "last_eval": {...}, "rows": int},
     "eval_report": {"kind", "samples", "model": {...}, "real": {...}, "baseline"?, "warnings"} | null,
     "load_error": str | null}                            why this version failed to load, if it did

Only fixed file names inside the run directory the registry resolved the id to are read (never a
name from the request), and only when they really are inside it (a symlink out is ignored). Only
JSON and text are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam

from aigc.serve import settings as S
from aigc.serve.routes.feedback import model_name
from aigc.utils.paths import PATH_KEYS, hide_host_paths

router = APIRouter(tags=["models"])


def _file(run: Path, name: str) -> Path | None:
    """`run/name` if it is a regular file inside `run` (symlinks pointing out are refused)."""
    p = run / name
    try:
        if p.is_file() and p.resolve().is_relative_to(run.resolve()):
            return p
    except OSError:
        pass
    return None


def _json(run: Path, name: str) -> Any:
    p = _file(run, name)
    if p is None:
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _scalars(d: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scalar entries of a dict (numbers, strings, bools), without the keys in `drop`."""
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool) and k not in drop}


def downsample(points: list[list[float]], limit: int = S.MAX_SERIES_POINTS) -> list[list[float]]:
    """At most `limit` evenly spaced points, the first and the last always kept."""
    n = len(points)
    if n <= limit:
        return points
    return [points[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def read_metrics(path: Path | None) -> dict[str, Any]:
    """Loss series and the last rows of a metrics.jsonl (malformed lines are skipped)."""
    train, evals, last_train, last_eval, rows = [], [], None, None, 0
    if path is not None:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                rows += 1
                step = row.get("step")
                if isinstance(row.get("loss"), int | float) and row.get("kind", "train") == "train":
                    last_train = row
                    if isinstance(step, int | float):
                        train.append([step, row["loss"]])
                if isinstance(row.get("val_loss"), int | float):
                    last_eval = row
                    if isinstance(step, int | float):
                        evals.append([step, row["val_loss"]])
    return {"train": downsample(train), "eval": downsample(evals), "last_train": _scalars(last_train),
            "last_eval": _scalars(last_eval), "rows": rows}  # fmt: skip


def eval_summary(report: Any) -> dict[str, Any] | None:
    """The headline numbers of RUN/eval/report.json (its scalars; nested results and paths dropped)."""
    if not isinstance(report, dict):
        return None
    out: dict[str, Any] = {
        "kind": report.get("kind"),
        "samples": (report.get("protocol") or {}).get("samples"),
    }
    for side in ("model", "real", "baseline"):
        if isinstance(report.get(side), dict):
            out[side] = _scalars(report[side])
    out["warnings"] = [str(w) for w in report.get("warnings") or []][:20]
    return out


def details(entry: Any, versions: list[str], load_error: str | None = None) -> dict[str, Any]:
    """The details of one registry entry (reads a few small files: call it off the event loop)."""
    out: dict[str, Any] = {
        "id": entry.id, "object": "model.details", "name": entry.name, "version": entry.version,
        "recorded_as": model_name(entry), "kind": entry.kind, "created": entry.created, "versions": versions,
        "family": None, "config": None, "card": None, "card_truncated": False,
        "metrics": read_metrics(None), "eval_report": None, "load_error": load_error,
    }  # fmt: skip
    if entry.spec.startswith("hf:"):
        return out
    run = Path(entry.spec)
    cfg = _json(run, "config.json")
    if isinstance(cfg, dict):
        out["family"] = cfg.get("family")
        out["config"] = {
            "family": cfg.get("family"),
            "model": _scalars(cfg.get("model")),
            "train": _scalars(cfg.get("train")),
            "data": _scalars(cfg.get("data"), drop=PATH_KEYS),
        }
    card = _file(run, "card.md")
    if card is not None:
        raw = card.read_bytes()[: S.MAX_CARD_BYTES + 1]
        # cards written before aigc kept host paths out of them still hold some (the config's
        # data.dir, "prepared data: /home/...", "tuned from ..."): reduce every absolute path to its name
        out["card"] = hide_host_paths(raw[: S.MAX_CARD_BYTES].decode("utf-8", errors="replace"))
        out["card_truncated"] = len(raw) > S.MAX_CARD_BYTES
    out["metrics"] = read_metrics(_file(run, "metrics.jsonl"))
    out["eval_report"] = eval_summary(_json(run, "eval/report.json"))
    return out


@router.get("/v1/models/{model_id}/details", summary="A model's card, config, loss curve and eval report")
async def model_details(
    request: Request, model_id: str = PathParam(max_length=S.MAX_MODEL_NAME)
) -> dict[str, Any]:
    import asyncio

    reg = request.app.state.registry
    entry = reg.resolve(model_id)  # unknown -> 404 listing the available ones
    versions = dict((n, v) for n, _, v in reg.list()).get(entry.name, [entry.id])
    return await asyncio.to_thread(details, entry, versions, reg.load_problem(entry))
