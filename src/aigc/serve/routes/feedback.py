"""The content store over HTTP: history, ratings, comparisons, feedback export, stored outputs.

    GET  /v1/generations            list/search (kind, model, min_rating, q, moderation, limit, before)
    GET  /v1/generations/{id}       one generation
                                    (both: each with `my_rating`, the caller's own {"stars", "thumb"})
    GET  /v1/outputs/{ref}          a stored output's bytes (an image's PNG)
    POST /v1/ratings                {"generation_id", "value", "kind": "thumb"|"stars", "comment"?}
                                    one per caller and kind: rating again replaces ("replaced": true)
    GET  /v1/ratings                ?generation_id=&limit=&before=
    POST /v1/comparisons            {"a", "b", "winner"} (generation ids; winner is a or b)
    GET  /v1/comparisons            ?limit=&before=
    GET  /v1/comparisons/stats      ?a=MODEL&b=MODEL -> wins, losses, win_rate, 95% Wilson interval
    GET  /v1/feedback/export        ?format=dpo|kto|sft -> JSON Lines in TRL's shapes

Lists are OpenAI's `{"object": "list", "data": [...], "first_id", "last_id", "has_more"}`, newest
first; page on with `before=<last_id>`. The store (`aigc.feedback.store.Store`) is opened once at
app start (`app.state.store`); every call runs in a worker thread (SQLite waits on locks, the event
loop must not). `record()` is what the generation routes call to write their outputs here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import Field

from aigc.feedback.store import MAX_COMMENT, MAX_LIMIT, NotFoundError
from aigc.serve.app import ApiError, identity
from aigc.serve.schemas import ErrorResponse, Strict

router = APIRouter(tags=["feedback"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 503)}
MAX_ID = 2**63 - 1
MAX_QUERY = 1000  # characters of a `q` search


class RatingRequest(Strict):
    generation_id: int = Field(ge=1, le=MAX_ID)
    value: int  # thumb -1 / 1, stars 1-5: checked by the store, whose message names the range
    kind: Literal["thumb", "stars"] = "thumb"
    comment: str | None = Field(default=None, max_length=MAX_COMMENT)
    correction: str | None = Field(default=None, max_length=MAX_COMMENT)


class ComparisonRequest(Strict):
    a: int = Field(ge=1, le=MAX_ID)
    b: int = Field(ge=1, le=MAX_ID)
    winner: int = Field(ge=1, le=MAX_ID)


async def run_store(fn: Any) -> Any:
    """`fn()` (store work) in a worker thread: SQLite waits on locks, the event loop must not.

    An unknown id -> 404; a lock wait that timed out (or a database gone away) -> 503, retryable.
    """
    import sqlalchemy as sa

    try:
        return await asyncio.to_thread(fn)
    except NotFoundError as e:
        raise ApiError(404, str(e), "not_found") from None
    except sa.exc.OperationalError as e:
        reason = " ".join(str(e.orig if e.orig is not None else e).split())
        raise ApiError(
            503, f"the store is busy ({reason}); retry after a moment", "store_busy", retry=True
        ) from None


async def call_store(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
    """`store.<method>(*args, **kwargs)` through `run_store`."""
    store = request.app.state.store
    return await run_store(lambda: getattr(store, method)(*args, **kwargs))


def _user(key: str) -> str:
    """Who rated: the caller's key hash (never the key), or "anonymous:<host>" on an open server."""
    from aigc.feedback.schema import MAX_USER

    return key[:MAX_USER]


# ----------------------------------------------------------------------------- generations


@router.get("/v1/generations", summary="List and search recorded generations", responses=ERRORS)
async def list_generations(
    request: Request,
    kind: Literal["text", "image", "music", "audio"] | None = None,
    model: str | None = Query(default=None, max_length=256),
    min_rating: float | None = Query(default=None, ge=1, le=5),
    q: str | None = Query(default=None, max_length=MAX_QUERY),
    limit: int = Query(default=20, ge=1, le=MAX_LIMIT),
    before: int | None = Query(default=None, ge=1, le=MAX_ID),
    moderation: Literal["flagged", "blocked", "any", "none"] | None = None,
    key: str = Depends(identity),
) -> dict[str, Any]:
    return await call_store(
        request, "list_generations", kind=kind, model=model or None, min_rating=min_rating, q=q,
        limit=limit, before=before, moderation=moderation, rater=_user(key),
    )  # fmt: skip


@router.get("/v1/generations/{generation_id}", summary="One recorded generation", responses=ERRORS)
async def get_generation(
    request: Request, generation_id: int, key: str = Depends(identity)
) -> dict[str, Any]:
    return await call_store(request, "get_generation", generation_id, rater=_user(key))


@router.get("/v1/outputs/{ref}", summary="A stored output (image PNG)", responses=ERRORS)
async def get_output(request: Request, ref: str) -> Response:
    from aigc.feedback.blobs import check_ref

    check_ref(ref)  # AigcError -> 400: a ref never names a path outside the folder
    data = await run_store(lambda: request.app.state.blobs.get(ref))
    media = {"png": "image/png", "wav": "audio/wav", "mid": "audio/midi", "json": "application/json"}
    ext = ref.rpartition(".")[2]
    return Response(data, media_type=media.get(ext, "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=31536000, immutable"})  # fmt: skip


