from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.api.schemas import DriftReport, Model, ModelDetail, ModelLink, PredictionLogEntry
from trainserve.errors import NotFound
from trainserve.serving import monitoring, predlog, registry
from trainserve.training.spec import MODEL_NAME_PATTERN

router = APIRouter(tags=["models"])
# Sent from the handle the store checked (not re-opened by path, as FileResponse would):
# the bytes sent are the bytes whose sha256 matched. Each chunk is read in a thread.
_SEND_CHUNK = 1024 * 1024


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


@router.get("/models/{model_id}", response_model=ModelDetail)
def get_model(model_id: str, session: SessionDep) -> ModelDetail:
    """The model, and its warm-start ``chain`` back to the first version it descends from."""
    record = registry.get(session=session, model_id=model_id)
    detail = ModelDetail.model_validate(record)
    detail.chain = [ModelLink.model_validate(m) for m in registry.ancestors(session=session, record=record)]
    return detail


@router.get(
    "/models/{model_id}/weights",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
def download_weights(model_id: str, session: SessionDep, runtime: RuntimeDep) -> StreamingResponse:
    """The trained weights as safetensors (no pickle); the scaler's mean/std are inside.
    ``X-Content-SHA256`` is their sha256, which the file was checked against before sending."""
    record = registry.get(session=session, model_id=model_id)
    try:
        handle = runtime.store.open_weights(record.id, record.weights_sha256)
    except FileNotFoundError:  # deleted by a concurrent request
        raise NotFound(f"model {model_id!r} does not exist") from None
    return StreamingResponse(
        _chunks(handle),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(os.fstat(handle.fileno()).st_size),
            "Content-Disposition": f'attachment; filename="{record.id}.safetensors"',
            "X-Content-SHA256": record.weights_sha256,
        },
    )


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(_SEND_CHUNK):
            yield chunk


@router.delete("/models/{model_id}", status_code=204)
def delete_model(model_id: str, session: SessionDep, runtime: RuntimeDep) -> None:
    registry.delete(session=session, store=runtime.store, cache=runtime.models, model_id=model_id)


@router.get("/models/{model_id}/predictions", response_model=list[PredictionLogEntry])
def list_predictions(
    model_id: str, session: SessionDep, limit: int = Query(100, ge=1, le=10_000)
) -> list[PredictionLogEntry]:
    """The model's logged predictions, newest first: a TRAINSERVE_PREDICTION_LOG_SAMPLE share of
    its /predict requests (at most 100 rows of each), kept for a bounded time and count."""
    registry.get(session=session, model_id=model_id)
    return [PredictionLogEntry.model_validate(r) for r in predlog.recent(session, model_id, limit)]


@router.get("/models/{model_id}/drift", response_model=DriftReport)
def model_drift(model_id: str, session: SessionDep, runtime: RuntimeDep) -> DriftReport:
    """Per feature, how far the logged requests' inputs moved from the training split:
    population stability index over decile bins, and the share of missing values."""
    record = registry.get(session=session, model_id=model_id)
    settings = runtime.settings
    report = monitoring.model_drift(
        session,
        runtime.store,
        runtime.drift_references,
        record,
        window=settings.drift_window,
        threshold=settings.drift_threshold,
    )
    return DriftReport.model_validate(report)
