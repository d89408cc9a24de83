"""A sweep's life: submit it, keep ``parallel`` of its trials queued or running until it has
``trials`` of them, record how each ended, cancel it, and read it.

Trials are ordinary jobs (``trainserve.jobs.lifecycle.submit``) that also name their sweep
and number. ``top_up`` asks the sampler for the next trials; it runs in the API (at
submit), in the worker (right after a trial's job ends) and in every rescuer (after a
crash, or when a trial's job was cancelled or ended by the rescuer). Each call first
writes the sweep's row: on PostgreSQL that holds the row's lock, on SQLite the database's
write lock, until its transaction ends, so concurrent callers take turns, and each sees
every trial the one before it created. ``(sweep_id, number)`` is unique besides: no trial
is ever counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from trainserve.config import Settings
from trainserve.datasets.tables import TableSchema
from trainserve.db import DatasetRecord, JobRecord, ModelRecord, SweepRecord, TrialRecord, rows_changed, utcnow
from trainserve.errors import Conflict, InvalidInput, NotFound
from trainserve.jobs import lifecycle as jobs
from trainserve.jobs.queue import JobQueue
from trainserve.jobs.status import ENDED, JobStatus
from trainserve.storage.base import Store, new_id
from trainserve.sweeps.space import Space, SweepRequest, check_request, space_of, trial_spec
from trainserve.sweeps.trials import TrialPruned, TrialView
from trainserve.training.spec import TrainSpec, check_batch, plan_training

if TYPE_CHECKING:
    from trainserve.sweeps.study import Pruning

log = logging.getLogger(__name__)


class SweepStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every trial ended, at least one complete
    FAILED = "failed"  # every trial ended, none complete
    CANCELLED = "cancelled"


_JOB_ENDS = {
    JobStatus.SUCCEEDED: "complete",
    JobStatus.PRUNED: "pruned",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}


def submit(
    session: Session,
    queue: JobQueue,
    settings: Settings,
    request: SweepRequest,
    base: TrainSpec,
    dataset: DatasetRecord,
) -> SweepRecord:
    """Check the sweep as a whole (every trial spec it can produce included), record it and
    its first ``parallel`` trials; they are enqueued when the transaction commits."""
    schema = TableSchema.from_dicts(dataset.n_rows, dataset.columns)
    limits = jobs.limits_of(settings)
    base = base.model_copy(update={"dataset_id": dataset.id})
    plan = plan_training(base, schema, limits)
    if "batch_size" in base.model_fields_set:
        check_batch(base, schema, plan)
    check_request(
        request,
        base,
        schema,
        limits,
        max_trials=settings.max_sweep_trials,
        max_parallel=settings.max_sweep_parallel,
    )
    stored = request.model_copy(update={"base": base.model_dump(mode="json")})
    sweep = SweepRecord(
        id=new_id(),
        name=request.name,
        status=SweepStatus.RUNNING,
        request=stored.model_dump(mode="json"),
        dataset_id=dataset.id,
        trials=request.trials,
        parallel=request.parallel,
    )
    session.add(sweep)
    session.flush()
    top_up(session, queue, settings, sweep.id)
    return sweep


def _lock(session: Session, sweep_id: str) -> bool:
    """Write the sweep's row first thing in the transaction (see the module's docstring);
    False if the sweep is not running."""
    return bool(
        rows_changed(
            session,
            update(SweepRecord)
            .where(SweepRecord.id == sweep_id, SweepRecord.status == SweepStatus.RUNNING)
            .values(updated_at=utcnow()),
        )
    )


def _ended_as(trial: TrialRecord, job: JobRecord | None, model: ModelRecord | None, metric: str) -> dict[str, Any]:
    """How an active trial's row changes now that its job ended ({} while it has not)."""
    if job is None:
        return {"state": "failed", "reason": "its job no longer exists", "finished_at": utcnow()}
    if job.status not in ENDED:
        return {}
    values: dict[str, Any] = {"state": _JOB_ENDS[job.status], "finished_at": job.finished_at or utcnow()}
    if job.status == JobStatus.SUCCEEDED:
        value = model.metrics.get(metric) if model is not None else None
        if value is None or not math.isfinite(value):
            return {**values, "state": "failed", "reason": f"its model reports no finite {metric}"}
        values["value"] = float(value)
    elif job.status == JobStatus.PRUNED:
        # The worker stores the pruner's values (trial_ended) just after the job's end; a
        # look in between reads the same value from the job's row, written with its end.
        values["value"] = float(trial.intermediate[-1][1]) if trial.intermediate else _last_value(job, metric)
        values["pruned_at"] = trial.pruned_at or job.epoch
        values["reason"] = trial.reason or job.error
    else:
        values["reason"] = job.error
    return values


