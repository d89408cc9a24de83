"""The worker process: take training jobs off the queue, claim them, train them under a
lease, save checkpoints and models, and hand jobs back when asked to stop.

Everything a worker writes for a job is fenced by its lease (see ``Lease``): once the
rescuer (``service.jobs``) has given the job to another worker, the old one writes nothing.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from huey import Huey
from huey.consumer import Consumer
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

import service
from service import engine, native
from service.config import Settings
from service.data import Table
from service.db import DatasetRecord, JobRecord, ModelRecord, make_engine, make_session_factory, rows_changed, utcnow
from service.errors import InvalidInput, TrainserveError
from service.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobQueue,
    Rescuer,
    build_queue,
    limits_of,
    with_note,
    worker_name,
)
from service.spec import TrainingPlan, TrainSpec, plan_training
from service.store import IntegrityError as StoreIntegrityError
from service.store import Store, new_id, open_store

log = logging.getLogger(__name__)

_HISTORY_POINTS = 1000


class _DrainingConsumer(Consumer):  # type: ignore[misc]
    """Huey's consumer, where SIGINT and SIGTERM both stop it gracefully after ``on_stop``.

    Huey interrupts running tasks on SIGTERM and waits for them (maybe hours) on SIGINT;
    a training worker instead asks its running job to checkpoint and go back to the queue,
    then waits for that, which takes seconds.
    """

    def __init__(self, huey: Huey, *, on_stop: Callable[[], None], **options: Any) -> None:
        super().__init__(huey, **options)
        self._on_stop = on_stop
        self._signal_actions[signal.SIGINT] = (False, True)  # (restart, graceful)
        self._signal_actions[signal.SIGTERM] = (False, True)

    def _handle_signal(self, signum: int, frame: Any) -> None:
        super()._handle_signal(signum, frame)
        self._on_stop()


def run_worker(settings: Settings, *, exit_with_parent: bool = False) -> None:
    """Consume training jobs until SIGINT/SIGTERM (``trainserve worker``), which drain it.

    The worker also runs the rescuer, so jobs of a dead worker on any machine come back.
    With ``exit_with_parent`` it drains itself when the process that started it dies.
    """
    if settings.worker_nice:
        os.nice(settings.worker_nice)
    if settings.train_threads is not None:
        torch.set_num_threads(settings.train_threads)
    draining = threading.Event()  # set on SIGTERM/SIGINT: a running job hands itself back

    def run(job_id: str) -> None:
        run_job(ctx, job_id)

    queue = build_queue(settings, run=run)
    # Built before the first entry is taken, so that taking an entry and claiming its job
    # are moments apart: the rescuer re-enqueues a queued job whose entry it cannot see
    # (``jobs.requeue_lost``), and the engine's one-off costs take a second or more.
    ctx = WorkerContext.from_settings(settings, queue, draining)
    consumer = _DrainingConsumer(
        queue.huey,
        on_stop=draining.set,
        workers=settings.worker_threads,
        worker_type="thread",
        periodic=False,
        initial_delay=0.05,
        backoff=1.15,
        max_delay=settings.queue_poll_max_s,
    )
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    rescuer = Rescuer(sessions, queue, ctx.store, settings)
    rescuer.start()
    if exit_with_parent:
        _stop_when_orphaned()
    try:
        consumer.run()
    finally:
        rescuer.stop()


def _stop_when_orphaned() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the process that started this worker is gone; draining")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker  # type: ignore[type-arg]
    store: Store
    name: str
    queue: JobQueue
    draining: threading.Event  # set when the worker process should hand its jobs back and exit

    @classmethod
    def from_settings(cls, settings: Settings, queue: JobQueue, draining: threading.Event) -> WorkerContext:
        store = open_store(settings)
        store.ensure()
        sessions = make_session_factory(make_engine(settings.resolved_database_url))
        engine.warm_up()
        return cls(settings, sessions, store, worker_name(os.getpid()), queue, draining)


class Lease:
    """A worker's claim on one running job, renewed by a heartbeat thread every lease/3.

    Every write the worker makes for the job goes through ``update``, fenced by the claim
    (running, this worker, this attempt): once the rescuer has given the job to someone
    else, the old worker's writes change nothing. ``lost`` is set when a renewal finds the
    row taken, or when the worker could not renew before the lease ran out.
    """

    def __init__(self, sessions: sessionmaker, job_id: str, worker: str, attempt: int, seconds: float) -> None:  # type: ignore[type-arg]
        self.sessions, self.job_id, self.worker, self.attempt, self.seconds = sessions, job_id, worker, attempt, seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._valid_until = time.monotonic() + seconds
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id[:8]}", daemon=True)

    def owned(self) -> tuple[ColumnElement[bool], ...]:
        return (
            JobRecord.id == self.job_id,
            JobRecord.status == RUNNING,
            JobRecord.worker == self.worker,
            JobRecord.attempts == self.attempt,
        )

    def update(self, session: Session, **values: Any) -> bool:
        """UPDATE the job row if this claim still holds; False (and ``lost``) if it does not."""
        kept = rows_changed(session, update(JobRecord).where(*self.owned()).values(updated_at=utcnow(), **values))
        if not kept:
            self.lost.set()
        return bool(kept)

    def renew(self) -> None:
        asked = time.monotonic()
        now = utcnow()
        with self.sessions.begin() as session:
            kept = self.update(session, lease_expires_at=now + timedelta(seconds=self.seconds), heartbeat_at=now)
        if kept:
            self._valid_until = asked + self.seconds

    def _beat(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception:  # e.g. the database is briefly locked or away: retry until the lease runs out
                log.warning("job %s: renewing the lease failed", self.job_id, exc_info=True)
            if time.monotonic() > self._valid_until:
                self.lost.set()
            if self.lost.is_set():
                log.warning("job %s: attempt %d lost its lease; stopping without writing", self.job_id, self.attempt)
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


class StopReason(enum.Enum):
    CANCELLED = "cancelled"
    LEASE_LOST = "lease lost"
    TIME_LIMIT = "time limit"


@dataclass(frozen=True)
class TimeLimit:
    seconds: float
    source: str  # which setting set it, for the error message


class _Attempt:
    """One claim of a job by this worker: its lease, progress writes, and why it should stop."""

    def __init__(self, ctx: WorkerContext, job: JobRecord, *, time_limit: TimeLimit) -> None:
        self.ctx, self.job_id, self.time_limit = ctx, job.id, time_limit
        self.lease = Lease(ctx.sessions, job.id, ctx.name, job.attempts, ctx.settings.lease_seconds)
        self.interval = ctx.settings.progress_interval_s
        self.last_write = 0.0
        self.reports: list[engine.EpochReport] = []
        self.started = time.monotonic()  # moved back by the training time a checkpoint carries
        self.stop_reason: StopReason | None = None

    def on_epoch(self, report: engine.EpochReport) -> None:
        self.reports.append(report)
        now = time.monotonic()
        if now - self.last_write < self.interval:
            return
        self.last_write = now
        with self.ctx.sessions.begin() as session:
            self.lease.update(
                session,
                epoch=report.epoch,
                train_loss=report.train_loss,
                val_loss=report.val_loss,
                val_metrics=report.val_metrics,
                # The curve so far, for loss plots and event streams of a running job.
                history=_thin(self.reports),
            )

    def _why_stop(self) -> StopReason | None:
        if self.lease.lost.is_set():
            return StopReason.LEASE_LOST
        with self.ctx.sessions() as session:
            row = session.execute(select(JobRecord.cancel_requested).where(*self.lease.owned())).one_or_none()
        if row is None:
            self.lease.lost.set()
            return StopReason.LEASE_LOST
        if row.cancel_requested:
            return StopReason.CANCELLED
        if time.monotonic() - self.started > self.time_limit.seconds:
            return StopReason.TIME_LIMIT
        return None

    def should_stop(self) -> bool:
        self.stop_reason = self._why_stop()
        return self.stop_reason is not None

    def should_preempt(self) -> bool:
        return self.ctx.draining.is_set()

    @property
    def trained_seconds(self) -> float:
        return time.monotonic() - self.started

    def resume_point(self) -> engine.Checkpoint | None:
        """The job's last checkpoint, if a previous attempt left one; noted on the job."""
        try:
            stored = self.ctx.store.load_checkpoint(self.job_id)
        except StoreIntegrityError as exc:  # damaged: training from it would bake the damage in
            self.ctx.store.delete_checkpoint(self.job_id)
            self.note(f"{exc.detail}; started over")
            return None
        if stored is None:
            return None
        tensors, meta = stored
        checkpoint = engine.Checkpoint(int(meta["epoch"]), tensors, meta["engine"])
        # The live curve (loss plots, event streams) goes on from the epochs already done.
        self.reports = [engine.EpochReport(e, t, v, m) for e, t, v, m in checkpoint.meta.get("history", [])]
        self.started -= float(meta.get("trained_seconds", 0.0))  # the time limit spans attempts
        self.note(f"resumed from epoch {checkpoint.epoch} on attempt {self.lease.attempt}")
        return checkpoint

    def save_checkpoint(self, checkpoint: engine.Checkpoint) -> None:
        """Publish a checkpoint, only while this worker still owns the job (fenced like every write)."""
        meta = {"epoch": checkpoint.epoch, "engine": checkpoint.meta, "trained_seconds": self.trained_seconds}
        with self.ctx.sessions.begin() as session:

            def still_owned() -> bool:
                return self.lease.update(session, checkpoint_epoch=checkpoint.epoch)

            self.ctx.store.save_checkpoint(self.job_id, checkpoint.tensors, meta, publish_if=still_owned)

    def note(self, note: str) -> None:
        with self.ctx.sessions.begin() as session:
            notes = session.scalar(select(JobRecord.notes).where(JobRecord.id == self.job_id))
            self.lease.update(session, notes=with_note(notes, note))

    def finish(self, status: str, **values: Any) -> bool:
        """End the job (fenced by the lease): False if this worker no longer owns it."""
        now = utcnow()
        with self.ctx.sessions.begin() as session:
            return self.lease.update(session, status=status, finished_at=now, lease_expires_at=None, **values)

    def hand_back(self, note: str) -> None:
        """Put the job back on the queue without spending an attempt (this worker is stopping)."""
        with self.ctx.sessions.begin() as session:
            notes = session.scalar(select(JobRecord.notes).where(JobRecord.id == self.job_id))
            released = self.lease.update(
                session,
                status=QUEUED,
                worker=None,
                lease_expires_at=None,
                attempts=JobRecord.attempts - 1,
                notes=with_note(notes, note),
            )
        if released:
            self.ctx.queue.enqueue(self.job_id)
        else:  # lost the job meanwhile: its checkpoint is the next owner's now
            log.warning("job %s: could not hand it back, the lease was lost", self.job_id)


