"""Trained models' metadata: look up, list, delete (weights go with the row)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import ModelRecord, on_commit
from service.errors import NotFound
from service.inference import ModelCache
from service.store import Store


def get(*, session: Session, model_id: str) -> ModelRecord:
    record = session.get(ModelRecord, model_id)
    if record is None:
        raise NotFound(f"model {model_id!r} does not exist")
    return record


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
