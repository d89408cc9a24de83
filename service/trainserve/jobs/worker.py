"""The worker process: take training jobs off the queue, claim them, train them under a
lease, save checkpoints and models, and hand jobs back when asked to stop.

Everything a worker writes for a job is fenced by its lease (``Lease`` in
``trainserve.jobs.attempt``): once the rescuer (``trainserve.jobs.rescuer``) has given the
job to another worker, the old one writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from datetime import timedelta
from types import FrameType
from typing import Any

import numpy as np
import torch
from huey.consumer import Consumer
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import trainserve
from trainserve.config import Settings
from trainserve.datasets.tables import Table, TableSchema
from trainserve.db import DatasetRecord, JobRecord, ModelRecord, make_engine, make_session_factory, rows_changed, utcnow
from trainserve.errors import CheckpointMismatch, InvalidInput, TrainserveError
from trainserve.jobs.attempt import Attempt, StopReason, TimeLimit, WorkerContext, thin_history
from trainserve.jobs.lifecycle import limits_of
from trainserve.jobs.queue import build_queue
from trainserve.jobs.rescuer import Rescuer
from trainserve.jobs.status import JobStatus
from trainserve.jobs.workers import WorkerPresence, devices_here
from trainserve.storage.base import new_id
from trainserve.sweeps import driver as sweeps
from trainserve.sweeps.trials import TrialPruned
from trainserve.training import features, loop, native, network, threads
from trainserve.training.spec import TrainingPlan, TrainSpec, plan_training

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, exit_with_parent: bool = False) -> None:
    """Consume training jobs until SIGINT, SIGTERM or SIGHUP (``trainserve worker``), which drain it.

    The worker also runs the rescuer, so jobs of a dead worker on any machine come back.
    With ``exit_with_parent`` it drains itself when the process that started it dies.
    """
    if settings.worker_nice:
        os.nice(settings.worker_nice)
    draining = threading.Event()  # set by a stop signal: a running job hands itself back

    def run(job_id: str) -> None:
        run_job(ctx, job_id)

    queue = build_queue(settings, run=run)
    # Built before the first entry is taken, so that taking an entry and claiming its job
    # are moments apart: the rescuer re-enqueues a queued job whose entry it cannot see
    # (``rescuer.requeue_lost``), and the engine's one-off costs take a second or more.
    ctx = WorkerContext.from_settings(settings, queue, draining)
    consumer = queue.huey.create_consumer(
        workers=settings.worker_threads,
        worker_type="thread",
        periodic=False,
        initial_delay=0.05,
        backoff=1.15,
        max_delay=settings.queue_poll_max_s,
    )
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    presence = WorkerPresence(sessions, ctx.name, devices_here())
    presence.announce()
    rescuer = Rescuer(sessions, queue, ctx.store, settings, on_round=presence.beat)
    rescuer.start()
    if exit_with_parent:
        _drain_when_orphaned(draining)
    try:
        _consume_until_drained(consumer, draining)
    finally:
        rescuer.stop()
        try:
            presence.leave()
        except Exception:  # the database may be gone; the row then goes stale on its own
            log.exception("could not remove this worker's row")


def _consume_until_drained(consumer: Consumer, draining: threading.Event) -> None:
    """Run Huey's consumer until SIGINT, SIGTERM or SIGHUP. Each sets ``draining`` at once, so
    the running job checkpoints and hands itself back (seconds); then no new entry is
    taken, and the worker exits once the running task has returned. The same signal a
    second time stops the worker without waiting.

    Huey's own handlers differ (SIGTERM interrupts the running task, SIGINT waits for it,
    maybe hours), and changing them means its private attributes, which move between
    releases (3.5.0 and 3.5.4 name them differently). So only Huey's documented API is
    used: ``Consumer.start()`` starts the workers, registers its handlers and returns;
    ours replace them for SIGINT, SIGTERM and SIGHUP; ``Consumer.stop(graceful=True)`` blocks
    until every worker has finished its task. ``Consumer.run()`` would use Huey's
    handlers; what else it adds is not needed here: restarting a worker thread that died
    (a job's errors are all caught) and a restart in place on SIGHUP (a lost terminal):
    here SIGHUP drains like SIGTERM, and ``serve``, or the service manager, starts a new worker.
    """
    received: list[int] = []
    again: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Runs on the main thread between two of its bytecodes: it only sets flags. The
        # loop below polls ``draining`` rather than waiting on it: setting an Event from
        # a handler that interrupted a wait on that same Event can deadlock.
        if signum in received:
            again.append(signum)
            raise KeyboardInterrupt  # ends the wait below, or Huey's in ``stop``
        received.append(signum)
        draining.set()

    # Ours before start() too: it starts Huey's threads, then installs Huey's handlers as
    # its last step, which ours then replace. A signal that lands in Huey's handler would
    # set flags of Huey's that nothing reads; the window is those few lines of Huey's.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for stop_signal in stop_signals:
        signal.signal(stop_signal, on_signal)
    consumer.start()
    for stop_signal in stop_signals:
        signal.signal(stop_signal, on_signal)
    try:
        while not draining.is_set():
            time.sleep(0.1)
        why = f"received {_name(received[0])}" if received else "draining"
        log.info("%s: the running job hands itself back, then this worker exits", why)
        consumer.stop(graceful=True)
    except KeyboardInterrupt:
        consumer.stop()  # sets the stop flag and returns: no new entry is taken
    if again:
        log.warning(
            "received %s again: exiting without waiting for the running job; "
            "its lease runs out, then the rescuer re-queues it",
            _name(again[0]),
        )
        logging.shutdown()
        # Not a normal exit: the job still trains in a worker thread, and the interpreter
        # aborts ("terminate called without an active exception") if torch runs while it
        # shuts down. 128 + the signal: the shell's code for a process a signal ended.
        os._exit(128 + again[0])


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _drain_when_orphaned(draining: threading.Event) -> None:
    # Sets the event itself rather than signalling this process: a SIGTERM on top of one
    # that is already draining would count as the second, which stops without waiting.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the process that started this worker is gone; draining")
        draining.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def on_this_worker(spec: TrainSpec, settings: Settings) -> TrainSpec:
    """The spec to train here: "auto" means the device this worker was started for
    (``trainserve worker --device cuda:1``), if any; otherwise the engine's choice, which
    honours ``CUDA_VISIBLE_DEVICES``. The job and the model keep the spec as sent."""
    if spec.device == "auto" and settings.worker_device:
        return spec.model_copy(update={"device": settings.worker_device})
    return spec


def _claim(ctx: WorkerContext, job_id: str) -> tuple[JobRecord, DatasetRecord | None] | None:
    """queued -> running for this worker, one more attempt, a fresh lease; None if not queued."""
    now = utcnow()
    with ctx.sessions.begin() as session:
        claimed = rows_changed(
            session,
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                started_at=func.coalesce(JobRecord.started_at, now),
                attempts=JobRecord.attempts + 1,
                worker=ctx.name,
                lease_expires_at=now + timedelta(seconds=ctx.settings.lease_seconds),
                heartbeat_at=now,
                updated_at=now,
            ),
        )
        if not claimed:
            return None
        job = session.get(JobRecord, job_id)
        assert job is not None
        dataset = session.get(DatasetRecord, job.dataset_id) if job.dataset_id else None
    return job, dataset


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Claim a queued job, train it, save the model; every outcome lands in the job row,
    unless this worker lost its lease, in which case it writes nothing at all."""
    claim = _claim(ctx, job_id)
    if claim is None:
        log.info("job %s is not queued any more; skipping", job_id)
        return
    job, dataset = claim
    spec_limit = job.spec.get("max_seconds")
    if spec_limit is not None and spec_limit < ctx.settings.max_job_seconds:
        limit = TimeLimit(spec_limit, f"the spec's max_seconds of {spec_limit:g} seconds")
    else:
        limit = TimeLimit(ctx.settings.max_job_seconds, "TRAINSERVE_MAX_JOB_SECONDS")
    attempt = Attempt(ctx, job, time_limit=limit)
    trial = (job.sweep_id, job.trial_number) if job.sweep_id is not None and job.trial_number is not None else None
    if trial is not None:
        attempt.pruning = sweeps.pruning_for(
            ctx.sessions, *trial, refresh_s=ctx.settings.progress_interval_s, clock=time.monotonic
        )
    attempt.lease.start()
    try:
        _run_claimed(ctx, attempt, job, dataset)
    finally:
        attempt.lease.stop()
    if trial is not None:
        # The sweep's next trials are asked for now, not at the rescuer's next round.
        try:
            sweeps.trial_ended(ctx.sessions, ctx.queue, ctx.settings, *trial, attempt.pruning, attempt.pruned)
        except Exception:  # the rescuer tops the sweep up on its next round
            log.exception("job %s: recording the end of sweep %s's trial failed", job.id, trial[0])


def _run_claimed(ctx: WorkerContext, attempt: Attempt, job: JobRecord, dataset: DatasetRecord | None) -> None:
    try:
        if dataset is None:
            raise InvalidInput("the job's dataset was deleted before the job ran")
        spec = TrainSpec.model_validate(job.spec)
        table = ctx.store.load_dataset(dataset.id, dataset.file_sha256)
        limits = limits_of(ctx.settings)
        parent = _parent(ctx, spec) if spec.init_from is not None else None
        # A warm start keeps the parent's preprocessing (its levels, fill values and scaling)
        # unless the spec asks to refit: the parent's first layer expects that layout.
        inherited = None
        if parent is not None and not spec.refit and parent.preprocessing is not None:
            inherited = features.FeaturePlan.from_json(parent.preprocessing)
        plan = plan_training(spec, _schema(dataset, table), limits)
        prepared = features.prepare(table, spec, plan, limits, inherited)
        plan = prepared.plan
        init = _parent_weights(ctx, parent) if parent is not None else None
        result = _train(ctx, attempt, spec, plan, prepared.x, prepared.y, init, split=prepared.split)
        if not prepared.features.is_identity:
            result.module.attach_encoder(network.FeatureEncoder(prepared.features))
        result.notes[:0] = prepared.notes
    except loop.TrainingPreempted as preempted:
        attempt.hand_back(
            f"attempt {attempt.lease.attempt}: worker {ctx.name} stopped; handed back at epoch "
            f"{preempted.checkpoint.epoch} with a checkpoint"
        )
        return
    except loop.TrainingCancelled:
        _stopped(ctx, attempt)
        return
    except TrialPruned as pruned:
        attempt.pruned = pruned
        last = attempt.reports[-1]
        _end_attempt(
            ctx,
            attempt,
            JobStatus.PRUNED,
            error=pruned.reason,
            epoch=last.epoch,
            train_loss=last.train_loss,
            val_loss=last.val_loss,
            val_metrics=last.val_metrics,
            history=thin_history(attempt.reports),
        )
        return
    except TrainserveError as exc:
        _end_attempt(ctx, attempt, JobStatus.FAILED, error=str(exc))
        return
    except Exception as exc:  # a worker must record every failure, not die on it
        log.exception("job %s failed", job.id)
        _end_attempt(ctx, attempt, JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        return
    # Beside the save, not before it: the job's end should not wait for a C compiler.
    threading.Thread(
        target=native.warm_rowwise, args=(spec.model, plan.in_features, plan.task), name="warm-rowwise", daemon=True
    ).start()
    try:
        _save(ctx, attempt, dataset, spec, plan, result, prepared.features)
    except Exception as exc:
        log.exception("job %s: saving the model failed", job.id)
        _end_attempt(ctx, attempt, JobStatus.FAILED, error=f"saving the model failed: {type(exc).__name__}: {exc}")
    else:
        ctx.store.delete_checkpoint(job.id)


def _schema(dataset: DatasetRecord, table: Table) -> TableSchema:
    """The schema recorded at upload, which the job was checked against at submit.

    Describing the table again counted every column's distinct values (a sort per
    column): 0.1 s per 50,000 rows of 21 columns, 5-10% of a medium job's end-to-end
    time (docs/performance-16.md). Records from before columns carried their count of
    blanks are described again: their plan needs it."""
    if all("missing" in column for column in dataset.columns):
        return TableSchema.from_dicts(dataset.n_rows, dataset.columns)
    return table.schema()


def _parent(ctx: WorkerContext, spec: TrainSpec) -> ModelRecord:
    """The model a warm start begins from (its id was pinned at submit)."""
    with ctx.sessions() as session:
        parent: ModelRecord | None = session.get(ModelRecord, spec.init_from)
    if parent is None:
        raise InvalidInput(f"the model in init_from ({spec.init_from}) was deleted before the job ran")
    return parent


def _parent_weights(ctx: WorkerContext, parent: ModelRecord) -> dict[str, torch.Tensor]:
    try:
        return ctx.store.load_weights(parent.id, parent.weights_sha256)
    except FileNotFoundError:
        raise InvalidInput(f"the weights of the model in init_from ({parent.id}) are gone") from None


def _train(
    ctx: WorkerContext,
    attempt: Attempt,
    spec: TrainSpec,
    plan: TrainingPlan,
    x: np.ndarray,
    y: np.ndarray,
    init: dict[str, torch.Tensor] | None = None,
    *,
    split: loop.Split | None = None,
) -> loop.TrainedModel:
    """Train, resuming from the job's checkpoint when an earlier attempt left one."""
    spec = on_this_worker(spec, ctx.settings)
    resume = attempt.resume_point()
    # Chosen per job, from its step's size and the cores free as it starts (see threads.py).
    work = min(spec.batch_size, len(x)) * max(plan.n_parameters, 1)
    options: dict[str, Any] = {
        # The load is sampled in the background (WorkerContext): no 0.2 s wait at each start.
        "threads": threads.choose(
            work, override=ctx.settings.train_threads, wait=None if threads.sampling() else threads.SAMPLE_S
        ),
        "on_epoch": attempt.on_epoch,
        "should_stop": attempt.should_stop,
        "check_every_s": ctx.settings.progress_interval_s,
        "on_checkpoint": attempt.save_checkpoint,
        "checkpoint_every_s": ctx.settings.checkpoint_seconds,
        "should_preempt": attempt.should_preempt,
        "init": init,
        "split": split,
    }
    try:
        return loop.train(spec, plan, x, y, resume=resume, **options)
    except CheckpointMismatch:  # taken for another spec or dataset shape: not ours to use
        ctx.store.delete_checkpoint(attempt.job_id)
        attempt.note("the checkpoint did not match this job; started over")
        return loop.train(spec, plan, x, y, **options)


def _end_attempt(ctx: WorkerContext, attempt: Attempt, status: JobStatus, **values: Any) -> None:
    """End the job; its checkpoint goes too, unless the job belongs to another worker now."""
    if attempt.finish(status, **values):
        ctx.store.delete_checkpoint(attempt.job_id)


def _stopped(ctx: WorkerContext, attempt: Attempt) -> None:
    reason = attempt.stop_reason
    if reason is StopReason.CANCELLED:
        _end_attempt(ctx, attempt, JobStatus.CANCELLED, error="cancelled while running")
    elif reason is StopReason.TIME_LIMIT:
        _end_attempt(
            ctx,
            attempt,
            JobStatus.FAILED,
            error=f"the job trained longer than its limit of {attempt.time_limit.seconds:g} seconds "
            f"({attempt.time_limit.source})",
        )
    else:  # the lease is lost: the job belongs to the rescuer or another worker now
        log.warning("job %s: stopped after losing the lease; nothing written", attempt.job_id)


def _save(
    ctx: WorkerContext,
    attempt: Attempt,
    dataset: DatasetRecord,
    spec: TrainSpec,
    plan: TrainingPlan,
    result: loop.TrainedModel,
    fitted: features.FeaturePlan,
) -> None:
    job_id = attempt.job_id
    model_id = new_id()
    metadata = {
        "trainserve_model_id": model_id,
        "job_id": job_id,
        "spec": json.dumps(spec.model_dump(mode="json")),
        "preprocessing": json.dumps(fitted.to_json()),
    }
    weights_sha256, weights_bytes = ctx.store.save_weights(model_id, result.module.state_dict(), metadata)
    last = result.history[-1]
    now = utcnow()
    job_values = {
        "status": JobStatus.SUCCEEDED,
        "model_id": model_id,
        "epoch": last.epoch,
        "train_loss": last.train_loss,
        "val_loss": last.val_loss,
        "val_metrics": last.val_metrics,
        "history": thin_history(result.history),
        "device": result.device,
        "finished_at": now,
        "updated_at": now,
    }
    # Lineage: which data, which spec, which code made this model.
    model_values = {
        "id": model_id,
        "name": spec.name,
        "job_id": job_id,
        "dataset_id": dataset.id,
        "dataset_sha256": dataset.sha256,
        "spec": spec.model_dump(mode="json"),
        "task": plan.task,
        "features": plan.features,
        "targets": plan.targets,
        "classes": plan.classes,
        "input_mean": result.input_mean,
        "input_std": result.input_std,
        "metrics": result.metrics,
        "n_parameters": plan.n_parameters,
        "weights_sha256": weights_sha256,
        "weights_bytes": weights_bytes,
        "torch_version": torch.__version__,
        "code_version": f"trainserve {trainserve.__version__}",
        "device": result.device,
        "train_seconds": result.train_seconds,
        "parent_model_id": spec.init_from,
        "preprocessing": fitted.to_json(),
        "evaluation": result.evaluation or None,
    }
    try:
        # Two workers finishing jobs under one name at once may both pick the same next
        # version; the unique (name, version) constraint refuses the second, which retries.
        for try_number in range(_VERSION_ATTEMPTS):
            try:
                finished = _record_success(ctx, attempt, job_values, model_values, result.notes)
                break
            except IntegrityError:
                if spec.name is None or try_number == _VERSION_ATTEMPTS - 1:
                    raise
                log.info("job %s: a concurrent job took the version of %r; retrying", job_id, spec.name)
    except BaseException:
        ctx.store.delete_weights(model_id)
        raise
    if not finished:  # cancelled in the last instant, or the lease is gone: keep no model
        ctx.store.delete_weights(model_id)
        _end_attempt(
            ctx, attempt, JobStatus.CANCELLED, error="cancelled while running"
        )  # fenced: a lost lease writes nothing


_VERSION_ATTEMPTS = 5


def next_version(session: Session, name: str) -> int:
    """The version the next model saved under ``name`` gets: 1 for a new name."""
    latest = session.scalar(select(func.max(ModelRecord.version)).where(ModelRecord.name == name))
    return (latest or 0) + 1


def _record_success(
    ctx: WorkerContext,
    attempt: Attempt,
    job_values: dict[str, Any],
    model_values: dict[str, Any],
    notes: list[str],
) -> int:
    """Mark the job succeeded and add its model row in one transaction, fenced by the
    lease; 0 if it was cancelled or this worker no longer owns it."""
    with ctx.sessions.begin() as session:
        previous_notes = session.scalar(select(JobRecord.notes).where(JobRecord.id == attempt.job_id)) or []
        # The job row is written first: on SQLite that takes the write lock, so the version
        # read below already sees every other worker's committed models.
        finished = rows_changed(
            session,
            update(JobRecord)
            .where(*attempt.lease.owned(), JobRecord.cancel_requested.is_(False))
            .values(**job_values, notes=[*previous_notes, *notes], lease_expires_at=None),
        )
        if finished:
            name = model_values["name"]
            version = next_version(session, name) if name is not None else None
            session.add(ModelRecord(**model_values, version=version, notes=notes))
            session.flush()  # a taken (name, version) fails here, inside the retry loop
    return finished
