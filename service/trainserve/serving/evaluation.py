"""Score a trained model on a labelled table: the metrics of ``trainserve.training.metrics``
and the curves the evaluation plots draw.

The table is read a chunk of rows at a time (stored tables are memory-mapped, so only the
chunk being scored is in memory) and each chunk goes through ``Predictor.infer``, the
very pass ``/predict`` answers with. What is kept across chunks is one prediction per row
(with its class probabilities): rows x classes numbers, not the table's rows x columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from trainserve.datasets.tables import Table
from trainserve.db import DatasetRecord, EvaluationRecord
from trainserve.errors import InvalidInput, NotFound
from trainserve.serving import registry
from trainserve.serving.predictor import ModelCache, Predictor
from trainserve.storage.base import Store, new_id
from trainserve.training import metrics
from trainserve.training.features import raw_matrix

CHUNK_ROWS = 65_536
ROC_POINTS = 200  # a stored ROC curve is thinned to about this many points
SCATTER_POINTS = 2_000  # predicted-vs-actual points kept for the residuals plot


def _fail(message: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(message, errors=[{"loc": loc, "msg": message}])


def check_columns(predictor: Predictor, table: Table) -> None:
    for kind, names in (("feature", predictor.features), ("target", predictor.targets)):
        missing = [n for n in names if n not in table.names]
        if missing:
            raise _fail(
                f"the dataset has no {kind} column {missing[0]!r}; the model needs {', '.join(map(repr, names))}",
                ["body", "dataset_id"],
            )


def _chunks(table: Table, predictor: Predictor) -> Any:
    """(first row, the chunk's feature matrix): the raw layout (training.features) for a
    model with preprocessing, so text categories and blanks are scored as /predict would."""
    for start in range(0, table.n_rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, table.n_rows)
        columns = [table.column(n)[start:stop] for n in predictor.features]
        if predictor.preprocessing is not None:
            yield start, raw_matrix(predictor.preprocessing, columns)[0]
        else:
            yield start, np.stack(columns, axis=1).astype(np.float32, copy=False)


def evaluate(predictor: Predictor, table: Table) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, curves) of ``predictor`` on every row of ``table``."""
    check_columns(predictor, table)
    if table.n_rows == 0:
        raise _fail("the dataset has no rows to score", ["body", "dataset_id"])
    if predictor.task == "regression":
        return _regression(predictor, table)
    return _classification(predictor, table)


def _classification(predictor: Predictor, table: Table) -> tuple[dict[str, Any], dict[str, Any]]:
    classes = list(predictor.classes or [])
    index = {c: i for i, c in enumerate(classes)}
    truth = np.empty(table.n_rows, dtype=np.int64)
    probabilities = np.empty((table.n_rows, len(classes)), dtype=np.float32)
    labels = table.column(predictor.targets[0])
    for start, x in _chunks(table, predictor):
        stop = start + len(x)
        outcome = predictor.infer(np.ascontiguousarray(x))
        assert outcome.probabilities is not None
        probabilities[start:stop] = outcome.probabilities
        for offset, label in enumerate(labels[start:stop].tolist()):
            found = index.get(label)
            if found is None:
                raise _fail(
                    f"row {start + offset + 1}: label {label!r} is not one of the model's classes "
                    f"({', '.join(map(repr, classes))})",
                    ["body", "dataset_id"],
                )
            truth[start + offset] = found
    report = metrics.classification_report(truth, probabilities, classes)
    curves: dict[str, Any] = {
        "confusion_matrix": report["confusion_matrix"],
        "classes": report["classes"],
        "calibration": metrics.calibration_bins(truth, probabilities),
        "roc": {},
    }
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    for j in positives:
        fpr, tpr = metrics.roc_curve(truth == j, probabilities[:, j])
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(np.int64))
        curves["roc"][str(classes[j])] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
    return report, curves


def _regression(predictor: Predictor, table: Table) -> tuple[dict[str, Any], dict[str, Any]]:
    width = len(predictor.targets)
    truth = np.empty((table.n_rows, width), dtype=np.float64)
    predicted = np.empty((table.n_rows, width), dtype=np.float64)
    for start, x in _chunks(table, predictor):
        stop = start + len(x)
        outcome = predictor.infer(np.ascontiguousarray(x))
        predicted[start:stop] = np.asarray(outcome.predictions, dtype=np.float64).reshape(len(x), width)
        truth[start:stop] = np.stack([table.column(n)[start:stop] for n in predictor.targets], axis=1)
    report = metrics.regression_report(truth, predicted)
    residual = (predicted - truth)[:, 0]
    counts, edges = np.histogram(residual, bins=40)
    sample = np.linspace(0, table.n_rows - 1, min(table.n_rows, SCATTER_POINTS)).round().astype(np.int64)
    curves = {
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "actual": truth[sample, 0].tolist(),
        "predicted": predicted[sample, 0].tolist(),
    }
    return report, curves


# -- stored with the model ---------------------------------------------------------------------


def evaluate_and_record(
    *, session: Session, store: Store, cache: ModelCache, model_id: str, dataset_id: str
) -> EvaluationRecord:
    """Score the model on the dataset and store the result with the model."""
    record = registry.get(session=session, model_id=model_id)
    dataset = session.get(DatasetRecord, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} does not exist")
    predictor = cache.get(record)
    table = store.load_dataset(dataset.id, dataset.file_sha256)
    report, curves = evaluate(predictor, table)
    evaluation = EvaluationRecord(
        id=new_id(),
        model_id=record.id,
        dataset_id=dataset.id,
        dataset_sha256=dataset.sha256,
        n_rows=table.n_rows,
        task=record.task,
        metrics=report,
        curves=curves,
    )
    session.add(evaluation)
    session.flush()
    return evaluation


def list_evaluations(*, session: Session, model_id: str) -> list[EvaluationRecord]:
    registry.get(session=session, model_id=model_id)
    query = select(EvaluationRecord).where(EvaluationRecord.model_id == model_id)
    return list(session.scalars(query.order_by(EvaluationRecord.created_at.desc(), EvaluationRecord.id)))


def get_evaluation(*, session: Session, model_id: str, evaluation_id: str) -> EvaluationRecord:
    found = session.get(EvaluationRecord, evaluation_id)
    if found is None or found.model_id != model_id:
        raise NotFound(f"model {model_id!r} has no evaluation {evaluation_id!r}")
    return found
