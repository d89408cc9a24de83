"""The job queue: Huey over SQLite (embedded), Redis or PostgreSQL, carrying job ids only.

The ``jobs`` table is the truth for a job's state; an entry on the queue only tells a
worker which job to claim (``trainserve.jobs.worker``). Every process builds the queue; only
a worker passes the function that runs an entry.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from trainserve.config import Settings

if TYPE_CHECKING:
    from huey import Huey

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


# The drivers huey.storage imports at its own import whenever they are installed, and the
# queue URL schemes that use each.
_DRIVERS = {"redis": ("redis", "rediss", "unix"), "psycopg": ("postgresql", "postgres")}


def import_huey(url: str) -> None:
    """Import Huey without the queue drivers that the queue at ``url`` does not use.

    huey.storage imports redis and psycopg if they are installed, used or not: 100 ms of
    CPU, a tenth of `trainserve serve`'s start beyond a bare app (bench/start.py), in every
    process whose queue is a SQLite file. Python refuses an import whose ``sys.modules``
    entry is None, so Huey takes such a driver for missing (its storage classes for it are
    then unusable in this process); the entries are removed at once, so that anything else
    (SQLAlchemy's psycopg dialect for a PostgreSQL database) imports the driver as usual.

    Only for a process whose queue URL is fixed for its life (the CLI's service commands):
    it does nothing once Huey is imported.
    """
    if "huey" in sys.modules:
        return
    scheme = urlparse(url).scheme.split("+")[0]
    hidden = [m for m, schemes in _DRIVERS.items() if scheme not in schemes and m not in sys.modules]
    for module in hidden:
        sys.modules[module] = None  # type: ignore[assignment]
    try:
        import huey  # noqa: F401 (a static import: the package imports nothing by a computed name)
    finally:
        for module in hidden:
            if sys.modules.get(module, "") is None:
                del sys.modules[module]


def huey_for(url: str, name: str) -> Huey:
    """The Huey instance a queue URL names: a SQLite file (embedded), Redis or Postgres (shared)."""
    from huey import PostgresHuey, RedisHuey, SqliteHuey

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
