"""GET /models/{id}/export: the model as TorchScript or a torch.export program."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.serving import registry
from trainserve.wire import ExportFormat

router = APIRouter(tags=["models"])
_ARCHIVE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "a TorchScript or torch.export archive"}
}


@router.get("/models/{model_id}/export", response_class=Response, responses=_ARCHIVE)
def export_model(
    model_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    format: Annotated[ExportFormat, Query(description="torchscript or torch.export")] = "torchscript",
) -> Response:
    """Download the model for use without the service. The archive maps raw feature rows
    (float32, the model's feature order) to class probabilities, or to the regression
    values; ``trainserve.json`` inside names features, targets and classes. Load with
    ``torch.jit.load`` or ``torch.export.load`` (``.module()``), and only archives from a
    server you trust: like ``torch.load``, ``torch.export.load`` may unpickle."""
    record = registry.get(session=session, model_id=model_id)
    predictor = runtime.models.get(record)
    info = {
        "name": record.name,
        "version": record.version,
        "task": record.task,
        "features": record.features,
        "targets": record.targets,
        "classes": record.classes,
        # A model with preprocessing takes the raw layout: numbers or NaN, category level
        # indices (NaN blank, -1 unseen) into the vocabularies listed here.
        "preprocessing": predictor.preprocessing.export_layout() if predictor.preprocessing is not None else None,
    }
    # Imported here: it loads torch's exporters, which the API needs only when asked.
    from trainserve.serving.export import EXPORTER

    exported = EXPORTER.export(predictor.module, format, model_id=record.id, info=info)
    return Response(
        exported.content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{exported.filename}"'},
    )
