"""Which workers are alive and which devices they train on: one ``workers`` row per worker
process, written when it starts, renewed by its rescuer thread, deleted when it stops.

The API reads these rows to refuse at submit a job for a device no live worker has (a
``cuda`` spec on a CPU-only service used to be accepted, then fail on the worker).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from trainserve.config import Settings
from trainserve.db import WorkerRecord, rows_changed, utcnow
from trainserve.errors import Conflict

log = logging.getLogger(__name__)

# A row whose worker has not renewed it for this long is deleted by the next worker's beat:
# its process is gone (a restart gets a new pid, hence a new row).
FORGET_AFTER = timedelta(days=1)


def stale_after_s(settings: Settings) -> float:
    """A worker is live while its row was renewed this recently: three rescuer rounds, so one
    slow round (a busy database, a loaded machine) does not make it vanish."""
    return 3 * settings.rescue_interval_seconds


def devices_here() -> list[str]:
    """The devices this process can train on: the CPU, each visible CUDA device, MPS."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


class WorkerPresence:
    """This worker's row: ``announce`` at start, ``beat`` each rescuer round, ``leave`` at exit."""

    def __init__(self, sessions: sessionmaker, name: str, devices: list[str]) -> None:  # type: ignore[type-arg]
        self.sessions, self.name, self.devices = sessions, name, devices

    def announce(self) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            session.merge(WorkerRecord(name=self.name, devices=self.devices, heartbeat_at=now, started_at=now))
        log.info("worker %s trains on %s", self.name, ", ".join(self.devices))

    def beat(self) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            renewed = rows_changed(
                session, update(WorkerRecord).where(WorkerRecord.name == self.name).values(heartbeat_at=now)
            )
            session.execute(delete(WorkerRecord).where(WorkerRecord.heartbeat_at < now - FORGET_AFTER))
        if not renewed:  # deleted meanwhile (by hand, or after a long pause): say so again
            self.announce()

    def leave(self) -> None:
        with self.sessions.begin() as session:
            session.execute(delete(WorkerRecord).where(WorkerRecord.name == self.name))


def list_workers(session: Session) -> list[WorkerRecord]:
    return list(session.scalars(select(WorkerRecord).order_by(WorkerRecord.started_at, WorkerRecord.name)))


def live_workers(session: Session, stale_s: float) -> list[WorkerRecord]:
    since = utcnow() - timedelta(seconds=stale_s)
    return list(
        session.scalars(select(WorkerRecord).where(WorkerRecord.heartbeat_at >= since).order_by(WorkerRecord.name))
    )


def _serves(device: str, have: str) -> bool:
    return device == have or (device == "cuda" and have.startswith("cuda:"))


def check_device(session: Session, device: str, *, stale_s: float) -> str | None:
    """Whether a job asking for ``device`` can run: None if a live worker has it (or it is
    ``auto`` or ``cpu``, which every worker runs); a note for the job if no worker is live
    (it waits for one); Conflict, naming the devices the live workers have, if none of them has it."""
    if device in ("auto", "cpu"):
        return None
    live = live_workers(session, stale_s)
    if not live:
        return f"no live worker has been seen: the job waits for a worker that has device {device!r}"
    have = sorted({each for worker in live for each in worker.devices})
    if any(_serves(device, each) for each in have):
        return None
    msg = (
        f"no live worker has device {device!r}; the live workers have {', '.join(have)}: "
        "ask for one of those or 'auto', or start a worker where that device is"
    )
    raise Conflict(msg, errors=[{"loc": ["body", "device"], "msg": msg}])
