"""A job's status: one enum for the table, the API's schemas, the routes, the client and
the metrics. Values are the strings stored in the ``jobs`` table and sent over HTTP."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"  # a sweep's trial its pruner stopped early (trainserve.sweeps)

    @property
    def ended(self) -> bool:
        return self in ENDED


ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
ENDED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED})
