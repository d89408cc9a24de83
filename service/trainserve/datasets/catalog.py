"""Datasets: validate an upload, keep the parsed table in the store and a row in the database."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from trainserve.config import Settings
from trainserve.datasets.tables import parse_table, sniff_format
from trainserve.db import DatasetRecord, JobRecord, SweepRecord, on_commit, on_rollback
from trainserve.errors import Conflict, InvalidInput, NotFound
from trainserve.jobs.status import ACTIVE
from trainserve.storage.base import Store, new_id


def create_from_file(
    *, session: Session, store: Store, settings: Settings, raw: Path, size: int, sha256: str, filename: str | None
) -> DatasetRecord:
    """Parse and check an uploaded file already on disk (size and sha256 of its bytes known),
    then publish table and row together. ``raw`` is left for the caller to remove."""
    if size == 0:
        raise InvalidInput("the file is empty", errors=[{"loc": ["file"], "msg": "the file is empty"}])
    with open(raw, "rb") as handle:
        fmt = sniff_format(filename, handle.read(4))
    # An .npz decompresses; bound what it may expand to by the upload limit's worth of float64s.
    table = parse_table(raw, fmt, max_elements=settings.max_upload_bytes // 8 * 4)
    dataset_id = new_id()
    file_sha256 = store.save_dataset(dataset_id, table)
    record = DatasetRecord(
        id=dataset_id,
        filename=(filename or "")[:255] or None,
        format=fmt,
        n_rows=table.n_rows,
        columns=[c.as_dict() for c in table.schema().columns],
        size_bytes=size,
        sha256=sha256,
        file_sha256=file_sha256,
    )
    session.add(record)
    on_rollback(session, lambda: store.delete_dataset(dataset_id))
    session.flush()
    return record


def get(*, session: Session, dataset_id: str) -> DatasetRecord:
    record = session.get(DatasetRecord, dataset_id)
    if record is None:
        raise NotFound(f"dataset {dataset_id!r} does not exist")
    return record


def list_all(*, session: Session, limit: int = 100, offset: int = 0) -> list[DatasetRecord]:
    query = select(DatasetRecord).order_by(DatasetRecord.created_at.desc(), DatasetRecord.id)
    return list(session.scalars(query.limit(limit).offset(offset)))


def delete(*, session: Session, store: Store, dataset_id: str) -> None:
    record = get(session=session, dataset_id=dataset_id)
    active = session.scalar(
        select(func.count()).where(JobRecord.dataset_id == dataset_id, JobRecord.status.in_(ACTIVE))
    )
    if active:
        raise Conflict(f"dataset {dataset_id} is used by {active} queued or running job(s); cancel them first")
    sweeps = session.scalar(
        select(func.count()).where(SweepRecord.dataset_id == dataset_id, SweepRecord.status == "running")
    )
    if sweeps:
        raise Conflict(f"dataset {dataset_id} is used by {sweeps} running sweep(s); cancel them first")
    session.delete(record)
    session.flush()
    on_commit(session, lambda: store.delete_dataset(dataset_id))
