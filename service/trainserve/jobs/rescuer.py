"""Bring back jobs whose worker died or whose queue entry was lost.

Runs in every ``serve`` and ``worker`` process (``Rescuer``); each change is a
compare-and-set on the job's row, so any number of rescuers can run at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import sessionmaker

from trainserve.config import Settings
from trainserve.db import JobRecord, rows_changed, utcnow
from trainserve.jobs.lifecycle import with_note
from trainserve.jobs.queue import JobQueue
from trainserve.jobs.status import JobStatus
from trainserve.storage.base import Store

log = logging.getLogger(__name__)


def requeue_queued(sessions: sessionmaker, queue: JobQueue) -> int:  # type: ignore[type-arg]
    """Put every ``queued`` job that has no entry waiting on the queue on it again (at start:
    an entry may have been lost with a crash). A duplicate entry would be harmless (a worker
    claims with a compare-and-set), but each restart used to add one per queued job."""
    with sessions.begin() as session:
        queued = set(session.scalars(select(JobRecord.id).where(JobRecord.status == JobStatus.QUEUED)))
    missing = sorted(queued - queue.waiting_job_ids()) if queued else []
    for job_id in missing:
        queue.enqueue(job_id)
    return len(missing)


def _overdue(grace_seconds: float) -> tuple[ColumnElement[bool], ...]:
    # A queued job's updated_at is when it became queued: nothing writes a queued row but
    # the transitions into that state and ``requeue_lost``.
    return JobRecord.status == JobStatus.QUEUED, JobRecord.updated_at < utcnow() - timedelta(seconds=grace_seconds)


def jobs_missing_from_queue(sessions: sessionmaker, queue: JobQueue, *, grace_seconds: float) -> set[str]:  # type: ignore[type-arg]
    """The jobs ``queued`` for ``grace_seconds`` or more that have no entry on the queue now.

    A younger job's entry may still be on its way (it is enqueued after the commit). An
    entry a worker has just taken is not on the queue either, until the worker claims its
    job a moment later: one look cannot tell that from a lost entry (see ``Rescuer``).
    """
    with sessions() as session:
        overdue = set(session.scalars(select(JobRecord.id).where(*_overdue(grace_seconds))))
    if not overdue:
        return overdue  # the common case: no need to read the queue
    return overdue - queue.waiting_job_ids()


def requeue_lost(
    sessions: sessionmaker,  # type: ignore[type-arg]
    queue: JobQueue,
    job_ids: Collection[str],
    *,
    grace_seconds: float,
) -> list[str]:
    """Enqueue again the jobs of ``job_ids`` (found without an entry on the queue) that are
    still queued and overdue, noting it on each: a worker died between taking the entry and
    claiming the job, or the queue lost data (a Redis restart without persistence). Safe to
    run in many processes at once (a compare-and-set on the row); returns the ids enqueued.
    """
    lost: list[str] = []
    if not job_ids:
        return lost
    note = f"no entry on the queue after {grace_seconds:g} s queued; re-queued"
    with sessions.begin() as session:
        rows = session.execute(
            select(JobRecord.id, JobRecord.notes).where(JobRecord.id.in_(job_ids), *_overdue(grace_seconds))
        ).all()
        for row in rows:
            # updated_at moves to now: no rescuer enqueues it again before its new entry is
            # there to be seen, nor if a worker claimed it meanwhile (no longer queued).
            if rows_changed(
                session,
                update(JobRecord)
                .where(JobRecord.id == row.id, *_overdue(grace_seconds))
                .values(notes=with_note(row.notes, note), updated_at=utcnow()),
            ):
                lost.append(row.id)
    for job_id in lost:
        log.warning("job %s was queued but had no entry on the queue; enqueued it again", job_id)
        queue.enqueue(job_id)
    return lost


def rescue_expired(
    sessions: sessionmaker,  # type: ignore[type-arg]
    queue: JobQueue,
    store: Store,
    *,
    max_attempts: int,
) -> list[str]:
    """Take back ``running`` jobs whose lease lapsed: their worker died or lost the database.

    Each goes back to ``queued`` (and on the queue, after commit) while it has attempts left,
    else ends ``failed`` saying why; a job with a pending cancel ends ``cancelled`` (after
    the commit, an ended job's checkpoint is deleted: no attempt will resume from it). Safe to
    run in any number of processes at once: each change is a compare-and-set on the row as
    read, so one rescuer wins and the others change nothing. Returns the ids it changed.
    """
    now = utcnow()
    expired = or_(JobRecord.lease_expires_at < now, JobRecord.lease_expires_at.is_(None))
    requeued: list[str] = []
    ended: list[str] = []
    changed: list[str] = []
    with sessions.begin() as session:
        rows = session.execute(
            select(
                JobRecord.id, JobRecord.attempts, JobRecord.worker, JobRecord.cancel_requested, JobRecord.notes
            ).where(JobRecord.status == JobStatus.RUNNING, expired)
        ).all()
        for row in rows:
            same_claim = update(JobRecord).where(
                JobRecord.id == row.id,
                JobRecord.status == JobStatus.RUNNING,
                JobRecord.attempts == row.attempts,
                JobRecord.worker.is_(None) if row.worker is None else JobRecord.worker == row.worker,
                expired,
            )
            lost = f"attempt {row.attempts}: worker {row.worker} stopped renewing its lease"
            if row.cancel_requested:
                values: dict[str, Any] = {
                    "status": JobStatus.CANCELLED,
                    "error": "cancelled; its worker stopped before it could finish",
                    "finished_at": now,
                }
            elif row.attempts >= max_attempts:
                values = {
                    "status": JobStatus.FAILED,
                    "error": f"the job's worker stopped responding (its lease expired) on attempt {row.attempts} "
                    f"of {max_attempts} (TRAINSERVE_MAX_ATTEMPTS); last worker: {row.worker}",
                    "finished_at": now,
                }
            else:
                values = {
                    "status": JobStatus.QUEUED,
                    "worker": None,
                    "notes": with_note(row.notes, f"{lost}; re-queued"),
                }
            if rows_changed(session, same_claim.values(lease_expires_at=None, updated_at=now, **values)):
                changed.append(row.id)
                (requeued if values["status"] == JobStatus.QUEUED else ended).append(row.id)
    for job_id in requeued:
        log.warning("job %s lost its worker; re-queued", job_id)
        queue.enqueue(job_id)
    for job_id in ended:
        _delete_checkpoint(store, job_id)
    return changed


def _delete_checkpoint(store: Store, job_id: str) -> None:
    """Delete an ended job's checkpoint; one that cannot be deleted now is left to the orphan sweep."""
    try:
        store.delete_checkpoint(job_id)
    except Exception:
        log.exception("job %s: deleting its checkpoint failed", job_id)


def expire_leases_of(sessions: sessionmaker, worker: str) -> int:  # type: ignore[type-arg]
    """End the leases a worker holds now (its parent saw it die): the rescuer need not wait."""
    now = utcnow()
    with sessions.begin() as session:
        return rows_changed(
            session,
            update(JobRecord)
            .where(JobRecord.status == JobStatus.RUNNING, JobRecord.worker == worker)
            .values(lease_expires_at=now, updated_at=now),
        )


class Rescuer:
    """Runs ``rescue_expired`` and ``requeue_lost`` every ``rescue_interval_seconds`` in a
    background thread."""

    def __init__(
        self,
        sessions: sessionmaker,  # type: ignore[type-arg]
        queue: JobQueue,
        store: Store,
        settings: Settings,
        *,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self.sessions, self.queue, self.store, self.settings = sessions, queue, store, settings
        # A worker renews its row in the workers table here (trainserve.jobs.workers).
        self.on_round = on_round
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-rescuer", daemon=True)
        self._missing: set[str] = set()  # queued jobs the last look found with no entry on the queue

    def rescue_now(self) -> list[str]:
        return rescue_expired(self.sessions, self.queue, self.store, max_attempts=self.settings.max_attempts)

    def requeue_lost_now(self) -> list[str]:
        grace = self.settings.lost_entry_grace_seconds
        missing = jobs_missing_from_queue(self.sessions, self.queue, grace_seconds=grace)
        # Only a job missing at two looks a rescue interval apart has lost its entry: a worker
        # claims the job of an entry it takes within moments, so one look may fall between.
        lost = requeue_lost(self.sessions, self.queue, missing & self._missing, grace_seconds=grace)
        self._missing = missing - set(lost)
        return lost

    def _loop(self) -> None:
        while not self._stopping.wait(self.settings.rescue_interval_seconds):
            rounds: list[Callable[[], object]] = [self.rescue_now, self.requeue_lost_now]
            if self.on_round is not None:
                rounds.insert(0, self.on_round)
            for rescue in rounds:
                try:
                    rescue()
                except Exception:  # the database or the queue may be briefly away; try again next round
                    log.exception("rescuing jobs failed (%s)", rescue.__name__)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)
