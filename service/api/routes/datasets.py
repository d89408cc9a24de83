from __future__ import annotations

from fastapi import APIRouter, Query, Response, UploadFile

from service import datasets
from service.api.deps import RuntimeDep, SessionDep
from service.schemas import Dataset

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=Dataset)
def upload_dataset(file: UploadFile, session: SessionDep, runtime: RuntimeDep, response: Response) -> Dataset:
    """Upload a CSV (header row, numeric features, numeric or text label) or an .npz with X and y."""
    record = datasets.create(
        session=session, store=runtime.store, settings=runtime.settings, upload=file.file, filename=file.filename
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
