"""Figures about jobs and models, read from the database when asked (for ``/metrics``).

The database is the truth that every API process and every worker shares, so these are
the same whichever process answers a scrape; counters kept in one process's memory would
only see that process's share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from trainserve.db import DatasetRecord, JobRecord, ModelRecord, utcnow
from trainserve.jobs.status import JobStatus


def jobs_by_status(*, session: Session) -> dict[JobStatus, int]:
    """How many jobs are in each status; every status is present, zero included."""
    counts = dict.fromkeys(JobStatus, 0)
    for status, count in session.execute(select(JobRecord.status, func.count()).group_by(JobRecord.status)):
        counts[status] = count
    return counts


def oldest_queued_age_s(*, session: Session, now: datetime | None = None) -> float:
    """Seconds the longest-waiting queued job has waited (0 when none waits)."""
    oldest = session.scalar(select(func.min(JobRecord.created_at)).where(JobRecord.status == JobStatus.QUEUED))
    if oldest is None:
        return 0.0
    if oldest.tzinfo is None:  # SQLite hands timestamps back without a zone; they were written in UTC
        oldest = oldest.replace(tzinfo=UTC)
    return max(0.0, ((now or utcnow()) - oldest).total_seconds())


def model_count(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ModelRecord)) or 0


@dataclass(frozen=True)
class Throughput:
    """Training work done by recent successful jobs, and the time the engine spent on it."""

    jobs: int
    epochs: int
    samples: int  # training rows x epochs: how many examples went through forward and backward
    train_seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def epochs_per_second(self) -> float:
        return self.epochs / self.train_seconds if self.train_seconds > 0 else 0.0


def recent_throughput(*, session: Session, last: int = 50) -> Throughput:
    """Throughput of the ``last`` most recently finished successful jobs whose model and
    dataset still exist (a deleted dataset leaves no row count to measure by)."""
    rows = session.execute(
        select(JobRecord.epoch, JobRecord.spec, DatasetRecord.n_rows, ModelRecord.train_seconds)
        .join(ModelRecord, ModelRecord.id == JobRecord.model_id)
        .join(DatasetRecord, DatasetRecord.id == JobRecord.dataset_id)
        .where(JobRecord.status == JobStatus.SUCCEEDED)
        .order_by(JobRecord.finished_at.desc())
        .limit(last)
    ).all()
    jobs = epochs = samples = 0
    seconds = 0.0
    for epoch, spec, n_rows, train_seconds in rows:
        # The rows the engine trains on: what loop.split_indices leaves after validation.
        training_rows = n_rows - math.floor(n_rows * float(spec.get("validation_split") or 0.0))
        jobs += 1
        epochs += epoch
        samples += training_rows * epoch
        seconds += train_seconds
    return Throughput(jobs, epochs, samples, seconds)
