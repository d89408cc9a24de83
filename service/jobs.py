"""Training jobs: queue them through Huey, run them in a worker process, report progress, cancel.

The ``jobs`` table is the truth for a job's state; the queue only carries job ids.
Every state change is a conditional UPDATE (``WHERE status = ...``), so a cancel and a
worker's claim can race without either being lost. A job is enqueued only after the
transaction that created it commits, so a worker never looks for a row that is not there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from huey import Huey, PostgresHuey, RedisHuey, SqliteHuey
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service import engine
from service.config import Settings
from service.data import Table, TableSchema
from service.db import (
    DatasetRecord,
    JobRecord,
    ModelRecord,
    make_engine,
    make_session_factory,
    on_commit,
    rows_changed,
    utcnow,
)
from service.errors import Conflict, InvalidInput, NotFound, TrainserveError
from service.spec import Limits, TrainingPlan, TrainSpec, plan_training
from service.store import Store, new_id, open_store

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
_HISTORY_POINTS = 1000


def limits_of(settings: Settings) -> Limits:
    return Limits(settings.max_epochs, settings.max_parameters, settings.max_layer_width)


# -- the queue -----------------------------------------------------------------------------


@dataclass
class JobQueue:
    """A Huey instance with the training task registered on it."""

    huey: Huey
    train_task: Any

    def enqueue(self, job_id: str) -> None:
        self.train_task(job_id)

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


def build_queue(settings: Settings) -> JobQueue:
    huey = huey_for(settings.resolved_queue_url, settings.queue_name)
    context: dict[str, WorkerContext] = {}

    @huey.task(name="trainserve.train")  # type: ignore[untyped-decorator]
    def train_task(job_id: str) -> None:
        # Built on first use inside the worker process; the API process only enqueues.
        if "ctx" not in context:
            context["ctx"] = WorkerContext.from_settings(settings)
        run_job(context["ctx"], job_id)

    return JobQueue(huey, train_task)


def run_worker(settings: Settings) -> None:
    """Consume training jobs until SIGINT/SIGTERM (``trainserve worker``)."""
    queue = build_queue(settings)
    consumer = queue.huey.create_consumer(
        workers=settings.worker_threads,
        worker_type="thread",
        periodic=False,
        initial_delay=0.05,
        backoff=1.15,
        max_delay=settings.queue_poll_max_s,
    )
    consumer.run()


# -- the API side ----------------------------------------------------------------------------


def get_job(session: Session, job_id: str) -> JobRecord:
    job = session.get(JobRecord, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} does not exist")
    return job


def list_jobs(session: Session, *, status: str | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
    query = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit).offset(offset)
    if status is not None:
        query = query.where(JobRecord.status == status)
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


def recover(
    sessions: sessionmaker,  # type: ignore[type-arg]
    queue: JobQueue,
    *,
    worker: str | None = None,
    fail_running: bool = True,
) -> int:
    """Fail the ``running`` jobs of a worker that is gone (every worker's, at start-up, unless
    ``fail_running`` is False) and put ``queued`` jobs back on the queue; a duplicate queue
    entry is harmless because a worker claims a job with a compare-and-set. Returns how many
    running jobs were failed."""
    now = utcnow()
    failed = 0
    with sessions.begin() as session:
        if fail_running:
            stale = update(JobRecord).where(JobRecord.status == RUNNING)
            if worker is not None:
                stale = stale.where(JobRecord.worker == worker)
            failed = rows_changed(
                session,
                stale.values(
                    status=FAILED, error="the worker stopped while running this job", finished_at=now, updated_at=now
                ),
            )
        queued = list(session.scalars(select(JobRecord.id).where(JobRecord.status == QUEUED)))
    for job_id in queued:
        queue.enqueue(job_id)
    return failed


def cancel(session: Session, job_id: str) -> JobRecord:
    """A queued job ends now; a running one is asked to stop and ends within a progress interval."""
    job = get_job(session, job_id)
    ended = _end(session, job_id, QUEUED, CANCELLED, error="cancelled before it started")
    if not ended:
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


# -- the worker side -------------------------------------------------------------------------


def worker_name(pid: int) -> str:
    """How a job row records the worker process that runs it."""
    return f"{socket.gethostname()}:{pid}"


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker  # type: ignore[type-arg]
    store: Store
    name: str

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        store = open_store(settings)
        store.ensure()
        sessions = make_session_factory(make_engine(settings.resolved_database_url))
        return cls(settings, sessions, store, worker_name(os.getpid()))


class _Progress:
    """Writes a running job's progress at most once per interval; reads its cancel flag."""

    def __init__(self, ctx: WorkerContext, job_id: str) -> None:
        self.ctx, self.job_id = ctx, job_id
        self.interval = ctx.settings.progress_interval_s
        self.last_write = 0.0

    def on_epoch(self, report: engine.EpochReport) -> None:
        now = time.monotonic()
        if now - self.last_write < self.interval:
            return
        self.last_write = now
        with self.ctx.sessions.begin() as session:
            rows_changed(
                session,
                update(JobRecord)
                .where(JobRecord.id == self.job_id, JobRecord.status == RUNNING)
                .values(
                    epoch=report.epoch,
                    train_loss=report.train_loss,
                    val_loss=report.val_loss,
                    val_metrics=report.val_metrics,
                    updated_at=utcnow(),
                ),
            )

    def should_stop(self) -> bool:
        with self.ctx.sessions() as session:
            row = session.execute(
                select(JobRecord.status, JobRecord.cancel_requested).where(JobRecord.id == self.job_id)
            ).one_or_none()
        return row is None or row.cancel_requested or row.status != RUNNING


