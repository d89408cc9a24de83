"""A job's life as the API sees it: submit, look up, list and cancel.

Every state change is a conditional UPDATE (``WHERE status = ...``), so a cancel and a
worker's claim can race without either being lost. A job is enqueued only after the
transaction that created it commits, so a worker never looks for a row that is not there.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from trainserve.config import Settings
from trainserve.datasets.tables import TableSchema
from trainserve.db import DatasetRecord, JobRecord, ModelRecord, on_commit, rows_changed, utcnow
from trainserve.errors import Conflict, InvalidInput, NotFound
from trainserve.jobs.queue import JobQueue
from trainserve.jobs.status import JobStatus
from trainserve.jobs.workers import check_device
from trainserve.serving import aliases
from trainserve.storage.base import Store, new_id
from trainserve.training import features, warmstart
from trainserve.training.spec import Limits, TrainingPlan, TrainSpec, check_batch, plan_training


def limits_of(settings: Settings) -> Limits:
    return Limits(
        settings.max_epochs,
        settings.max_parameters,
        settings.max_layer_width,
        max_job_seconds=settings.max_job_seconds,
        max_memory_bytes=settings.max_train_memory_bytes,
        max_category_levels=settings.category_limit,
    )


def get_job(session: Session, job_id: str) -> JobRecord:
    job = session.get(JobRecord, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} does not exist")
    return job


def list_jobs(
    session: Session, *, status: JobStatus | None = None, name: str | None = None, limit: int = 100, offset: int = 0
) -> list[JobRecord]:
    query = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit).offset(offset)
    if status is not None:
        query = query.where(JobRecord.status == status)
    if name is not None:
        query = query.where(JobRecord.name == name)
    return list(session.scalars(query))


def submit(
    session: Session,
    queue: JobQueue,
    spec: TrainSpec,
    dataset: DatasetRecord,
    limits: Limits,
    *,
    workers_stale_s: float | None = None,
    store: Store | None = None,
    batch_set: bool | None = None,
) -> JobRecord:
    """Validate the spec against the dataset, record a queued job, enqueue it on commit.

    With ``workers_stale_s``, a spec asking for a device no live worker has is refused
    (Conflict); if no worker is live at all, the job waits, with a note saying so. With
    ``store``, a spec that asks 'number' of a text column is checked against the data
    itself, so that the refusal names the rows holding words. A batch_size set in the spec
    (``batch_set``, by default whether the spec named one) must fit the training rows.
    """
    schema = TableSchema.from_dicts(dataset.n_rows, dataset.columns)
    plan = plan_training(spec, schema, limits)
    numbers_of_text = [
        name
        for name, override in (spec.columns or {}).items()
        if override.type == "number" and (column := schema.column(name)) is not None and column.dtype == "string"
    ]
    if numbers_of_text and store is not None:
        features.check_numbers(store.load_dataset(dataset.id, dataset.file_sha256), spec)
    if batch_set if batch_set is not None else "batch_size" in spec.model_fields_set:
        check_batch(spec, schema, plan)  # after the columns: a table that cannot train at all says so first
    updates: dict[str, Any] = {"dataset_id": dataset.id}
    if spec.init_from is not None:
        # Pinned to the model's id: an alias moved while the job waits must not change its parent.
        updates["init_from"] = warm_start_parent(session, spec, plan, schema).id
    warmstart.check_freeze(spec, plan.in_features)
    note = check_device(session, spec.device, stale_s=workers_stale_s) if workers_stale_s is not None else None
    spec = spec.model_copy(update=updates)
    job = JobRecord(
        id=new_id(),
        status=JobStatus.QUEUED,
        spec=spec.model_dump(mode="json"),
        dataset_id=dataset.id,
        epochs=spec.epochs,
        history=[],
        name=spec.name,
        notes=[note] if note else [],
    )
    session.add(job)
    session.flush()
    job_id = job.id
    sessions = sessionmaker(session.get_bind())

    def enqueue() -> None:
        try:
            queue.enqueue(job_id)
        except Exception as exc:
            with sessions.begin() as fresh:
                _end(fresh, job_id, JobStatus.QUEUED, JobStatus.FAILED, error=f"the job could not be queued: {exc}")
            raise

    on_commit(session, enqueue)
    return job


def _end(session: Session, job_id: str, current: JobStatus, status: JobStatus, **values: Any) -> int:
    now = utcnow()
    return rows_changed(
        session,
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.status == current)
        .values(status=status, finished_at=now, updated_at=now, **values),
    )


def with_note(notes: list[Any] | None, note: str) -> list[Any]:
    """A job's notes with one more at the end."""
    return [*(notes or []), note]


def cancel(session: Session, store: Store, job_id: str) -> JobRecord:
    """A queued job ends now; a running one is asked to stop and ends within a progress interval
    (its worker deletes its checkpoint)."""
    job = get_job(session, job_id)
    ended = _end(session, job_id, JobStatus.QUEUED, JobStatus.CANCELLED, error="cancelled before it started")
    if ended:
        # A job handed back, or re-queued after its worker died, may have a checkpoint: no
        # attempt will resume from it now.
        on_commit(session, lambda: store.delete_checkpoint(job_id))
    else:
        asked = rows_changed(
            session,
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.status == JobStatus.RUNNING)
            .values(cancel_requested=True, updated_at=utcnow()),
        )
        if not asked:
            session.refresh(job)
            raise Conflict(f"job {job_id} has already ended ({job.status})")
    session.refresh(job)
    return job


def _mismatch(msg: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])


def warm_start_parent(session: Session, spec: TrainSpec, plan: TrainingPlan, schema: TableSchema) -> ModelRecord:
    """The model ``init_from`` names, checked to fit this spec and data: the same feature
    columns and types, targets, task and classes, and the same layers, shape for shape."""
    assert spec.init_from is not None
    parent = aliases.find_reference(session, spec.init_from, ["init_from"])
    named = f"the model in init_from ({_label(parent)})"
    if parent.task != plan.task:
        raise _mismatch(f"{named} is a {parent.task} model, this spec trains {plan.task}", ["loss"])
    if parent.features != plan.features:
        raise _mismatch(f"{named} takes features {parent.features}, this spec {plan.features}", ["features"])
    parent_data = session.get(DatasetRecord, parent.dataset_id) if parent.dataset_id else None
    if parent_data is not None:
        before = {c["name"]: c.get("dtype") for c in parent_data.columns}
        for name in plan.features:
            now = schema.column(name)
            if now is not None and before.get(name) is not None and _kind(now.dtype) != _kind(before[name]):
                raise _mismatch(
                    f"feature {name!r} holds {now.dtype} here, {before[name]} in the data of {named}", ["features"]
                )
    if parent.targets != plan.targets:
        raise _mismatch(f"{named} predicts {parent.targets}, this spec {plan.targets}", ["target"])
    if (parent.classes or None) != (plan.classes or None):
        raise _mismatch(f"{named} has classes {parent.classes}, this data {plan.classes}", ["target"])
    warmstart.check_layers(spec.model, TrainSpec.model_validate(parent.spec).model, plan.in_features)
    return parent


def _label(record: ModelRecord) -> str:
    return f"{record.name} v{record.version}" if record.name else record.id


def _kind(dtype: str) -> str:
    # A new table whose column holds only whole numbers reads as int64 where the old one read
    # float64: the same feature to the network. Other types (text, categories) must match.
    return "number" if dtype in ("int64", "float64", "bool", "boolean", "integer", "number") else dtype
