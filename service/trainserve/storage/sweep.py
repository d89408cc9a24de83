"""Crash debris: files in the store that no database row owns, removed when a process starts.

Every write goes to ``tmp/`` and is renamed into place (or, on an object store, appears
whole), and a row is committed only after its file is in place; so a crash can leave a
half-written file in ``tmp/``, or a complete file whose row never committed, and a
failed cleanup a file whose row is gone. None is visible to a reader, but all take space.
Only files older than a grace period go: younger ones may belong to a write in progress,
on this node or on another sharing the store, whose row is not committed yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from trainserve.db import DatasetRecord, JobRecord, ModelRecord
from trainserve.jobs.status import ACTIVE
from trainserve.storage.base import Kind, Store

log = logging.getLogger(__name__)
# Ids asked about per query: well under any database's limit on bound parameters.
_IDS_PER_QUERY = 500


def sweep(sessions: sessionmaker, store: Store, *, grace_seconds: float) -> list[str]:  # type: ignore[type-arg]
    """Delete orphans older than ``grace_seconds``; returns the names of what was removed."""
    store.ensure()
    removed = store.sweep_tmp(older_than_s=grace_seconds)
    with sessions() as session:
        owners: list[tuple[Kind, Callable[[list[str]], set[str]]]] = [
            ("datasets", _owner(session, DatasetRecord.id)),
            ("weights", _owner(session, ModelRecord.id)),
            ("checkpoints", _owner(session, JobRecord.id, active_jobs_only=True)),
        ]
        for kind, owned in owners:
            try:
                removed += store.sweep_orphans(kind, older_than_s=grace_seconds, owned=owned)
            except OSError as exc:  # e.g. S3 credentials that may read and write but not list
                log.warning("could not sweep the store's %s for orphans, leaving them: %s", kind, exc)
    if removed:
        log.warning("removed %d orphan file(s) left by a crash: %s", len(removed), removed[:10])
    return removed


def _owner(
    session: Session, id_column: InstrumentedAttribute[str], *, active_jobs_only: bool = False
) -> Callable[[list[str]], set[str]]:
    """The ids, of those asked about, that a row owns; a checkpoint is owned only by a job
    that may still resume from it."""

    def owned(ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), _IDS_PER_QUERY):
            query = select(id_column).where(id_column.in_(ids[start : start + _IDS_PER_QUERY]))
            if active_jobs_only:
                query = query.where(JobRecord.status.in_(ACTIVE))
            found.update(session.scalars(query))
        return found

    return owned
