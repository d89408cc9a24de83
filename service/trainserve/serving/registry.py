"""Trained models' metadata: look up, list, delete (weights go with the row)."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from trainserve.db import DatasetRecord, ModelRecord, on_commit
from trainserve.errors import Conflict, NotFound
from trainserve.serving.predictor import ModelCache, Predictor
from trainserve.storage.base import Store


def get(*, session: Session, model_id: str) -> ModelRecord:
    record = session.get(ModelRecord, model_id)
    if record is None:
        raise NotFound(f"model {model_id!r} does not exist")
    return record


def find(*, session: Session, name: str, version: int | None = None) -> ModelRecord:
    """A model by name: the given version, or the newest."""
    query = select(ModelRecord).where(ModelRecord.name == name, ModelRecord.version.is_not(None))
    if version is not None:
        record = session.scalar(query.where(ModelRecord.version == version))
        if record is None:
            raise NotFound(f"model {name!r} has no version {version}")
        return record
    record = session.scalar(query.order_by(ModelRecord.version.desc()).limit(1))
    if record is None:
        raise NotFound(f"no model is named {name!r}")
    return record


def load_predictor(
    *,
    session: Session,
    cache: ModelCache,
    model_id: str | None = None,
    name: str | None = None,
    version: int | None = None,
) -> Predictor:
    """The loaded model, by id or by name (and version): from the cache once the database
    has confirmed it still exists, else read, checked and cached."""
    generation = cache.generation()
    if model_id is None:
        assert name is not None
        record = find(session=session, name=name, version=version)
    else:
        try:
            record = get(session=session, model_id=model_id)
        except NotFound:
            cache.evict(model_id)  # deleted by another process: forget it here too
            raise
    return cache.get(record, generation=generation)


def list_all(*, session: Session, name: str | None = None, limit: int = 100, offset: int = 0) -> list[ModelRecord]:
    """Newest first; with ``name``, that model's versions, newest version first."""
    if name is None:
        query = select(ModelRecord).order_by(ModelRecord.created_at.desc(), ModelRecord.id)
    else:
        query = select(ModelRecord).where(ModelRecord.name == name).order_by(ModelRecord.version.desc())
    return list(session.scalars(query.limit(limit).offset(offset)))


def delete(*, session: Session, store: Store, cache: ModelCache, model_id: str) -> None:
    record = get(session=session, model_id=model_id)
    session.delete(record)
    session.flush()

    def forget() -> None:
        cache.evict(model_id)
        store.delete_weights(model_id)

    on_commit(session, forget)


def training_dataset(*, session: Session, record: ModelRecord) -> DatasetRecord:
    """The dataset row the model was trained on; Conflict once it is deleted."""
    dataset = session.get(DatasetRecord, record.dataset_id) if record.dataset_id else None
    if dataset is None:
        raise Conflict(f"the dataset model {record.id} was trained on has been deleted")
    return dataset


def training_data(*, session: Session, store: Store, record: ModelRecord) -> tuple[np.ndarray, np.ndarray]:
    """The feature matrix and raw targets the model was trained on (its whole dataset)."""
    dataset = training_dataset(session=session, record=record)
    table = store.load_dataset(dataset.id, dataset.file_sha256)
    x = table.matrix(record.features)
    if record.task == "regression":
        return x, table.matrix(record.targets, dtype=np.float64)
    return x, table.column(record.targets[0])


def describe(record: ModelRecord) -> str:
    """How a model is named to people: ``name v3``, or its id."""
    return f"{record.name} v{record.version}" if record.name else f"model {record.id[:8]}"
