"""A job's progress as a stream of events (served as Server-Sent Events).

The jobs table is the truth, so events are derived from successive snapshots of a job's
row: no broker, and every API process can stream any job, whichever worker runs it.

    status   {"status", "epoch", "epochs", "model_id", "error"}   first, then on each change
    epoch    {"epoch", "epochs", "train_loss", "val_loss"[, "val_metrics"]}   one per epoch
             (long runs: one per point of the job's thinned history)
    end      {"status", "model_id", "error", "epoch", "epochs"}   last; the stream closes

Every event's id is the last epoch sent, so a client that reconnects with
``Last-Event-ID: N`` gets the current status, then epochs after N only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from trainserve.jobs.lifecycle import get_job
from trainserve.jobs.status import ACTIVE, JobStatus


@dataclass(frozen=True)
class Snapshot:
    status: JobStatus
    epoch: int
    epochs: int
    model_id: str | None
    error: str | None
    val_metrics: dict[str, Any] | None
    history: list[list[Any]]

    @property
    def ended(self) -> bool:
        return self.status not in ACTIVE


@dataclass(frozen=True)
class Event:
    name: str
    id: int
    data: dict[str, Any]

    def encode(self) -> bytes:
        """The event in SSE wire format (one ``data:`` line: JSON never holds a raw newline)."""
        return f"event: {self.name}\nid: {self.id}\ndata: {json.dumps(self.data)}\n\n".encode()


def snapshot(session: Session, job_id: str) -> Snapshot:
    """Read the job's row; NotFound if there is none."""
    job = get_job(session, job_id)
    return Snapshot(job.status, job.epoch, job.epochs, job.model_id, job.error, job.val_metrics, list(job.history))


def parse_last_event_id(value: str | None) -> int:
    """The epoch a reconnecting client had reached; 0 (from the start) for anything else."""
    if value is None or not value.strip().isdigit() or len(value.strip()) > 12:
        return 0
    return int(value)


class JobEventTracker:
    """Turns a job's successive snapshots into the events a client has not seen yet."""

    def __init__(self, last_epoch: int = 0) -> None:
        self.last_epoch = last_epoch
        self.status: JobStatus | None = None

    def events(self, current: Snapshot) -> list[Event]:
        changed = current.status != self.status
        self.status = current.status
        # A job that starts reports its status before its epochs; one that ended, after them.
        out = [self._status(current)] if changed and not current.ended else []
        for epoch, train_loss, val_loss in current.history:
            if epoch > self.last_epoch:
                self.last_epoch = epoch
                data: dict[str, Any] = {
                    "epoch": epoch,
                    "epochs": current.epochs,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                }
                if epoch == current.epoch and current.val_metrics is not None:
                    data["val_metrics"] = current.val_metrics
                out.append(Event("epoch", epoch, data))
        if current.ended:
            if changed:
                out.append(self._status(current))
            end: dict[str, Any] = {"status": current.status, "model_id": current.model_id, "error": current.error}
            end |= {"epoch": current.epoch, "epochs": current.epochs}
            out.append(Event("end", self.last_epoch, end))
        return out

    def _status(self, current: Snapshot) -> Event:
        data: dict[str, Any] = {"status": current.status, "model_id": current.model_id, "error": current.error}
        data |= {"epoch": current.epoch, "epochs": current.epochs}
        return Event("status", self.last_epoch, data)