def _last_value(job: JobRecord, metric: str) -> float | None:
    """The objective at the job's last recorded epoch, as its row holds it."""
    split, _, name = metric.partition("_")
    value: Any = None
    if metric == "train_loss":
        value = job.train_loss
    elif metric == "val_loss":
        value = job.val_loss
    elif split == "val":
        value = (job.val_metrics or {}).get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def _sync(session: Session, metric: str, trials: Sequence[TrialRecord]) -> None:
    for trial in trials:
        if trial.state != "active" or trial.job_id is None:
            continue
        job = session.get(JobRecord, trial.job_id, populate_existing=True)
        model = session.get(ModelRecord, job.model_id) if job is not None and job.model_id else None
        for key, value in _ended_as(trial, job, model, metric).items():
            setattr(trial, key, value)


def view(trial: TrialRecord) -> TrialView:
    return TrialView(trial.number, trial.params, trial.state, trial.value, trial.intermediate, trial.system_attrs)


def _trials(session: Session, sweep_id: str) -> list[TrialRecord]:
    query = select(TrialRecord).where(TrialRecord.sweep_id == sweep_id).order_by(TrialRecord.number)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def top_up(session: Session, queue: JobQueue, settings: Settings, sweep_id: str) -> int:
    """Record the trials whose jobs ended, start new ones up to ``parallel`` queued or
    running (and ``trials`` in all), and end the sweep when its last trial ended. Returns
    how many trials it started. Safe to call any number of times from any process."""
    if not _lock(session, sweep_id):
        return 0
    sweep = session.get(SweepRecord, sweep_id, populate_existing=True)
    assert sweep is not None
    request = SweepRequest.model_validate(sweep.request)
    space = space_of(request)
    trials = _trials(session, sweep_id)
    _sync(session, request.metric(), trials)
    active = sum(t.state == "active" for t in trials)
    started = 0
    dataset = session.get(DatasetRecord, sweep.dataset_id) if sweep.dataset_id else None
    while active < sweep.parallel and len(trials) < sweep.trials and dataset is not None:
        trial = _start_trial(session, queue, settings, sweep, request, space, trials, dataset)
        trials.append(trial)
        if trial.state == "active":
            active += 1
            started += 1
    if active == 0 and (len(trials) >= sweep.trials or dataset is None):
        complete = any(t.state == "complete" for t in trials)
        sweep.status = SweepStatus.SUCCEEDED if complete else SweepStatus.FAILED
        sweep.finished_at = utcnow()
    session.flush()
    return started


def _start_trial(
    session: Session,
    queue: JobQueue,
    settings: Settings,
    sweep: SweepRecord,
    request: SweepRequest,
    space: Space,
    trials: list[TrialRecord],
    dataset: DatasetRecord,
) -> TrialRecord:
    number = len(trials)
    from trainserve.sweeps import study  # imports Optuna: only a sweep's trials need it

    params, system_attrs = study.ask(request, space, [view(t) for t in trials])
    trial = TrialRecord(
        sweep_id=sweep.id, number=number, params=params, system_attrs=system_attrs, state="active", intermediate=[]
    )
    try:
        # Checked at submit at the space's extremes; a combination inside it may still fail
        # (e.g. memory at the widest layer and the largest batch): that trial fails, saying why.
        spec = TrainSpec.model_validate(trial_spec(request.base, params))
        # The base's batch_size was checked when the sweep was made; a sampled one is checked here.
        job = jobs.submit(session, queue, spec, dataset, jobs.limits_of(settings), batch_set="batch_size" in params)
    except (ValidationError, InvalidInput) as exc:
        trial.state, trial.finished_at = "failed", utcnow()
        trial.reason = f"its spec is invalid: {exc.detail if isinstance(exc, InvalidInput) else exc}"
    else:
        job.sweep_id, job.trial_number = sweep.id, number
        trial.job_id = job.id
    session.add(trial)
    session.flush()
    return trial


