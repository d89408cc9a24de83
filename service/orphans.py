"""Crash debris: files in the store that no database row owns, removed when a process starts.

Every write goes to ``tmp/`` and is renamed into place, and a row is committed only after
its file is in place; so a crash can leave a half-written file in ``tmp/``, or a complete
file whose row never committed. Neither is visible to a reader, but both take disk space.
Only files older than a grace period go: younger ones may belong to a write in progress
on another node sharing the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, sessionmaker

from service.db import DatasetRecord, JobRecord, ModelRecord
from service.jobs import ACTIVE
from service.store import Store

log = logging.getLogger(__name__)


def sweep(sessions: sessionmaker, store: Store, *, grace_seconds: float) -> list[Path]:  # type: ignore[type-arg]
    """Delete orphans older than ``grace_seconds``; returns what was removed."""
    store.ensure()
    removed = store.sweep_tmp(older_than_s=grace_seconds)
    owners: list[tuple[Path, InstrumentedAttribute[str], bool]] = [
        (store.datasets, DatasetRecord.id, False),
        (store.weights, ModelRecord.id, False),
        (store.checkpoints, JobRecord.id, True),  # only a job that may still resume needs one
    ]
    with sessions() as session:
        for folder, id_column, active_jobs_only in owners:
            candidates = store.stored_ids(folder, older_than_s=grace_seconds)
            if not candidates:
                continue
            query = select(id_column).where(id_column.in_(list(candidates)))
            if active_jobs_only:
                query = query.where(JobRecord.status.in_(ACTIVE))
            owned = set(session.scalars(query))
            for object_id, path in candidates.items():
                if object_id not in owned:
                    path.unlink(missing_ok=True)
                    removed.append(path)
    if removed:
        log.warning("removed %d orphan file(s) left by a crash: %s", len(removed), [p.name for p in removed[:10]])
    return removed