def _thin(history: list[engine.EpochReport]) -> list[list[Any]]:
    step = max(1, -(-len(history) // _HISTORY_POINTS))
    kept = history[::step]
    if history and kept[-1] is not history[-1]:
        kept.append(history[-1])
    return [[r.epoch, r.train_loss, r.val_loss] for r in kept]


def _finish(ctx: WorkerContext, job_id: str, status: str, **values: Any) -> None:
    with ctx.sessions.begin() as session:
        _end(session, job_id, RUNNING, status, **values)


def _targets(table: Table, plan: TrainingPlan) -> np.ndarray:
    if plan.task == "regression":
        return table.matrix(plan.targets, dtype=np.float64)
    return table.column(plan.targets[0])


def on_this_worker(spec: TrainSpec, settings: Settings) -> TrainSpec:
    """The spec to train here: "auto" means the device this worker was started for
    (``trainserve worker --device cuda:1``), if any; otherwise the engine's choice, which
    honours ``CUDA_VISIBLE_DEVICES``. The job and the model keep the spec as sent."""
    if spec.device == "auto" and settings.worker_device:
        return spec.model_copy(update={"device": settings.worker_device})
    return spec


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Claim a queued job, train it, save the model; every outcome lands in the job row."""
    with ctx.sessions.begin() as session:
        claimed = rows_changed(
            session,
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.status == QUEUED)
            .values(
                status=RUNNING,
                started_at=utcnow(),
                attempts=JobRecord.attempts + 1,
                worker=ctx.name,
                updated_at=utcnow(),
            ),
        )
        job = session.get(JobRecord, job_id)
        dataset = session.get(DatasetRecord, job.dataset_id) if job and job.dataset_id else None
    if not claimed or job is None:
        log.info("job %s is not queued any more; skipping", job_id)
        return
    try:
        if dataset is None:
            raise InvalidInput("the job's dataset was deleted before the job ran")
        spec = TrainSpec.model_validate(job.spec)
        table = ctx.store.load_dataset(dataset.id, dataset.file_sha256)
        plan = plan_training(spec, table.schema(), limits_of(ctx.settings))
        progress = _Progress(ctx, job_id)
        result = engine.train(
            on_this_worker(spec, ctx.settings),
            plan,
            table.matrix(plan.features),
            _targets(table, plan),
            on_epoch=progress.on_epoch,
            should_stop=progress.should_stop,
            check_every_s=ctx.settings.progress_interval_s,
        )
    except engine.TrainingCancelled:
        _finish(ctx, job_id, CANCELLED, error="cancelled while running")
        return
    except (TrainserveError, engine.DeviceUnavailable, FloatingPointError) as exc:
        _finish(ctx, job_id, FAILED, error=str(exc))
        return
    except Exception as exc:  # a worker must record every failure, not die on it
        log.exception("job %s failed", job_id)
        _finish(ctx, job_id, FAILED, error=f"{type(exc).__name__}: {exc}")
        return
    try:
        _save(ctx, job_id, dataset, spec, plan, result)
    except Exception as exc:
        log.exception("job %s: saving the model failed", job_id)
        _finish(ctx, job_id, FAILED, error=f"saving the model failed: {type(exc).__name__}: {exc}")


def _save(
    ctx: WorkerContext,
    job_id: str,
    dataset: DatasetRecord,
    spec: TrainSpec,
    plan: TrainingPlan,
    result: engine.TrainedModel,
) -> None:
    model_id = new_id()
    metadata = {"trainserve_model_id": model_id, "job_id": job_id, "spec": json.dumps(spec.model_dump(mode="json"))}
    weights_sha256, weights_bytes = ctx.store.save_weights(model_id, result.module.state_dict(), metadata)
    last = result.history[-1]
    now = utcnow()
    try:
        with ctx.sessions.begin() as session:
            finished = rows_changed(
                session,
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.status == RUNNING, JobRecord.cancel_requested.is_(False))
                .values(
                    status=SUCCEEDED,
                    model_id=model_id,
                    epoch=last.epoch,
                    train_loss=last.train_loss,
                    val_loss=last.val_loss,
                    val_metrics=last.val_metrics,
                    history=_thin(result.history),
                    device=result.device,
                    finished_at=now,
                    updated_at=now,
                ),
            )
            if finished:
                session.add(
                    ModelRecord(
                        id=model_id,
                        job_id=job_id,
                        dataset_id=dataset.id,
                        dataset_sha256=dataset.sha256,
                        spec=spec.model_dump(mode="json"),
                        task=plan.task,
                        features=plan.features,
                        targets=plan.targets,
                        classes=plan.classes,
                        input_mean=result.input_mean,
                        input_std=result.input_std,
                        metrics=result.metrics,
                        n_parameters=plan.n_parameters,
                        weights_sha256=weights_sha256,
                        weights_bytes=weights_bytes,
                        torch_version=torch.__version__,
                        device=result.device,
                        train_seconds=result.train_seconds,
                    )
                )
    except BaseException:
        ctx.store.delete_weights(model_id)
        raise
    if not finished:  # cancelled in the last instant: keep no model for it
        ctx.store.delete_weights(model_id)
        _finish(ctx, job_id, CANCELLED, error="cancelled while running")
