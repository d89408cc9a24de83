from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.api.runtime import Runtime
from trainserve.api.schemas import Dataset
from trainserve.api.uploads import ReceivedFile, is_raw_table, receive_body, receive_form
from trainserve.datasets import catalog as datasets
from trainserve.db import DatasetRecord
from trainserve.errors import InvalidInput, UnsupportedMediaType

router = APIRouter(prefix="/datasets", tags=["datasets"])

_RAW_BODY: dict[str, Any] = {
    "schema": {"type": "string", "format": "binary", "description": "the file itself (CSV, TSV, Parquet or .npz)"}
}
_RAW_QUERY: list[dict[str, Any]] = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": f"with a raw body only: {text}",
    }
    for name, text in (
        ("filename", "the file's name (a label, and a format hint); default none"),
        ("delimiter", "as the multipart form field"),
        ("decimal", "as the multipart form field"),
        ("na_values", "as the multipart form field"),
    )
]
_UPLOAD_BODY: dict[str, Any] = {
    "parameters": _RAW_QUERY,
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "CSV (any of , ; tab | as delimiter), .tsv, .parquet or .npz",
                        },
                        "delimiter": {
                            "type": "string",
                            "description": "CSV only: the column separator, one character or comma, semicolon, "
                            "tab, pipe (default: sniffed)",
                        },
                        "decimal": {
                            "type": "string",
                            "enum": [".", ","],
                            "description": "CSV only: the decimal separator (default: sniffed; ',' only "
                            "with a delimiter other than ',')",
                        },
                        "na_values": {
                            "type": "string",
                            "pattern": r"^\s*\[",
                            "description": 'CSV only: cells read as missing, a JSON list of strings like ["NA", "?"] '
                            "(default: the server's TRAINSERVE_NA_VALUES; the empty cell always is)",
                        },
                    },
                }
            },
            # or the file itself as the body (the Python client's and the CLI's way), options in the query
            "text/csv": _RAW_BODY,
            "application/octet-stream": _RAW_BODY,
        },
    },
}


def create_from_upload(session: Session, runtime: Runtime, upload: ReceivedFile) -> DatasetRecord:
    return datasets.create_from_file(
        session=session,
        store=runtime.store,
        settings=runtime.settings,
        raw=upload.path,
        size=upload.size,
        sha256=upload.sha256,
        filename=upload.filename,
        options=upload.options,
        options_in=upload.options_in,
    )


@router.post("", status_code=201, response_model=Dataset, openapi_extra=_UPLOAD_BODY)
async def upload_dataset(request: Request, session: SessionDep, runtime: RuntimeDep, response: Response) -> Dataset:
    """Upload a table: CSV/TSV with a header row, Parquet, or an .npz with X and y.

    As a multipart form (``file`` and the optional reading options), or as the body itself
    (``Content-Type: text/csv`` or ``application/octet-stream``) with ``filename`` and the
    options in the query string. The answer profiles every column. The same bytes uploaded
    again make a new dataset that shares the stored table of the first."""
    limit = runtime.settings.max_upload_bytes
    if is_raw_table(request):
        async with receive_body(request, runtime.store, max_file_bytes=limit) as upload:
            record = await run_in_threadpool(create_from_upload, session, runtime, upload)
    elif request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        async with receive_form(request, runtime.store, max_file_bytes=limit) as form:
            if form.file is None:
                raise InvalidInput(
                    "the multipart form needs a 'file' field holding a CSV or .npz",
                    errors=[{"loc": ["body", "file"], "msg": "field required"}],
                )
            record = await run_in_threadpool(create_from_upload, session, runtime, form.file)
    else:
        content_type = request.headers.get("content-type", "")
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}: send multipart/form-data with a 'file' field, "
            "or the table itself as text/csv or application/octet-stream (name and options in the query)"
        )
    response.headers["Location"] = f"/datasets/{record.id}"
    return Dataset.model_validate(record)


@router.get("", response_model=list[Dataset])
def list_datasets(
    session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**62)
) -> list[Dataset]:
    return [Dataset.model_validate(r) for r in datasets.list_all(session=session, limit=limit, offset=offset)]


@router.get("/{dataset_id}", response_model=Dataset)
def get_dataset(dataset_id: str, session: SessionDep) -> Dataset:
    return Dataset.model_validate(datasets.get(session=session, dataset_id=dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, session: SessionDep, runtime: RuntimeDep) -> None:
    datasets.delete(session=session, store=runtime.store, dataset_id=dataset_id)
