"""GET /v1/models and GET /v1/models/{id}: what the registry offers (OpenAI's model objects).

A model's `id` is the name a client sends (`poet`, or `poet@1` when asked for), so the OpenAI
client's `models.retrieve(x).id == x`; `root` is the version that name is served by now (`poet@2`),
as in vLLM's model cards, and `versions` lists them all.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Request

from aigc.serve.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


class ServedModel(ModelCard):
    root: str  # the version requests for `id` go to now: `poet` -> `poet@2`, `tiny` -> `tiny`


class ServedModelList(ModelList):
    data: list[ServedModel]


@router.get("/v1/models", summary="List the models", response_model=ServedModelList)
async def list_models(request: Request) -> ServedModelList:
    reg = request.app.state.registry
    return ServedModelList(
        data=[
            ServedModel(id=name, created=e.created, kind=e.kind, versions=vs, root=e.id)
            for name, e, vs in reg.list()
        ]
    )


@router.get("/v1/models/{model_id}", summary="One model", response_model=ServedModel)
async def get_model(request: Request, model_id: str = Path(max_length=128)) -> ServedModel:
    reg = request.app.state.registry
    e = reg.resolve(model_id)  # unknown -> 404 listing the available ones
    versions = dict((n, v) for n, _, v in reg.list()).get(e.name, [e.id])
    return ServedModel(id=model_id, created=e.created, kind=e.kind, versions=versions, root=e.id)
