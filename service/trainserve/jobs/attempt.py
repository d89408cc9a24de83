"""One claim of a job by a worker: the lease that fences every write it makes for the job,
its progress, checkpoints and notes, and why it should stop.

A worker claims a job with one compare-and-set (``trainserve.jobs.worker``); from then on each
write goes through ``Lease.update``, conditioned on the job still being running, on this
worker and on this attempt, so that once the rescuer (``trainserve.jobs.rescuer``) has given the job
to another worker, the old one changes nothing.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, sessionmaker

from trainserve.config import Settings
from trainserve.db import JobRecord, make_engine, make_session_factory, rows_changed, utcnow
from trainserve.errors import ChecksumMismatch
from trainserve.jobs.lifecycle import with_note
from trainserve.jobs.queue import JobQueue, worker_name
from trainserve.jobs.status import JobStatus
from trainserve.storage.base import Store
from trainserve.storage.factory import open_store
from trainserve.training import loop, threads

if TYPE_CHECKING:
    from trainserve.sweeps.study import Pruning
    from trainserve.sweeps.trials import TrialPruned

log = logging.getLogger(__name__)

_HISTORY_POINTS = 1000


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
        # From now on, so that a job starting reads the cores free at once (threads.choose).
        threads.keep_sampling()
        loop.warm_up()
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
            JobRecord.status == JobStatus.RUNNING,
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


class Attempt:
    """One claim of a job by this worker: its lease, progress writes, and why it should stop."""

    def __init__(self, ctx: WorkerContext, job: JobRecord, *, time_limit: TimeLimit) -> None:
        self.ctx, self.job_id, self.time_limit = ctx, job.id, time_limit
        self.lease = Lease(ctx.sessions, job.id, ctx.name, job.attempts, ctx.settings.lease_seconds)
        self.interval = ctx.settings.progress_interval_s
        self.last_write = 0.0
        self.reports: list[loop.EpochReport] = []
        self.started = time.monotonic()  # moved back by the training time a checkpoint carries
        self.stop_reason: StopReason | None = None
        # A sweep's trial reports each epoch's objective to the sweep's pruner (trainserve.sweeps).
        self.pruning: Pruning | None = None
        self.pruned: TrialPruned | None = None

    def on_epoch(self, report: loop.EpochReport) -> None:
        self.reports.append(report)
        if self.pruning is not None:  # raises TrialPruned when the pruner stops this trial
            self._report_to_pruner(report)
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
                history=thin_history(self.reports),
            )

    def _report_to_pruner(self, report: loop.EpochReport) -> None:
        assert self.pruning is not None
        value = self.pruning.value_of(report.epoch, report.train_loss, report.val_loss, report.val_metrics)
        self.pruning.report(report.epoch, value)

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

    def resume_point(self) -> loop.Checkpoint | None:
        """The job's last checkpoint, if a previous attempt left one; noted on the job."""
        try:
            stored = self.ctx.store.load_checkpoint(self.job_id)
        except ChecksumMismatch as exc:  # damaged: training from it would bake the damage in
            self.ctx.store.delete_checkpoint(self.job_id)
            self.note(f"{exc.detail}; started over")
            return None
        if stored is None:
            return None
        tensors, meta = stored
        checkpoint = loop.Checkpoint(int(meta["epoch"]), tensors, meta["engine"])
        # The live curve (loss plots, event streams) goes on from the epochs already done.
        self.reports = [loop.EpochReport(e, t, v, m) for e, t, v, m in checkpoint.meta.get("history", [])]
        if self.pruning is not None:  # the epochs before the checkpoint count for the pruner too
            for earlier in self.reports:
                value = self.pruning.value_of(earlier.epoch, earlier.train_loss, earlier.val_loss, earlier.val_metrics)
                if value is not None:
                    self.pruning.values.append((earlier.epoch, value))
        self.started -= float(meta.get("trained_seconds", 0.0))  # the time limit spans attempts
        self.note(f"resumed from epoch {checkpoint.epoch} on attempt {self.lease.attempt}")
        return checkpoint

    def save_checkpoint(self, checkpoint: loop.Checkpoint) -> None:
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

    def finish(self, status: JobStatus, **values: Any) -> bool:
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
                status=JobStatus.QUEUED,
                worker=None,
                lease_expires_at=None,
                attempts=JobRecord.attempts - 1,
                notes=with_note(notes, note),
            )
        if released:
            self.ctx.queue.enqueue(self.job_id)
        else:  # lost the job meanwhile: its checkpoint is the next owner's now
            log.warning("job %s: could not hand it back, the lease was lost", self.job_id)


def thin_history(history: list[loop.EpochReport]) -> list[list[Any]]:
    step = max(1, -(-len(history) // _HISTORY_POINTS))
    kept = history[::step]
    if history and kept[-1] is not history[-1]:
        kept.append(history[-1])
    return [[r.epoch, r.train_loss, r.val_loss] for r in kept]
