"""GET /workers: the worker processes and the devices they train on."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.api.schemas import Worker
from trainserve.db import utcnow
from trainserve.jobs import workers

router = APIRouter(tags=["workers"])


@router.get("/workers")
def list_workers(session: SessionDep, runtime: RuntimeDep) -> list[Worker]:
    """Every worker seen in the last day, oldest first; ``live`` ones have renewed their row
    within three rescue intervals. POST /train refuses a device no live worker has."""
    since = utcnow() - timedelta(seconds=workers.stale_after_s(runtime.settings))
    listed = [Worker.model_validate(row) for row in workers.list_workers(session)]
    return [worker.model_copy(update={"live": worker.heartbeat_at >= since}) for worker in listed]
