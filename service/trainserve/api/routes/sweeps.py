"""Sweeps over HTTP: a thin shell over ``trainserve.sweeps.driver``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.api.errors import invalid_spec
from trainserve.api.routes.datasets import create_from_upload
from trainserve.api.runtime import Runtime
from trainserve.api.schemas import Comparison, Model, NameRequest, Sweep, SweepDetail
from trainserve.api.uploads import ReceivedFile, receive_form
from trainserve.datasets import catalog as datasets
from trainserve.errors import InvalidInput, UnsupportedMediaType
from trainserve.serving.compare import compare
from trainserve.sweeps import driver
from trainserve.sweeps.space import SweepRequest
from trainserve.training.spec import TrainSpec

router = APIRouter(tags=["sweeps"])

POLL_S = 0.5
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "status, trial and end events"}
}
_SWEEP_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SweepRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "sweep"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "CSV or .npz"},
                        "sweep": {"type": "string", "description": "The sweep as JSON, its base without dataset_id"},
                    },
                }
            },
        },
    }
}


def _parse(raw: str | bytes, prefix: list[str | int]) -> tuple[SweepRequest, TrainSpec]:
    try:
        request = SweepRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_spec(exc, prefix) from None
    try:
        base = TrainSpec.model_validate(request.base)
    except ValidationError as exc:
        raise invalid_spec(exc, [*prefix, "base"]) from None
    return request, base


def _submit(
    session: Session, runtime: Runtime, request: SweepRequest, base: TrainSpec, upload: ReceivedFile | None
) -> dict[str, Any]:
    if upload is not None:
        if base.dataset_id is not None:
            raise InvalidInput(
                "send either a file or a dataset_id, not both", errors=[{"loc": ["sweep", "base", "dataset_id"]}]
            )
        dataset = create_from_upload(session, runtime, upload)
    elif base.dataset_id is None:
        raise InvalidInput(
            "base.dataset_id is required (or upload the file in a multipart request)",
            errors=[{"loc": ["body", "base", "dataset_id"], "msg": "field required"}],
        )
    else:
        dataset = datasets.get(session=session, dataset_id=base.dataset_id)
    sweep = driver.submit(session, runtime.queue, runtime.settings, request, base, dataset)
    return driver.describe(session, sweep, with_trials=True)


@router.post("/sweeps", status_code=202, response_model=SweepDetail, openapi_extra=_SWEEP_BODY)
async def create_sweep(request: Request, session: SessionDep, runtime: RuntimeDep, response: Response) -> Any:
    """Start a sweep: JSON, or multipart ``file`` + ``sweep``. Its first ``parallel`` trials are queued at once."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        limit = runtime.settings.max_upload_bytes
        async with receive_form(request, runtime.store, max_file_bytes=limit, text_fields=frozenset({"sweep"})) as form:
            raw = form.fields.get("sweep")
            if raw is None or form.file is None:
                field = "sweep" if raw is None else "file"
                raise InvalidInput(
                    f"the multipart form needs a {field!r} field",
                    errors=[{"loc": ["body", field], "msg": "field required"}],
                )
            sweep_request, base = _parse(raw, ["sweep"])
            body = await run_in_threadpool(_submit, session, runtime, sweep_request, base, form.file)
    elif content_type.startswith("application/json") or not content_type:
        sweep_request, base = _parse(await request.body(), ["body"])
        body = await run_in_threadpool(_submit, session, runtime, sweep_request, base, None)
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}: send application/json or multipart/form-data"
        )
    response.headers["Location"] = f"/sweeps/{body['id']}"
    return body


@router.get("/sweeps", response_model=list[Sweep])
def list_sweeps(
    session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**62)
) -> Any:
    """Newest first."""
    return [
        driver.describe(session, s, with_trials=False) for s in driver.list_sweeps(session, limit=limit, offset=offset)
    ]


@router.get("/sweeps/{sweep_id}", response_model=SweepDetail)
def get_sweep(sweep_id: str, session: SessionDep) -> Any:
    """The sweep, every trial (job, parameters, state, objective value, epochs run, pruned-at) and the best."""
    return driver.describe(session, driver.get_sweep(session, sweep_id), with_trials=True)


@router.post("/sweeps/{sweep_id}/cancel", response_model=SweepDetail)
def cancel_sweep(sweep_id: str, session: SessionDep, runtime: RuntimeDep) -> Any:
    """No more trials: queued ones are cancelled at once, running ones stop within a second or two."""
    sweep = driver.cancel(session, runtime.store, sweep_id)
    return driver.describe(session, sweep, with_trials=True)


@router.get("/sweeps/{sweep_id}/compare", response_model=Comparison)
def compare_trials(sweep_id: str, session: SessionDep) -> Any:
    """The sweep's trials that produced a model, compared as ``GET /models/compare`` does."""
    detail = driver.describe(session, driver.get_sweep(session, sweep_id), with_trials=True)
    ids = [t["model_id"] for t in detail["trials"] if t["model_id"]]
    return compare(session, ids, at_least=0)


@router.post("/sweeps/{sweep_id}/best/name", response_model=Model)
def name_best(sweep_id: str, body: NameRequest, session: SessionDep) -> Any:
    """Give the best trial's model a name: it becomes that name's next version."""
    return driver.name_best(session, sweep_id, body.name)


def _read(runtime: Runtime, sweep_id: str) -> dict[str, Any]:
    with runtime.sessions() as session:
        return driver.describe(session, driver.get_sweep(session, sweep_id), with_trials=True)


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _stream(request: Request, runtime: Runtime, sweep_id: str, first: dict[str, Any]) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n\n"
    current, status = first, None
    seen: dict[int, tuple[str, int | None]] = {}
    while True:
        if current["status"] != status:
            status = current["status"]
            yield _event("status", {k: current[k] for k in ("id", "status", "n_trials", "counts")})
        for trial in current["trials"]:
            key = (trial["state"], trial["epochs_run"] if trial["state"] == "running" else None)
            if seen.get(trial["number"]) != key:
                seen[trial["number"]] = key
                yield _event("trial", trial)
        if status != "running" and all(t["state"] not in ("queued", "running") for t in current["trials"]):
            yield _event("end", {k: current[k] for k in ("id", "status", "n_trials", "counts", "best")})
            return
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            return
        current = await run_in_threadpool(_read, runtime, sweep_id)


@router.get("/sweeps/{sweep_id}/events", response_class=StreamingResponse, responses=_SSE)
async def sweep_events(sweep_id: str, request: Request, runtime: RuntimeDep) -> StreamingResponse:
    """Server-Sent Events: ``status`` (first and on each change), ``trial`` (a trial's state
    or progress changed), ``end`` (with the best trial; then the stream closes)."""
    first = await run_in_threadpool(_read, runtime, sweep_id)  # NotFound before any byte is streamed
    return StreamingResponse(
        _stream(request, runtime, sweep_id, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