def trial_ended(
    sessions: sessionmaker,  # type: ignore[type-arg]
    queue: JobQueue,
    settings: Settings,
    sweep_id: str,
    number: int,
    pruning: Pruning | None,
    pruned: TrialPruned | None,
) -> None:
    """After a trial's job ended (the worker calls this): store what the pruner saw of it,
    then top the sweep up."""
    with sessions.begin() as session:
        running = _lock(session, sweep_id)
        trial = session.scalars(
            select(TrialRecord).where(TrialRecord.sweep_id == sweep_id, TrialRecord.number == number)
        ).one_or_none()
        if trial is not None and pruning is not None:
            trial.intermediate = [[epoch, value] for epoch, value in pruning.values]
            trial.system_attrs = {**trial.system_attrs, **pruning.system_attrs()}
        if trial is not None and pruned is not None:
            trial.pruned_at, trial.reason = pruned.epoch, pruned.reason
        session.flush()
        if running:
            top_up(session, queue, settings, sweep_id)


def top_up_all(sessions: sessionmaker, queue: JobQueue, settings: Settings) -> int:  # type: ignore[type-arg]
    """Top up every running sweep (the rescuer's round): returns how many trials it started."""
    with sessions() as session:
        running = list(session.scalars(select(SweepRecord.id).where(SweepRecord.status == SweepStatus.RUNNING)))
    started = 0
    for sweep_id in running:
        with sessions.begin() as session:
            started += top_up(session, queue, settings, sweep_id)
    return started


def pruning_for(
    sessions: sessionmaker,  # type: ignore[type-arg]
    sweep_id: str,
    number: int,
    *,
    refresh_s: float,
    clock: Callable[[], float],
) -> Pruning | None:
    """What a worker reports a trial's epochs to (None if the trial is gone)."""
    with sessions() as session:
        sweep = session.get(SweepRecord, sweep_id)
        trial = session.scalars(
            select(TrialRecord).where(TrialRecord.sweep_id == sweep_id, TrialRecord.number == number)
        ).one_or_none()
        if sweep is None or trial is None:
            return None
        request = SweepRequest.model_validate(sweep.request)
        params = dict(trial.params)

    def others() -> list[TrialView]:
        with sessions() as session:
            rows = session.scalars(
                select(TrialRecord).where(
                    TrialRecord.sweep_id == sweep_id, TrialRecord.number != number, TrialRecord.state != "active"
                )
            )
            return [view(t) for t in rows]

    from trainserve.sweeps import study  # imports Optuna: only a sweep's trials need it

    return study.Pruning(request, space_of(request), params, others, refresh_s=refresh_s, clock=clock)


# -- reading and cancelling -------------------------------------------------------------------


def get_sweep(session: Session, sweep_id: str) -> SweepRecord:
    sweep = session.get(SweepRecord, sweep_id)
    if sweep is None:
        raise NotFound(f"sweep {sweep_id!r} does not exist")
    return sweep


def list_sweeps(session: Session, *, limit: int = 100, offset: int = 0) -> list[SweepRecord]:
    query = select(SweepRecord).order_by(SweepRecord.created_at.desc(), SweepRecord.id).limit(limit).offset(offset)
    return list(session.scalars(query))


