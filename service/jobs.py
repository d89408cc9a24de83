"""Training jobs as every process sees them: queue them through Huey, look them up, cancel
them, and bring back jobs whose worker died. The worker process that trains them is
``service.worker``.

The ``jobs`` table is the truth for a job's state; the queue only carries job ids.
Every state change is a conditional UPDATE (``WHERE status = ...``), so a cancel and a
worker's claim can race without either being lost. A job is enqueued only after the
transaction that created it commits, so a worker never looks for a row that is not there.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from huey import Huey, PostgresHuey, RedisHuey, SqliteHuey
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.data import TableSchema
from service.db import DatasetRecord, JobRecord, on_commit, rows_changed, utcnow
from service.errors import Conflict, NotFound
from service.spec import Limits, TrainSpec, plan_training
from service.store import Store, new_id

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)


def limits_of(settings: Settings) -> Limits:
    return Limits(
        settings.max_epochs,
        settings.max_parameters,
        settings.max_layer_width,
        max_job_seconds=settings.max_job_seconds,
        max_memory_bytes=settings.max_train_memory_bytes,
    )


# -- the queue -----------------------------------------------------------------------------


@dataclass
class JobQueue:
    """A Huey instance with the training task registered on it."""

    huey: Huey
    train_task: Any

    def enqueue(self, job_id: str) -> None:
        self.train_task(job_id)

    def waiting_job_ids(self) -> set[str]:
        """The jobs whose entries wait on the queue now (not those a worker has taken off it)."""
        return {task.args[0] for task in self.huey.pending()}

    def close(self) -> None:
        """Close the queue's connection (SQLite and Postgres keep one open; Redis pools)."""
        close = getattr(self.huey.storage, "close", None)
        if close is not None:
            close()


