"""Drift reports from the database and the store: a model's training split against its
logged requests (the numbers are computed by serving/drift.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import desc, func, select
from sqlalchemy.orm import Session

from trainserve.datasets.tables import Table
from trainserve.db import ModelRecord, PredictionLogRecord
from trainserve.serving import drift, registry
from trainserve.storage.base import Store
from trainserve.training import features
from trainserve.training.features import FeaturePlan
from trainserve.training.spec import Task, TrainSpec


@dataclass(frozen=True)
class DriftReport:
    model_id: str
    name: str | None
    version: int | None
    window_rows: int
    threshold: float
    features: list[drift.FeatureDrift]


def _references(
    session: Session, store: Store, cache: drift.ReferenceCache, record: ModelRecord
) -> list[drift.Reference]:
    cached = cache.get(record.id)
    if cached is not None:
        return cached
    spec = TrainSpec.model_validate(record.spec)
    if record.preprocessing is None:
        # Trained before preprocessing existed: the worker split the whole table with split_indices.
        from trainserve.training.loop import split_indices  # torch: loaded once the API answers

        x, _ = registry.training_data(session=session, store=store, record=record)
        train_rows, _ = split_indices(len(x), spec.validation_split, spec.seed)
        references = [drift.reference(x[train_rows, j]) for j in range(x.shape[1])]
    else:
        plan = FeaturePlan.from_json(record.preprocessing)
        x = training_rows(session, store, record, spec, plan)
        references = [
            drift.category_reference(x[:, j], len(c.levels)) if c.kind == "category" else drift.reference(x[:, j])
            for j, c in enumerate(plan.columns)
        ]
    cache.put(record.id, references)
    return references


def training_rows(
    session: Session, store: Store, record: ModelRecord, spec: TrainSpec, plan: FeaturePlan
) -> np.ndarray:
    """The rows the model trained on, in its raw layout."""
    dataset = registry.training_dataset(session=session, record=record)
    table = store.load_dataset(dataset.id, dataset.file_sha256)
    task = cast(Task, record.task)  # stored from the training plan's task
    rows = trained_rows(table, spec, list(record.features), list(record.targets), task, record.classes)
    if plan.is_identity:
        x: np.ndarray = table.matrix(list(record.features))[rows]
        return x
    x, _ = features.raw_matrix(plan, [table.column(name)[rows] for name in plan.features])
    return x


def trained_rows(
    table: Table, spec: TrainSpec, feature_names: list[str], targets: list[str], task: Task, classes: list[Any] | None
) -> np.ndarray:
    """The table rows ``features.prepare`` trained on, redrawn from the stored spec and classes
    (nothing is refitted): the rows that could not train dropped (a blank target, a blank in a
    ``drop_row`` column), then ``loop.split_rows`` (stratified by the stored classes, the test
    share held out) over the rest."""
    from trainserve.training.loop import encode_targets, split_rows  # torch: loaded once the API answers

    dropped = np.zeros(table.n_rows, dtype=bool)
    for mask in features.rows_to_drop(table, feature_names, targets, spec).values():
        dropped |= mask
    keep = np.flatnonzero(~dropped)
    labels = None
    if task != "regression" and spec.split is not None and spec.split.stratify:
        encoded = encode_targets(table.column(targets[0])[keep], task, classes)
        labels = encoded.numpy().reshape(-1).astype(np.int64)
    rows: np.ndarray = keep[split_rows(spec, len(keep), labels).train]
    return rows


def logged_rows(session: Session, model_id: str, window: int) -> np.ndarray:
    """The newest ``window`` input rows logged for the model (a sliding window)."""
    query = (
        select(PredictionLogRecord.inputs)
        .where(PredictionLogRecord.model_id == model_id)
        .order_by(desc(PredictionLogRecord.id))
        .limit(window)
    )
    rows: list[list[float]] = []
    for inputs in session.scalars(query):
        rows.extend(inputs[: window - len(rows)])
        if len(rows) >= window:
            break
    return np.asarray(rows, dtype=np.float64)


def model_drift(
    session: Session, store: Store, cache: drift.ReferenceCache, record: ModelRecord, *, window: int, threshold: float
) -> DriftReport:
    references = _references(session, store, cache, record)
    rows = logged_rows(session, record.id, window)
    if rows.ndim != 2 or (len(rows) and rows.shape[1] != len(record.features)):
        rows = np.empty((0, len(record.features)))
    features = drift.measure(references, list(record.features), rows, threshold)
    return DriftReport(record.id, record.name, record.version, len(rows), threshold, features)


def named_drift(
    session: Session, store: Store, cache: drift.ReferenceCache, *, window: int, threshold: float, limit: int
) -> list[DriftReport]:
    """For each model name with logged requests, the drift of its most recently logged
    version; at most ``limit`` names (the newest), so that metric labels stay bounded."""
    newest = func.max(PredictionLogRecord.id)
    query = (
        select(PredictionLogRecord.model_id, PredictionLogRecord.name)
        .where(PredictionLogRecord.name.is_not(None))
        .group_by(PredictionLogRecord.model_id, PredictionLogRecord.name)
        .order_by(desc(newest))
    )
    reports: list[DriftReport] = []
    seen: set[str] = set()
    for model_id, name in session.execute(query):
        if name is None or name in seen:
            continue
        seen.add(name)
        record = session.get(ModelRecord, model_id)
        if record is None:
            continue
        try:
            reports.append(model_drift(session, store, cache, record, window=window, threshold=threshold))
        except Exception:  # its dataset was deleted: no reference to compare with
            continue
        if len(reports) >= limit:
            break
    return reports
