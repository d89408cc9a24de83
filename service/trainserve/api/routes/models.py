from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.api.schemas import (
    Comparison,
    DriftReport,
    EvaluateRequest,
    Evaluation,
    Model,
    ModelDetail,
    ModelLink,
    PredictionLogEntry,
)
from trainserve.errors import Conflict, NotFound
from trainserve.serving import evaluation, monitoring, plots, predlog, registry
from trainserve.serving.compare import compare
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


@router.get("/models/compare", response_model=Comparison)
def compare_models(
    session: SessionDep,
    ids: str = Query(description="Two or more model ids, comma-separated: ids=a,b,c", max_length=4000),
) -> Any:
    """The spec fields that differ (only those), every metric side by side, each loss curve."""
    return compare(session, [i.strip() for i in ids.split(",") if i.strip()])


@router.get("/models/{model_id}", response_model=ModelDetail)
def get_model(model_id: str, session: SessionDep) -> ModelDetail:
    """The model, and its warm-start ``chain`` back to the first version it descends from."""
    record = registry.get(session=session, model_id=model_id)
    detail = ModelDetail.model_validate(record)
    detail.chain = [ModelLink.model_validate(m) for m in registry.ancestors(session=session, record=record)]
    if record.preprocessing is not None and "ignored" in record.preprocessing:
        detail.ignored_columns = list(record.preprocessing["ignored"])
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
    runtime.plots.forget(model_id)  # a cache only: gone even if the delete then fails to commit


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
    population stability index over decile bins (a category: over its levels, blank and
    unseen), the share of missing values, and a category's share of unseen levels."""
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


# -- evaluation ---------------------------------------------------------------------------------


@router.post("/models/{model_id}/evaluate", status_code=201, response_model=Evaluation)
def evaluate_model(model_id: str, body: EvaluateRequest, session: SessionDep, runtime: RuntimeDep) -> Any:
    """Score the model on a labelled dataset (read in chunks, through the /predict path) and store the metrics."""
    return evaluation.evaluate_and_record(
        session=session, store=runtime.store, cache=runtime.models, model_id=model_id, dataset_id=body.dataset_id
    )


@router.get("/models/{model_id}/evaluations", response_model=list[Evaluation])
def list_evaluations(model_id: str, session: SessionDep) -> Any:
    """Newest first."""
    return evaluation.list_evaluations(session=session, model_id=model_id)


@router.get(
    "/models/{model_id}/evaluations/{evaluation_id}/{kind}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "a PNG image"}},
)
def evaluation_plot(
    model_id: str,
    evaluation_id: str,
    kind: Literal["confusion", "roc", "calibration", "residuals"],
    session: SessionDep,
    width: int = Query(plots.DEFAULT_SIZE[0], ge=plots.MIN_SIDE, le=plots.MAX_SIDE),
    height: int = Query(plots.DEFAULT_SIZE[1], ge=plots.MIN_SIDE, le=plots.MAX_SIDE),
) -> Response:
    """confusion, roc and calibration for classifiers; residuals for regressors (else 409)."""
    found = evaluation.get_evaluation(session=session, model_id=model_id, evaluation_id=evaluation_id)
    title = f"model {model_id[:8]} on dataset {(found.dataset_id or '?')[:8]} ({found.n_rows} rows)"
    try:
        png = plots.evaluation_plot(kind, found.task, found.curves, title=title, size=(width, height))
    except ValueError as exc:
        raise Conflict(str(exc)) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})
