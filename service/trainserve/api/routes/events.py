"""GET /jobs/{id}/events: a job's progress as Server-Sent Events, ending when the job ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from trainserve.api.deps import RuntimeDep
from trainserve.api.runtime import Runtime
from trainserve.jobs import events

router = APIRouter(tags=["jobs"])

# How often the stream looks at the job's row; a worker writes it every progress interval.
POLL_S = 0.25
# A comment line this often keeps proxies and clients from timing an idle stream out.
KEEPALIVE_S = 15.0
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "status, epoch and end events"}
}


def _read(runtime: Runtime, job_id: str) -> events.Snapshot:
    with runtime.sessions() as session:
        return events.snapshot(session, job_id)


async def _stream(
    request: Request, runtime: Runtime, job_id: str, first: events.Snapshot, tracker: events.JobEventTracker
) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n\n"  # reconnect after a second, sending Last-Event-ID
    current = first
    quiet_since = time.monotonic()
    while True:
        for event in tracker.events(current):
            yield event.encode()
            quiet_since = time.monotonic()
        if current.ended:
            return
        if time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            return
        current = await run_in_threadpool(_read, runtime, job_id)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses=_SSE)
async def job_events(
    job_id: str,
    request: Request,
    runtime: RuntimeDep,
    last_event_id: Annotated[str | None, Header(description="Resume after this epoch")] = None,
) -> StreamingResponse:
    """Server-Sent Events: ``status`` (first and on each change), ``epoch`` (losses and
    validation metrics, one per epoch; sampled for very long runs), ``end`` (then the
    stream closes). Each event's id is the last epoch sent: reconnecting with
    ``Last-Event-ID`` resumes after it. An unknown job is a plain 404."""
    first = await run_in_threadpool(_read, runtime, job_id)  # NotFound before any byte is streamed
    tracker = events.JobEventTracker(events.parse_last_event_id(last_event_id))
    return StreamingResponse(
        _stream(request, runtime, job_id, first, tracker),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
