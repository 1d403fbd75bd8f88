"""GET /v1/models and GET /v1/models/{id}: what the registry offers (OpenAI's model objects)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request

from aigc.serve.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="List the models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    reg = request.app.state.registry
    return ModelList(
        data=[ModelCard(id=name, created=e.created, kind=e.kind, versions=vs) for name, e, vs in reg.list()]
    )


@router.get("/v1/models/{model_id}", summary="One model", response_model=ModelCard)
async def get_model(request: Request, model_id: str = Path(max_length=128)) -> ModelCard:
    e = request.app.state.registry.resolve(model_id)
    return ModelCard(id=e.id, created=e.created, kind=e.kind, versions=[e.id])
