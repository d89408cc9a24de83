"""PNG plots: a job's loss curve, a model's decision regions / fitted curve / predicted vs actual.

The routes are plain ``def``: FastAPI runs them in its thread pool, so drawing (CPU work)
never blocks the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.errors import Conflict
from trainserve.jobs import lifecycle as jobs
from trainserve.jobs.status import ACTIVE
from trainserve.serving import plots, registry

router = APIRouter(tags=["plots"])

_PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}
Width = Annotated[int, Query(ge=plots.MIN_SIDE, le=plots.MAX_SIDE, description="pixels")]
Height = Annotated[int, Query(ge=plots.MIN_SIDE, le=plots.MAX_SIDE, description="pixels")]


_UNCHANGED: dict[str, Any] = {"description": "the plot the If-None-Match header names: unchanged"}


def _png(content: bytes, cache_control: str, **headers: str) -> Response:
    return Response(content, media_type="image/png", headers={"Cache-Control": cache_control, **headers})


@router.get("/jobs/{job_id}/loss.png", response_class=Response, responses=_PNG)
def job_loss_plot(
    job_id: str, session: SessionDep, width: Width = plots.DEFAULT_SIZE[0], height: Height = plots.DEFAULT_SIZE[1]
) -> Response:
    """Train and validation loss per epoch; 409 while the job has no finished epoch."""
    job = jobs.get_job(session, job_id)
    if not job.history:
        raise Conflict(f"job {job_id} has no finished epoch yet ({job.status})")
    title = f"{job.name or 'job ' + job.id[:8]}: {job.status}, epoch {job.epoch}/{job.epochs}"
    png = plots.loss_curve(job.history, title=title, size=(width, height))
    # A running job's curve grows; an ended job's never changes.
    return _png(png, "no-cache" if job.status in ACTIVE else "max-age=86400")


@router.get(
    "/models/{model_id}/plot.png", response_class=Response, responses={**_PNG, 304: {"description": "unchanged"}}
)
def model_plot(
    model_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    width: Width = plots.DEFAULT_SIZE[0],
    height: Height = plots.DEFAULT_SIZE[1],
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A classifier on two features: decision regions with the training points (the guide's
    visualize2DSoftmax). A regressor on one feature: the data and the fitted curve.
    Anything else: predicted against actual on the training data (a confusion matrix for a
    classifier). The ``X-Plot-Kind`` header says which. 409 once the training dataset is deleted.

    Drawn once per model and size, then served from a cache with an ``ETag`` (304 for a
    matching ``If-None-Match``): weights and data never change under one model id."""
    record = registry.get(session=session, model_id=model_id)
    registry.training_dataset(session=session, record=record)  # 409 once it is deleted, cached or not
    size = (width, height)
    cached = runtime.plots.get(record.id, size)
    if cached is None:
        predictor = runtime.models.get(record)
        x, y = registry.training_data(session=session, store=runtime.store, record=record)
        metric = next((f"{k} {v:.3f}" for k, v in record.metrics.items() if k in ("train_accuracy", "train_r2")), "")
        title = f"{registry.describe(record)}: {metric}" if metric else registry.describe(record)
        kind, png = plots.model_plot(predictor, x, y, title=title, size=size)
        cached = runtime.plots.put(record.id, size, kind, png)
    else:
        png = b""
    headers = {"Cache-Control": _IMMUTABLE, "ETag": cached.etag, "X-Plot-Kind": cached.kind}
    if if_none_match is not None and cached.etag in (tag.strip() for tag in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(png or cached.read(), media_type="image/png", headers=headers)


_IMMUTABLE = "public, max-age=31536000, immutable"


@router.get("/models/{model_id}/confusion.png", response_class=Response, responses=_PNG)
def model_confusion_plot(
    model_id: str,
    session: SessionDep,
    part: Annotated[Literal["test", "validation"], Query(description="which held-out rows")] = "test",
    width: Width = plots.DEFAULT_SIZE[0],
    height: Height = plots.DEFAULT_SIZE[1],
) -> Response:
    """A classifier's confusion matrix on its held-out test (or validation) rows, as scored
    once after training; 409 when the model has no such rows (a regressor, or a spec without
    that split)."""
    record = registry.get(session=session, model_id=model_id)
    report = (record.evaluation or {}).get(part)
    if report is None or "confusion_matrix" not in report:
        raise Conflict(
            f"model {model_id} has no {part} confusion matrix: it needs a classifier trained with "
            f'"split": {{"{part}": 0.2}}'
        )
    title = f"{registry.describe(record)}: {part} rows, accuracy {report['accuracy']:.3f}"
    png = plots.confusion_matrix(report["confusion_matrix"], report["classes"], title=title, size=(width, height))
    return _png(png, "max-age=86400")
