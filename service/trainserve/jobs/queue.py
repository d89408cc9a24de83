"""The job queue: Huey over SQLite (embedded), Redis or PostgreSQL, carrying job ids only.

The ``jobs`` table is the truth for a job's state; an entry on the queue only tells a
worker which job to claim (``trainserve.jobs.worker``). Every process builds the queue; only
a worker passes the function that runs an entry.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from huey import Huey, PostgresHuey, RedisHuey, SqliteHuey

from trainserve.config import Settings

# An entry names its task by module and name. This module used to be ``service.jobs``:
# the task keeps that identity, so entries queued by any earlier version still run (an
# unknown name would also break ``Huey.pending()``, which the rescuer reads).
_TASK_MODULE = "service.jobs"
_TASK_NAME = "trainserve.train"


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
    ``trainserve.jobs.worker``); any other process only enqueues."""
    huey = huey_for(settings.resolved_queue_url, settings.queue_name)

    # Registered in every process, so that entries queued by an API node are the worker's to run.
    def train_task(job_id: str) -> None:
        if run is None:
            raise RuntimeError("this process only enqueues training jobs; `trainserve worker` runs them")
        run(job_id)

    train_task.__module__ = _TASK_MODULE
    return JobQueue(huey, huey.task(name=_TASK_NAME)(train_task))


def worker_name(pid: int) -> str:
    """How a job row records the worker process that runs it."""
    return f"{socket.gethostname()}:{pid}"
