"""Serving: load trained models (checked, cached), validate inputs, predict under inference_mode."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.db import ModelRecord
from service.engine import TabularNet, outputs_to_probabilities
from service.errors import InvalidInput, NotFound, PayloadTooLarge
from service.spec import TrainSpec
from service.store import Store


@dataclass(frozen=True)
class Prediction:
    predictions: list[Any]
    probabilities: list[list[float]] | None
    classes: list[Any] | None


@dataclass
class Predictor:
    """A trained model ready to answer: eval mode, on the CPU, with its labels."""

    model_id: str
    features: list[str]
    targets: list[str]
    task: str
    classes: list[Any] | None
    module: TabularNet

    @classmethod
    def load(cls, store: Store, record: ModelRecord) -> Predictor:
        tensors = store.load_weights(record.id, record.weights_sha256)
        module = TabularNet(TrainSpec.model_validate(record.spec).model, len(record.features))
        module.load_state_dict(tensors)
        module.eval()
        return cls(record.id, record.features, record.targets, record.task, record.classes, module)

    def predict(self, x: np.ndarray) -> Prediction:
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(x))
            if self.task == "regression":
                values = outputs.numpy()
                return Prediction(values[:, 0].tolist() if values.shape[1] == 1 else values.tolist(), None, None)
            probabilities = outputs_to_probabilities(outputs, self.task)  # type: ignore[arg-type]
            index = probabilities.argmax(dim=1).numpy()
        assert self.classes is not None
        labels = np.asarray(self.classes)[index].tolist()
        return Prediction(labels, probabilities.numpy().tolist(), self.classes)


class ModelCache:
    """Least-recently-used models in memory. Weights never change once written, so an
    entry is valid until its model is deleted."""

    def __init__(self, store: Store, capacity: int) -> None:
        self.store, self.capacity = store, capacity
        self._entries: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ModelRecord) -> Predictor:
        """The loaded model; NotFound if its weights were deleted since the row was read."""
        with self._lock:
            predictor = self._entries.get(record.id)
            if predictor is not None:
                self._entries.move_to_end(record.id)
                return predictor
        try:
            predictor = Predictor.load(self.store, record)  # outside the lock: loads may overlap
        except FileNotFoundError:
            raise NotFound(f"model {record.id!r} does not exist") from None
        with self._lock:
            self._entries[record.id] = predictor
            self._entries.move_to_end(record.id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return predictor

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._entries.pop(model_id, None)

    def __len__(self) -> int:
        return len(self._entries)


# -- input validation ------------------------------------------------------------------------


def _bad(msg: str, loc: list[Any]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": ["inputs", *loc], "msg": msg}])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _explain(rows: list[Any], width: int) -> InvalidInput:
    """Find the first value numpy could not take, to name its row and column (slow path)."""
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            return _bad(f"row {i} must be a list of {width} numbers or an object keyed by feature", [i])
        if len(row) != width:
            return _bad(f"row {i} has {len(row)} values, the model takes {width}", [i])
        for j, value in enumerate(row):
            if not _is_number(value):
                return _bad(f"row {i}, column {j}: {value!r} is not a number", [i, j])
            if not _fits_float(value):
                return _bad(f"row {i}, column {j}: the number is too large", [i, j])
    return _bad("inputs must be rows of numbers", [])


def _fits_float(value: int | float) -> bool:
    try:
        float(value)
    except OverflowError:  # an int beyond float64
        return False
    return True


def _objects_to_rows(rows: list[Any], features: list[str]) -> list[list[Any]]:
    wanted = set(features)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _bad(f"row {i} must be an object keyed by feature name, like row 0", [i])
        if len(row) != len(features) or not wanted.issuperset(row):
            unknown = sorted(set(row) - wanted)
            if unknown:
                raise _bad(f"row {i}: unknown feature {unknown[0]!r} (the model takes {features})", [i, unknown[0]])
            missing = [f for f in features if f not in row]
            raise _bad(f"row {i}: feature {missing[0]!r} is missing", [i, missing[0]])
        out.append([row[f] for f in features])
    return out


def inputs_to_matrix(inputs: list[Any], features: list[str], *, max_rows: int) -> np.ndarray:
    """Rows (lists, or objects keyed by feature name) -> float32 matrix, or an error naming the cell."""
    if not inputs:
        raise _bad("inputs is empty: send at least one row", [])
    if len(inputs) > max_rows:
        raise PayloadTooLarge(f"{len(inputs)} rows in one request, the limit is {max_rows}")
    rows = _objects_to_rows(inputs, features) if isinstance(inputs[0], dict) else inputs
    width = len(features)
    try:
        matrix = np.array(rows)
    except ValueError:  # ragged
        raise _explain(rows, width) from None
    if matrix.dtype == object and matrix.ndim == 2:  # ints beyond int64, or a null among numbers
        if not all(_is_number(value) for row in rows for value in row):
            raise _explain(rows, width)  # astype would read None as NaN
        try:
            matrix = matrix.astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            raise _explain(rows, width) from None
    if matrix.dtype.kind not in "iuf" or matrix.ndim != 2 or matrix.shape[1] != width:
        raise _explain(rows, width)
    if any(type(value) is bool for row in rows for value in row):  # numpy reads True as 1 beside numbers
        raise _explain(rows, width)
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, reported just below
        matrix = matrix.astype(np.float32)
    bad = np.argwhere(~np.isfinite(matrix))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise _bad(f"row {i}, column {j}: {rows[i][j]} is not a finite number", [i, j])
    return matrix
