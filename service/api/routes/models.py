from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service import registry
from service.api.deps import RuntimeDep, SessionDep
from service.errors import NotFound
from service.schemas import Model
from service.spec import MODEL_NAME_PATTERN

router = APIRouter(tags=["models"])


@router.get("/models", response_model=list[Model])
def list_models(
    session: SessionDep,
    name: str | None = Query(None, pattern=MODEL_NAME_PATTERN, description="Only this model's versions"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=2**62),
) -> list[Model]:
    """Newest first; with ``name``, the versions of that model, newest version first."""
    records = registry.list_all(session=session, name=name, limit=limit, offset=offset)
    return [Model.model_validate(m) for m in records]


@router.get("/models/{model_id}", response_model=Model)
def get_model(model_id: str, session: SessionDep) -> Model:
    return Model.model_validate(registry.get(session=session, model_id=model_id))


@router.get(
    "/models/{model_id}/weights",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
def download_weights(model_id: str, session: SessionDep, runtime: RuntimeDep) -> FileResponse:
    """The trained weights as safetensors (no pickle); the scaler's mean/std are inside."""
    record = registry.get(session=session, model_id=model_id)
    try:
        path = runtime.store.weights_file(record.id, record.weights_sha256)
    except FileNotFoundError:  # deleted by a concurrent request
        raise NotFound(f"model {model_id!r} does not exist") from None
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{record.id}.safetensors",
        headers={"X-Content-SHA256": record.weights_sha256},
    )


@router.delete("/models/{model_id}", status_code=204)
def delete_model(model_id: str, session: SessionDep, runtime: RuntimeDep) -> None:
    registry.delete(session=session, store=runtime.store, cache=runtime.models, model_id=model_id)
