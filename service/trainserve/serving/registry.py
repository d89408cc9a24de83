"""Trained models' metadata: look up, list, delete (weights go with the row)."""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy.orm import Session

from trainserve.db import DatasetRecord, ModelRecord, PredictionLogRecord, on_commit
from trainserve.errors import Conflict, NotFound
from trainserve.serving import aliases
from trainserve.serving.predictor import ModelCache, NameCache, Predictor
from trainserve.storage.base import Store


def get(*, session: Session, model_id: str) -> ModelRecord:
    record = session.get(ModelRecord, model_id)
    if record is None:
        raise NotFound(f"model {model_id!r} does not exist")
    return record


def find(*, session: Session, name: str, version: int | None = None, alias: str | None = None) -> ModelRecord:
    """A model by name: the given version, the alias's version, else the ``production``
    alias's, else the newest."""
    return aliases.resolve(session, name, alias=alias, version=version)


def load_predictor(
    *,
    session: Session,
    cache: ModelCache,
    model_id: str | None = None,
    name: str | None = None,
    version: int | None = None,
    alias: str | None = None,
    names: NameCache | None = None,
) -> Predictor:
    """The loaded model, by id or by name (and version or alias): from the cache once the
    database has confirmed it still exists, else read, checked and cached. ``names``: where
    to remember which id the name stood for."""
    generation = cache.generation()
    if model_id is None:
        assert name is not None
        names_generation = names.generation() if names is not None else 0
        record = find(session=session, name=name, version=version, alias=alias)
        if names is not None:
            names.remember((name, alias, version), record.id, names_generation)
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
    held = aliases.pointing_at(session, record)
    if held:
        which = ", ".join(f"{record.name}@{a}" for a in held)
        raise Conflict(
            f"{describe(record)} is what alias {which} points to: move or delete the alias first",
            errors=[{"loc": ["alias"], "msg": a} for a in held],
        )
    session.delete(record)
    session.execute(sql_delete(PredictionLogRecord).where(PredictionLogRecord.model_id == model_id))
    session.flush()

    def forget() -> None:
        cache.evict(model_id)
        store.delete_weights(model_id)

    on_commit(session, forget)


def training_data(*, session: Session, store: Store, record: ModelRecord) -> tuple[np.ndarray, np.ndarray]:
    """The feature matrix and raw targets the model was trained on (its whole dataset)."""
    dataset = session.get(DatasetRecord, record.dataset_id) if record.dataset_id else None
    if dataset is None:
        raise Conflict(f"the dataset model {record.id} was trained on has been deleted")
    table = store.load_dataset(dataset.id, dataset.file_sha256)
    x = table.matrix(record.features)
    if record.task == "regression":
        return x, table.matrix(record.targets, dtype=np.float64)
    return x, table.column(record.targets[0])


def describe(record: ModelRecord) -> str:
    """How a model is named to people: ``name v3``, or its id."""
    return f"{record.name} v{record.version}" if record.name else f"model {record.id[:8]}"


def ancestors(*, session: Session, record: ModelRecord, limit: int = 1000) -> list[ModelRecord]:
    """The warm-start chain above a model: its parent, the parent's parent, ... to the first
    (or to the first that was deleted)."""
    chain: list[ModelRecord] = []
    seen = {record.id}
    parent_id = record.parent_model_id
    while parent_id is not None and parent_id not in seen and len(chain) < limit:
        parent = session.get(ModelRecord, parent_id)
        if parent is None:
            break
        chain.append(parent)
        seen.add(parent.id)
        parent_id = parent.parent_model_id
    return chain