def _thin(history: list[engine.EpochReport]) -> list[list[Any]]:
    step = max(1, -(-len(history) // _HISTORY_POINTS))
    kept = history[::step]
    if history and kept[-1] is not history[-1]:
        kept.append(history[-1])
    return [[r.epoch, r.train_loss, r.val_loss] for r in kept]


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


def _claim(ctx: WorkerContext, job_id: str) -> tuple[JobRecord, DatasetRecord | None] | None:
    """queued -> running for this worker, one more attempt, a fresh lease; None if not queued."""
    now = utcnow()
    with ctx.sessions.begin() as session:
        claimed = rows_changed(
            session,
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.status == QUEUED)
            .values(
                status=RUNNING,
                started_at=func.coalesce(JobRecord.started_at, now),
                attempts=JobRecord.attempts + 1,
                worker=ctx.name,
                lease_expires_at=now + timedelta(seconds=ctx.settings.lease_seconds),
                heartbeat_at=now,
                updated_at=now,
            ),
        )
        if not claimed:
            return None
        job = session.get(JobRecord, job_id)
        assert job is not None
        dataset = session.get(DatasetRecord, job.dataset_id) if job.dataset_id else None
    return job, dataset


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Claim a queued job, train it, save the model; every outcome lands in the job row,
    unless this worker lost its lease, in which case it writes nothing at all."""
    claim = _claim(ctx, job_id)
    if claim is None:
        log.info("job %s is not queued any more; skipping", job_id)
        return
    job, dataset = claim
    spec_limit = job.spec.get("max_seconds")
    if spec_limit is not None and spec_limit < ctx.settings.max_job_seconds:
        limit = TimeLimit(spec_limit, f"the spec's max_seconds of {spec_limit:g} seconds")
    else:
        limit = TimeLimit(ctx.settings.max_job_seconds, "TRAINSERVE_MAX_JOB_SECONDS")
    attempt = _Attempt(ctx, job, time_limit=limit)
    attempt.lease.start()
    try:
        _run_claimed(ctx, attempt, job, dataset)
    finally:
        attempt.lease.stop()


def _run_claimed(ctx: WorkerContext, attempt: _Attempt, job: JobRecord, dataset: DatasetRecord | None) -> None:
    try:
        if dataset is None:
            raise InvalidInput("the job's dataset was deleted before the job ran")
        spec = TrainSpec.model_validate(job.spec)
        table = ctx.store.load_dataset(dataset.id, dataset.file_sha256)
        plan = plan_training(spec, table.schema(), limits_of(ctx.settings))
        x, y = table.matrix(plan.features), _targets(table, plan)
        result = _train(ctx, attempt, spec, plan, x, y)
    except engine.TrainingPreempted as preempted:
        attempt.hand_back(
            f"attempt {attempt.lease.attempt}: worker {ctx.name} stopped; handed back at epoch "
            f"{preempted.checkpoint.epoch} with a checkpoint"
        )
        return
    except engine.TrainingCancelled:
        _stopped(ctx, attempt)
        return
    except (TrainserveError, engine.DeviceUnavailable, FloatingPointError) as exc:
        _end_attempt(ctx, attempt, FAILED, error=str(exc))
        return
    except Exception as exc:  # a worker must record every failure, not die on it
        log.exception("job %s failed", job.id)
        _end_attempt(ctx, attempt, FAILED, error=f"{type(exc).__name__}: {exc}")
        return
    # Beside the save, not before it: the job's end should not wait for a C compiler.
    threading.Thread(
        target=native.warm_rowwise, args=(spec.model, plan.in_features, plan.task), name="warm-rowwise", daemon=True
    ).start()
    try:
        _save(ctx, attempt, dataset, spec, plan, result)
    except Exception as exc:
        log.exception("job %s: saving the model failed", job.id)
        _end_attempt(ctx, attempt, FAILED, error=f"saving the model failed: {type(exc).__name__}: {exc}")
    else:
        ctx.store.delete_checkpoint(job.id)


def _train(
    ctx: WorkerContext, attempt: _Attempt, spec: TrainSpec, plan: TrainingPlan, x: np.ndarray, y: np.ndarray
) -> engine.TrainedModel:
    """Train, resuming from the job's checkpoint when an earlier attempt left one."""
    spec = on_this_worker(spec, ctx.settings)
    resume = attempt.resume_point()
    options: dict[str, Any] = {
        "on_epoch": attempt.on_epoch,
        "should_stop": attempt.should_stop,
        "check_every_s": ctx.settings.progress_interval_s,
        "on_checkpoint": attempt.save_checkpoint,
        "checkpoint_every_s": ctx.settings.checkpoint_seconds,
        "should_preempt": attempt.should_preempt,
    }
    try:
        return engine.train(spec, plan, x, y, resume=resume, **options)
    except engine.CheckpointMismatch:  # taken for another spec or dataset shape: not ours to use
        ctx.store.delete_checkpoint(attempt.job_id)
        attempt.note("the checkpoint did not match this job; started over")
        return engine.train(spec, plan, x, y, **options)


def _end_attempt(ctx: WorkerContext, attempt: _Attempt, status: str, **values: Any) -> None:
    """End the job; its checkpoint goes too, unless the job belongs to another worker now."""
    if attempt.finish(status, **values):
        ctx.store.delete_checkpoint(attempt.job_id)


def _stopped(ctx: WorkerContext, attempt: _Attempt) -> None:
    reason = attempt.stop_reason
    if reason is StopReason.CANCELLED:
        _end_attempt(ctx, attempt, CANCELLED, error="cancelled while running")
    elif reason is StopReason.TIME_LIMIT:
        _end_attempt(
            ctx,
            attempt,
            FAILED,
            error=f"the job trained longer than its limit of {attempt.time_limit.seconds:g} seconds "
            f"({attempt.time_limit.source})",
        )
    else:  # the lease is lost: the job belongs to the rescuer or another worker now
        log.warning("job %s: stopped after losing the lease; nothing written", attempt.job_id)


def _save(
    ctx: WorkerContext,
    attempt: _Attempt,
    dataset: DatasetRecord,
    spec: TrainSpec,
    plan: TrainingPlan,
    result: engine.TrainedModel,
) -> None:
    job_id = attempt.job_id
    model_id = new_id()
    metadata = {"trainserve_model_id": model_id, "job_id": job_id, "spec": json.dumps(spec.model_dump(mode="json"))}
    weights_sha256, weights_bytes = ctx.store.save_weights(model_id, result.module.state_dict(), metadata)
    last = result.history[-1]
    now = utcnow()
    job_values = {
        "status": SUCCEEDED,
        "model_id": model_id,
        "epoch": last.epoch,
        "train_loss": last.train_loss,
        "val_loss": last.val_loss,
        "val_metrics": last.val_metrics,
        "history": _thin(result.history),
        "device": result.device,
        "finished_at": now,
        "updated_at": now,
    }
    # Lineage: which data, which spec, which code made this model.
    model_values = {
        "id": model_id,
        "name": spec.name,
        "job_id": job_id,
        "dataset_id": dataset.id,
        "dataset_sha256": dataset.sha256,
        "spec": spec.model_dump(mode="json"),
        "task": plan.task,
        "features": plan.features,
        "targets": plan.targets,
        "classes": plan.classes,
        "input_mean": result.input_mean,
        "input_std": result.input_std,
        "metrics": result.metrics,
        "n_parameters": plan.n_parameters,
        "weights_sha256": weights_sha256,
        "weights_bytes": weights_bytes,
        "torch_version": torch.__version__,
        "code_version": f"trainserve {service.__version__}",
        "device": result.device,
        "train_seconds": result.train_seconds,
    }
    try:
        # Two workers finishing jobs under one name at once may both pick the same next
        # version; the unique (name, version) constraint refuses the second, which retries.
        for try_number in range(_VERSION_ATTEMPTS):
            try:
                finished = _record_success(ctx, attempt, job_values, model_values, result.notes)
                break
            except IntegrityError:
                if spec.name is None or try_number == _VERSION_ATTEMPTS - 1:
                    raise
                log.info("job %s: a concurrent job took the version of %r; retrying", job_id, spec.name)
    except BaseException:
        ctx.store.delete_weights(model_id)
        raise
    if not finished:  # cancelled in the last instant, or the lease is gone: keep no model
        ctx.store.delete_weights(model_id)
        _end_attempt(ctx, attempt, CANCELLED, error="cancelled while running")  # fenced: a lost lease writes nothing


_VERSION_ATTEMPTS = 5


def next_version(session: Session, name: str) -> int:
    """The version the next model saved under ``name`` gets: 1 for a new name."""
    latest = session.scalar(select(func.max(ModelRecord.version)).where(ModelRecord.name == name))
    return (latest or 0) + 1


def _record_success(
    ctx: WorkerContext,
    attempt: _Attempt,
    job_values: dict[str, Any],
    model_values: dict[str, Any],
    notes: list[str],
) -> int:
    """Mark the job succeeded and add its model row in one transaction, fenced by the
    lease; 0 if it was cancelled or this worker no longer owns it."""
    with ctx.sessions.begin() as session:
        previous_notes = session.scalar(select(JobRecord.notes).where(JobRecord.id == attempt.job_id)) or []
        # The job row is written first: on SQLite that takes the write lock, so the version
        # read below already sees every other worker's committed models.
        finished = rows_changed(
            session,
            update(JobRecord)
            .where(*attempt.lease.owned(), JobRecord.cancel_requested.is_(False))
            .values(**job_values, notes=[*previous_notes, *notes], lease_expires_at=None),
        )
        if finished:
            name = model_values["name"]
            version = next_version(session, name) if name is not None else None
            session.add(ModelRecord(**model_values, version=version, notes=notes))
            session.flush()  # a taken (name, version) fails here, inside the retry loop
    return finished
