"""GET /health (no key: for load balancers) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from aigc.serve.app import identity

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: 200 while the server runs")
async def health(request: Request) -> dict:
    reg = request.app.state.registry
    return {"status": "ok", "models_loaded": reg.loaded_ids()}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(identity)],
)
async def metrics(request: Request) -> PlainTextResponse:
    reg = request.app.state.registry
    text = request.app.state.metrics.render(reg.queue_depth(), reg.loaded_ids())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
