"""Saved parameter presets of the studio, per API key, kept in the content store.

    GET    /v1/presets?kind=text         the caller's presets (OpenAI list shape, by kind and name)
    POST   /v1/presets                   {"kind": "text"|"image"|"music", "name", "params": {...}}
    DELETE /v1/presets/{id}              delete one of the caller's presets

A preset is a flat object of parameter -> scalar (the studio's form fields). Saving a name that
exists replaces its parameters. They live server-side (table `presets`), so they survive a browser
change, and a key sees only its own: another key's preset answers 404 like a missing one.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import Field

from aigc.feedback.schema import MAX_PRESET_NAME
from aigc.serve.app import identity
from aigc.serve.routes.feedback import ERRORS, MAX_ID, _user, call_store
from aigc.serve.schemas import Strict

router = APIRouter(tags=["presets"])
PresetKind = Literal["text", "image", "music"]


class PresetRequest(Strict):
    kind: PresetKind
    name: str = Field(min_length=1, max_length=MAX_PRESET_NAME)
    params: dict[str, str | int | float | bool | None]  # size checked by the store


@router.get("/v1/presets", summary="List your saved parameter presets", responses=ERRORS)
async def list_presets(
    request: Request, kind: PresetKind | None = Query(default=None), key: str = Depends(identity)
) -> dict[str, Any]:
    return await call_store(request, "list_presets", _user(key), kind=kind)


@router.post(
    "/v1/presets", summary="Save parameters as a named preset (same name: replace)", responses=ERRORS
)
async def save_preset(body: PresetRequest, request: Request, key: str = Depends(identity)) -> dict[str, Any]:
    return await call_store(request, "save_preset", _user(key), body.kind, body.name, body.params)


@router.delete("/v1/presets/{preset_id}", summary="Delete one of your presets", responses=ERRORS)
async def delete_preset(
    request: Request, preset_id: int = Path(ge=1, le=MAX_ID), key: str = Depends(identity)
) -> dict[str, Any]:
    await call_store(request, "delete_preset", _user(key), preset_id)
    return {"id": preset_id, "object": "preset", "deleted": True}