def huey_for(url: str, name: str) -> Huey:
    """The Huey instance a queue URL names: a SQLite file (embedded), Redis or Postgres (shared)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.split("+")[0]
    if scheme == "sqlite":
        return SqliteHuey(name, filename=parsed.path, results=False, utc=True)
    if scheme in ("redis", "rediss", "unix"):
        # Blocking pops (BRPOP): an idle worker wakes the moment a job is pushed.
        return RedisHuey(name, url=url, results=False, utc=True, blocking=True, read_timeout=1)
    if scheme in ("postgresql", "postgres"):
        # psycopg takes libpq's URL, without SQLAlchemy's "+driver" part. Workers LISTEN for
        # new jobs and take one with SELECT ... FOR UPDATE SKIP LOCKED: each entry goes to one worker.
        dsn = parsed._replace(scheme="postgresql").geturl()
        return PostgresHuey(name, dsn=dsn, results=False, utc=True, blocking=True, read_timeout=1)
    raise ValueError(
        f"unsupported queue URL scheme {parsed.scheme!r} (expected sqlite:///path, redis://host or postgresql://host/db)"
    )


def build_queue(settings: Settings, *, run: Callable[[str], None] | None = None) -> JobQueue:
    """The queue. Only a worker passes ``run``, which trains the job an entry names (see
    ``service.worker``); any other process only enqueues."""
    huey = huey_for(settings.resolved_queue_url, settings.queue_name)

    # Registered in every process, here: an entry names its task by the function's module
    # and this name ("service.jobs.trainserve.train"), so entries queued by any version
    # of the code, or by an API node, are the worker's to run.
    @huey.task(name="trainserve.train")  # type: ignore[untyped-decorator]
    def train_task(job_id: str) -> None:
        if run is None:
            raise RuntimeError("this process only enqueues training jobs; `trainserve worker` runs them")
        run(job_id)

    return JobQueue(huey, train_task)


# -- the API side ----------------------------------------------------------------------------


def get_job(session: Session, job_id: str) -> JobRecord:
    job = session.get(JobRecord, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} does not exist")
    return job


def list_jobs(
    session: Session, *, status: str | None = None, name: str | None = None, limit: int = 100, offset: int = 0
) -> list[JobRecord]:
    query = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit).offset(offset)
    if status is not None:
        query = query.where(JobRecord.status == status)
    if name is not None:
        query = query.where(JobRecord.name == name)
    return list(session.scalars(query))


def submit(session: Session, queue: JobQueue, spec: TrainSpec, dataset: DatasetRecord, limits: Limits) -> JobRecord:
    """Validate the spec against the dataset, record a queued job, enqueue it on commit."""
    plan_training(spec, TableSchema.from_dicts(dataset.n_rows, dataset.columns), limits)
    spec = spec.model_copy(update={"dataset_id": dataset.id})
    job = JobRecord(
        id=new_id(),
        status=QUEUED,
        spec=spec.model_dump(mode="json"),
        dataset_id=dataset.id,
        epochs=spec.epochs,
        history=[],
        name=spec.name,
    )
    session.add(job)
    session.flush()
    job_id = job.id
    sessions = sessionmaker(session.get_bind())

    def enqueue() -> None:
        try:
            queue.enqueue(job_id)
        except Exception as exc:
            with sessions.begin() as fresh:
                _end(fresh, job_id, QUEUED, FAILED, error=f"the job could not be queued: {exc}")
            raise

    on_commit(session, enqueue)
    return job


def _end(session: Session, job_id: str, current: str, status: str, **values: Any) -> int:
    now = utcnow()
    return rows_changed(
        session,
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.status == current)
        .values(status=status, finished_at=now, updated_at=now, **values),
    )


def requeue_queued(sessions: sessionmaker, queue: JobQueue) -> int:  # type: ignore[type-arg]
    """Put every ``queued`` job that has no entry waiting on the queue on it again (at start:
    an entry may have been lost with a crash). A duplicate entry would be harmless (a worker
    claims with a compare-and-set), but each restart used to add one per queued job."""
    with sessions.begin() as session:
        queued = set(session.scalars(select(JobRecord.id).where(JobRecord.status == QUEUED)))
    missing = sorted(queued - queue.waiting_job_ids()) if queued else []
    for job_id in missing:
        queue.enqueue(job_id)
    return len(missing)


def _overdue(grace_seconds: float) -> tuple[ColumnElement[bool], ...]:
    # A queued job's updated_at is when it became queued: nothing writes a queued row but
    # the transitions into that state and ``requeue_lost``.
    return JobRecord.status == QUEUED, JobRecord.updated_at < utcnow() - timedelta(seconds=grace_seconds)


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


def with_note(notes: list[Any] | None, note: str) -> list[Any]:
    """A job's notes with one more at the end."""
    return [*(notes or []), note]


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
            ).where(JobRecord.status == RUNNING, expired)
        ).all()
        for row in rows:
            same_claim = update(JobRecord).where(
                JobRecord.id == row.id,
                JobRecord.status == RUNNING,
                JobRecord.attempts == row.attempts,
                JobRecord.worker.is_(None) if row.worker is None else JobRecord.worker == row.worker,
                expired,
            )
            lost = f"attempt {row.attempts}: worker {row.worker} stopped renewing its lease"
            if row.cancel_requested:
                values: dict[str, Any] = {
                    "status": CANCELLED,
                    "error": "cancelled; its worker stopped before it could finish",
                    "finished_at": now,
                }
            elif row.attempts >= max_attempts:
                values = {
                    "status": FAILED,
                    "error": f"the job's worker stopped responding (its lease expired) on attempt {row.attempts} "
                    f"of {max_attempts} (TRAINSERVE_MAX_ATTEMPTS); last worker: {row.worker}",
                    "finished_at": now,
                }
            else:
                values = {"status": QUEUED, "worker": None, "notes": with_note(row.notes, f"{lost}; re-queued")}
            if rows_changed(session, same_claim.values(lease_expires_at=None, updated_at=now, **values)):
                changed.append(row.id)
                (requeued if values["status"] == QUEUED else ended).append(row.id)
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
            .where(JobRecord.status == RUNNING, JobRecord.worker == worker)
            .values(lease_expires_at=now, updated_at=now),
        )


class Rescuer:
    """Runs ``rescue_expired`` and ``requeue_lost`` every ``rescue_interval_seconds`` in a
    background thread."""

    def __init__(self, sessions: sessionmaker, queue: JobQueue, store: Store, settings: Settings) -> None:  # type: ignore[type-arg]
        self.sessions, self.queue, self.store, self.settings = sessions, queue, store, settings
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
            for rescue in (self.rescue_now, self.requeue_lost_now):
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


def cancel(session: Session, store: Store, job_id: str) -> JobRecord:
    """A queued job ends now; a running one is asked to stop and ends within a progress interval
    (its worker deletes its checkpoint)."""
    job = get_job(session, job_id)
    ended = _end(session, job_id, QUEUED, CANCELLED, error="cancelled before it started")
    if ended:
        # A job handed back, or re-queued after its worker died, may have a checkpoint: no
        # attempt will resume from it now.
        on_commit(session, lambda: store.delete_checkpoint(job_id))
    else:
        asked = rows_changed(
            session,
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.status == RUNNING)
            .values(cancel_requested=True, updated_at=utcnow()),
        )
        if not asked:
            session.refresh(job)
            raise Conflict(f"job {job_id} has already ended ({job.status})")
    session.refresh(job)
    return job


def worker_name(pid: int) -> str:
    """How a job row records the worker process that runs it."""
    return f"{socket.gethostname()}:{pid}"
