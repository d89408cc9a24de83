from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from trainserve.api.deps import RuntimeDep, SessionDep
from trainserve.api.errors import invalid_spec
from trainserve.api.routes.datasets import create_from_upload
from trainserve.api.runtime import Runtime
from trainserve.api.schemas import Job, JobDetail
from trainserve.api.uploads import ReceivedFile, receive_form
from trainserve.datasets import catalog as datasets
from trainserve.errors import InvalidInput, UnsupportedMediaType
from trainserve.jobs import lifecycle as jobs
from trainserve.jobs.status import JobStatus
from trainserve.jobs.workers import stale_after_s
from trainserve.training.spec import MODEL_NAME_PATTERN, TrainSpec

router = APIRouter(tags=["jobs"])

_TRAIN_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/TrainSpec"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "spec"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "CSV or .npz"},
                        "spec": {"type": "string", "description": "The TrainSpec as JSON, without dataset_id"},
                    },
                }
            },
        },
    }
}


def _parse_spec(raw: str | bytes, prefix: list[str | int]) -> TrainSpec:
    try:
        return TrainSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_spec(exc, prefix) from None


def _submit(session: Session, runtime: Runtime, spec: TrainSpec, upload: ReceivedFile | None) -> Job:
    if upload is not None:
        if spec.dataset_id is not None:
            raise InvalidInput("send either a file or a dataset_id, not both", errors=[{"loc": ["spec", "dataset_id"]}])
        dataset = create_from_upload(session, runtime, upload)
    elif spec.dataset_id is None:
        raise InvalidInput(
            "dataset_id is required (or upload the file in a multipart request)",
            errors=[{"loc": ["body", "dataset_id"], "msg": "field required"}],
        )
    else:
        dataset = datasets.get(session=session, dataset_id=spec.dataset_id)
    job = jobs.submit(
        session,
        runtime.queue,
        spec,
        dataset,
        jobs.limits_of(runtime.settings),
        workers_stale_s=stale_after_s(runtime.settings),
    )
    return Job.model_validate(job)


@router.post("/train", status_code=202, response_model=Job, openapi_extra=_TRAIN_BODY)
async def train(request: Request, session: SessionDep, runtime: RuntimeDep, response: Response) -> Job:
    """Queue a training job: a JSON TrainSpec naming a dataset_id, or multipart ``file`` + ``spec``."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        limit = runtime.settings.max_upload_bytes
        async with receive_form(request, runtime.store, max_file_bytes=limit, text_fields=frozenset({"spec"})) as form:
            raw_spec = form.fields.get("spec")
            if raw_spec is None:
                raise InvalidInput(
                    "the multipart form needs a 'spec' field holding the spec as JSON",
                    errors=[{"loc": ["body", "spec"], "msg": "field required"}],
                )
            if form.file is None:
                raise InvalidInput(
                    "the multipart form needs a 'file' field holding a CSV or .npz",
                    errors=[{"loc": ["body", "file"], "msg": "field required"}],
                )
            spec = _parse_spec(raw_spec, ["spec"])
            job = await run_in_threadpool(_submit, session, runtime, spec, form.file)
    elif content_type.lower().startswith("application/json") or not content_type:
        spec = _parse_spec(await request.body(), ["body"])
        job = await run_in_threadpool(_submit, session, runtime, spec, None)
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}: send application/json or multipart/form-data"
        )
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


@router.get("/jobs", response_model=list[Job])
def list_jobs(
    session: SessionDep,
    status: Annotated[JobStatus | None, Query()] = None,
    name: str | None = Query(None, pattern=MODEL_NAME_PATTERN, description="Only jobs training this model name"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=2**62),
) -> list[Job]:
    found = jobs.list_jobs(session, status=status, name=name, limit=limit, offset=offset)
    return [Job.model_validate(j) for j in found]


@router.get("/jobs/{job_id}", response_model=JobDetail)
def get_job(job_id: str, session: SessionDep) -> JobDetail:
    return JobDetail.model_validate(jobs.get_job(session, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=Job)
def cancel_job(job_id: str, session: SessionDep, runtime: RuntimeDep) -> Job:
    """A queued job is cancelled at once; a running one stops within a second or two."""
    return Job.model_validate(jobs.cancel(session, runtime.store, job_id))