def cancel(session: Session, store: Store, sweep_id: str) -> SweepRecord:
    """No more trials; queued trials are cancelled now, running ones stop within a progress interval."""
    sweep = get_sweep(session, sweep_id)
    if not _lock(session, sweep_id):
        raise Conflict(f"sweep {sweep_id} has already ended ({sweep.status})")
    for trial in _trials(session, sweep_id):
        if trial.state == "active" and trial.job_id is not None:
            with contextlib.suppress(Conflict):  # it ended meanwhile
                jobs.cancel(session, store, trial.job_id)
    session.execute(
        update(SweepRecord)
        .where(SweepRecord.id == sweep_id)
        .values(status=SweepStatus.CANCELLED, finished_at=utcnow(), updated_at=utcnow())
    )
    session.refresh(sweep)
    return sweep


def describe(session: Session, sweep: SweepRecord, *, with_trials: bool) -> dict[str, Any]:
    """The sweep as the API shows it: its trials' live states, counts and the best trial."""
    request = SweepRequest.model_validate(sweep.request)
    metric = request.metric()
    rows = _trials(session, sweep.id)
    job_ids = [t.job_id for t in rows if t.job_id is not None]
    jobs_by_id = (
        {j.id: j for j in session.scalars(select(JobRecord).where(JobRecord.id.in_(job_ids)))} if job_ids else {}
    )
    model_ids = [j.model_id for j in jobs_by_id.values() if j.model_id]
    models = (
        {m.id: m for m in session.scalars(select(ModelRecord).where(ModelRecord.id.in_(model_ids)))}
        if model_ids
        else {}
    )
    trials: list[dict[str, Any]] = []
    for row in rows:
        job = jobs_by_id.get(row.job_id) if row.job_id else None
        model = models.get(job.model_id) if job is not None and job.model_id else None
        values: dict[str, Any] = {
            "state": row.state,
            "value": row.value,
            "pruned_at": row.pruned_at,
            "reason": row.reason,
        }
        if row.state == "active":
            ended = _ended_as(row, job, model, metric)
            values.update(ended or {"state": str(job.status) if job is not None else "failed"})
        trials.append(
            {
                "number": row.number,
                "job_id": row.job_id,
                "model_id": job.model_id if job is not None else None,
                "params": row.params,
                **{k: values.get(k) for k in ("state", "value", "pruned_at", "reason")},
                "epochs_run": job.epoch if job is not None else 0,
                "epochs": job.epochs if job is not None else None,
            }
        )
    complete = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    sign = -1.0 if request.objective.direction == "maximize" else 1.0
    best = min(complete, key=lambda t: (sign * t["value"], t["number"])) if complete else None
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    out: dict[str, Any] = {
        "id": sweep.id,
        "name": sweep.name,
        "status": sweep.status,
        "dataset_id": sweep.dataset_id,
        "n_trials": sweep.trials,
        "parallel": sweep.parallel,
        "sampler": request.sampler,
        "pruner": request.pruner.type,
        "objective": {"metric": request.metric(), "direction": request.objective.direction},
        "seed": request.seed,
        "search": request.search,
        "created_at": sweep.created_at,
        "finished_at": sweep.finished_at,
        "counts": counts,
        "best": best,
    }
    if with_trials:
        out["trials"] = trials
        out["base"] = request.base
    return out


def name_best(session: Session, sweep_id: str, name: str) -> ModelRecord:
    """Give the best trial's model ``name``: it becomes that name's next version (unchanged
    if it already is a version of that name; 409 if it is a version of another name)."""
    detail = describe(session, get_sweep(session, sweep_id), with_trials=False)
    best = detail["best"]
    if best is None or best["model_id"] is None:
        raise Conflict(f"sweep {sweep_id} has no complete trial with a model yet")
    model = session.get(ModelRecord, best["model_id"])
    if model is None:
        raise Conflict(f"the best trial's model {best['model_id']} was deleted")
    if model.name == name:
        return model
    if model.name is not None:
        raise Conflict(f"the best trial's model is already version {model.version} of {model.name!r}")
    latest = session.scalar(select(func.max(ModelRecord.version)).where(ModelRecord.name == name))
    model.name, model.version = name, (latest or 0) + 1
    session.flush()  # a version taken meanwhile fails here: the API answers 409, retry
    return model