# ----------------------------------------------------------------------------- ratings, comparisons


@router.post("/v1/ratings", summary="Rate a generation (thumb -1/1 or 1-5 stars)", responses=ERRORS)
async def add_rating(body: RatingRequest, request: Request, key: str = Depends(identity)) -> dict[str, Any]:
    """One rating per caller (API key, or client host on an open server) and kind on a generation:
    rating again replaces it (`replaced: true`, same id). `rating` / `rating_count` are the
    generation's mean (1-5 stars, thumbs as 1 / 5) and number of ratings after this one."""
    done = await call_store(
        request, "rate", body.generation_id, body.value, body.kind,
        comment=body.comment, correction=body.correction, user=_user(key),
    )  # fmt: skip
    # the acknowledgement comes after the commit: a 200 means the rating is on disk
    return {"id": done["id"], "object": "rating", "generation_id": body.generation_id, "kind": body.kind,
            "value": body.value, "comment": body.comment, "replaced": done["replaced"],
            "rating": done["rating"], "rating_count": done["rating_count"]}  # fmt: skip


@router.get("/v1/ratings", summary="List ratings, newest first", responses=ERRORS)
async def list_ratings(
    request: Request,
    generation_id: int | None = Query(default=None, ge=1, le=MAX_ID),
    limit: int = Query(default=20, ge=1, le=MAX_LIMIT),
    before: int | None = Query(default=None, ge=1, le=MAX_ID),
) -> dict[str, Any]:
    return await call_store(request, "list_ratings", generation_id=generation_id, limit=limit, before=before)


@router.post("/v1/comparisons", summary="Record which of two generations is better", responses=ERRORS)
async def add_comparison(
    body: ComparisonRequest, request: Request, key: str = Depends(identity)
) -> dict[str, Any]:
    cid = await call_store(request, "add_comparison", body.a, body.b, body.winner, user=_user(key))
    return {"id": cid, "object": "comparison", "a": body.a, "b": body.b, "winner": body.winner}


@router.get("/v1/comparisons", summary="List comparisons, newest first", responses=ERRORS)
async def list_comparisons(
    request: Request,
    limit: int = Query(default=20, ge=1, le=MAX_LIMIT),
    before: int | None = Query(default=None, ge=1, le=MAX_ID),
) -> dict[str, Any]:
    return await call_store(request, "list_comparisons", limit=limit, before=before)


@router.get("/v1/comparisons/stats", summary="Win rate of model a against model b", responses=ERRORS)
async def comparison_stats(
    request: Request,
    a: str = Query(min_length=1, max_length=256),
    b: str = Query(min_length=1, max_length=256),
) -> dict[str, Any]:
    """Blind comparisons between outputs of `a` and `b`: wins, losses, win_rate (a's) with a 95%
    Wilson interval. A name the registry serves is resolved to the version it means (`story` ->
    `story@2`), as recorded on the generations; other names (e.g. a removed model) count as given."""
    from aigc.serve.registry import UnknownModel

    def recorded(name: str) -> str:
        try:
            return model_name(request.app.state.registry.resolve(name))
        except UnknownModel:
            return name

    return await call_store(request, "comparison_stats", recorded(a), recorded(b))


@router.get("/v1/feedback/export", summary="Feedback as a TRL data set (JSON Lines)", responses=ERRORS)
async def export_feedback(request: Request, format: Literal["dpo", "kto", "sft"] = "dpo") -> Response:
    rows = await call_store(request, "export_feedback", format)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(body, media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="feedback-{format}.jsonl"'})  # fmt: skip


# ----------------------------------------------------------------------------- recording


_hash_cache: dict[tuple, str | None] = {}
_hash_lock = threading.Lock()


def model_hash(entry: Any) -> str | None:
    """sha256 (first 16 hex) of a run's model.safetensors, once per file version; None for hf: specs."""
    key = (entry.spec, entry.signature)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    weights = Path(entry.spec) / "model.safetensors"
    digest = None
    if not entry.spec.startswith("hf:") and weights.is_file():
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
    with _hash_lock:
        _hash_cache[key] = digest
    return digest


def model_name(entry: Any) -> str:
    """`name@version` (or `name` for an unversioned run): the exact model that made an output."""
    return f"{entry.name}@{entry.version}" if entry.version else entry.name


def text_row(entry: Any, prompt: str, result: Any, duration: float, **params: Any) -> dict[str, Any]:
    """A store row for one text `GenerationResult` (params: extra request fields, e.g. messages)."""
    return dict(kind="text", model=model_name(entry), prompt=prompt, params={**result.params, **params},
                seed=result.seed, output_text=result.text, duration=duration)  # fmt: skip


async def record(request: Request, entry: Any, rows: list[dict[str, Any]], blobs: list[bytes] | None = None,
                 ext: str = "png") -> list[int]:  # fmt: skip
    """Write generations (and their output blobs) to the store; returns their ids in order.

    Blobs go first (content-addressed, idempotent): a row never points at a missing file.
    """
    st = request.app.state

    def write() -> list[int]:
        digest = model_hash(entry)
        if blobs is not None:
            for row, data in zip(rows, blobs, strict=True):
                row["output_ref"] = st.blobs.put(data, ext)
        return st.store.add_generations([{**r, "model_hash": digest} for r in rows])

    return await run_store(write)
