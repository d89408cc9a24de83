"""The shapes a prediction request and its answer can take: JSON, ``.npy`` and CSV.

Each parser turns raw bytes into a float32 matrix checked for width, row count and
finiteness, or raises an error naming the field, row and column. None of them evaluates
what it reads: JSON is parsed as data, ``.npy`` headers are read by numpy's literal-only
header parser and object dtypes are refused (never ``allow_pickle``), CSV cells are numbers
or errors.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from trainserve.datasets.tables import SNIFF_BYTES, sniff_decimal, sniff_delimiter
from trainserve.errors import InvalidInput, PayloadTooLarge
from trainserve.serving.aliases import ALIAS_PATTERN
from trainserve.serving.predictor import (
    Outcome,
    Predictor,
    RawRows,
    check_finite,
    column_to_raw,
    inputs_to_matrix,
    inputs_to_raw,
)
from trainserve.training.features import FeaturePlan
from trainserve.wire import MISSING_TOKENS, prediction_columns

_ALIAS = re.compile(ALIAS_PATTERN)
_JSON_FIELDS = ("model_id", "name", "version", "inputs", "alias")


def _bad_body(msg: str, field: str | None = None) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": ["body", field] if field else ["body"], "msg": msg}])


@dataclass(frozen=True)
class ModelSelector:
    """Which model answers: an id, or a name with an optional version or alias (else the
    ``production`` alias's version, else the newest)."""

    model_id: str | None = None
    name: str | None = None
    version: int | None = None
    alias: str | None = None

    def checked(self) -> ModelSelector:
        if (self.model_id is None) == (self.name is None):
            raise _bad_body("name the model with either model_id, or name (and optionally version)", "model_id")
        if self.version is not None and self.version < 1:
            raise _bad_body("version must be a positive integer", "version")
        if self.version is not None and self.name is None:
            raise _bad_body("version goes with name, not with model_id", "version")
        if self.alias is not None:
            if self.name is None:
                raise _bad_body("alias goes with name, not with model_id", "alias")
            if self.version is not None:
                raise _bad_body("name the model by version or by alias, not both", "alias")
            if not _ALIAS.fullmatch(self.alias):
                raise _bad_body(
                    "alias must be lowercase letters, digits, '_' or '-', starting with a letter, at most 32", "alias"
                )
        return self


@dataclass(frozen=True)
class JsonRequest:
    selector: ModelSelector
    inputs: list[Any]
    may_hold_booleans: bool


def parse_json_request(body: bytes) -> JsonRequest:
    """``{"model_id" | "name" [+ "version"], "inputs": [...]}`` -> its parts, checked."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses NaN literals and integers beyond 64 bits; Python's parser takes both,
        # so that the inputs check below can name the row and column of such a value.
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _bad_body(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _bad_body("the body must be a JSON object with model_id (or name) and inputs")
    for key in data:
        if key not in _JSON_FIELDS:
            raise _bad_body(f"unknown field {key!r} (expected {', '.join(_JSON_FIELDS)})", str(key))
    model_id, name, version, inputs, alias = (data.get(key) for key in _JSON_FIELDS)
    for key, value in (("model_id", model_id), ("name", name), ("alias", alias)):
        if value is not None and not isinstance(value, str):
            raise _bad_body(f"{key} must be a string", key)
    if version is not None and (type(version) is not int or version < 1):
        raise _bad_body("version must be a positive integer", "version")
    if not isinstance(inputs, list):
        raise _bad_body("inputs is required: a list of rows", "inputs")
    selector = ModelSelector(model_id, name, version, alias).checked()
    # A JSON boolean is the only value numpy takes silently (as 0/1) among numbers; if the
    # raw bytes hold no true/false token at all, no row can hold one.
    may_hold_booleans = b"true" in body or b"false" in body
    return JsonRequest(selector, inputs, may_hold_booleans)


def json_inputs_to_matrix(request: JsonRequest, predictor: Predictor, *, max_rows: int) -> np.ndarray | RawRows:
    """The request's rows as the model's input matrix; for a model with preprocessing, its raw
    layout with the warnings earned on the way (``RawRows``)."""
    disregarded = predictor.disregarded
    if predictor.preprocessing is not None:
        return inputs_to_raw(request.inputs, predictor.preprocessing, max_rows=max_rows, disregarded=disregarded)
    return inputs_to_matrix(
        request.inputs,
        predictor.features,
        max_rows=max_rows,
        may_hold_booleans=request.may_hold_booleans,
        disregarded=disregarded,
    )


def npy_to_matrix(body: bytes, predictor: Predictor, *, max_rows: int) -> np.ndarray:
    """A ``.npy`` body (1 row as shape (width,), or (rows, width)) -> float32 matrix.

    The header is checked against the body's exact size before any data is read; only
    plain integer and float dtypes are accepted (object arrays would need pickle).
    """
    stream = io.BytesIO(body)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {major}")
    except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
        raise _bad_body(f"the body is not a valid .npy array: {exc}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "iuf" or dtype.subdtype is not None:
        raise _bad_body(f".npy dtype {dtype.str!r} is not supported: send float32, float64 or integers")
    width = len(predictor.features)
    if len(shape) == 1:
        shape = (1, *shape)
    if len(shape) != 2 or shape[1] != width:
        raise _bad_body(f".npy shape {shape} does not fit the model: send (rows, {width})")
    if shape[0] == 0:
        raise _bad_body(".npy array is empty: send at least one row")
    if shape[0] > max_rows:
        raise PayloadTooLarge(f"{shape[0]} rows in one request, the limit is {max_rows}")
    offset = stream.tell()
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(body) - offset != expected:
        raise _bad_body(f".npy data is {len(body) - offset} bytes, its header {shape} {dtype.str} needs {expected}")
    flat = np.frombuffer(body, dtype=dtype, count=shape[0] * shape[1], offset=offset)
    matrix = flat.reshape(shape, order="F" if fortran_order else "C")
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, named just below
        # A fresh C-ordered float32 copy: the body's buffer is read-only and may be unaligned.
        matrix = np.ascontiguousarray(matrix, dtype=np.float32) if matrix.dtype != np.float32 else matrix.copy()
    if predictor.preprocessing is not None:
        # The raw layout (training.features): NaN is a blank; a code outside the vocabulary is unseen.
        check_finite(np.where(np.isnan(matrix), np.float32(0), matrix), from_file=True)  # infinities are still refused
        return matrix
    return check_finite(matrix, from_file=True)


@dataclass(frozen=True)
class CsvTable:
    """A CSV to predict: its rows as sent (echoed in the answer) and the feature matrix."""

    header: list[str]
    rows: list[list[str]]
    matrix: np.ndarray
    warnings: list[dict[str, Any]] | None = None  # a model with preprocessing: cells answered anyway


def csv_to_matrix(body: bytes, predictor: Predictor, *, max_rows: int) -> CsvTable:
    """A CSV with a header row holding (at least) the model's features, by name, in any order."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad_body(f"the CSV is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    # Read as an upload is read: the delimiter (',' ';' TAB '|') and a decimal comma sniffed.
    head = text[:SNIFF_BYTES]  # the sniffers sample the first rows; never copy a large body for them
    delimiter = sniff_delimiter(head)
    decimal = sniff_decimal(head, delimiter)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        records = [row for row in reader if row]
    except csv.Error as exc:
        raise _bad_body(f"the file is not valid CSV: {exc}") from None
    if not records:
        raise _bad_body("the CSV is empty: send a header row and at least one data row")
    header, rows = [name.strip() for name in records[0]], records[1:]
    if not rows:
        raise _bad_body("the CSV has a header but no data rows")
    if len(rows) > max_rows:
        raise PayloadTooLarge(f"{len(rows)} rows in one request, the limit is {max_rows}")
    missing = [f for f in predictor.features if f not in header]
    if missing:
        raise _bad_body(f"the CSV has no column {missing[0]!r} (the model takes {predictor.features})")
    for i, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise InvalidInput(
                f"row {i} has {len(row)} fields, the header has {len(header)}",
                errors=[{"loc": ["file", i], "msg": "wrong number of fields"}],
            )
    if predictor.preprocessing is not None:
        raw = csv_rows_to_raw(header, rows, predictor.preprocessing, decimal)
        return CsvTable(header, rows, raw.matrix, raw.warnings)
    columns = []
    for feature in predictor.features:
        j = header.index(feature)
        strings = [row[j].strip() for row in rows]
        try:
            columns.append(np.array([_point(s, decimal) for s in strings], dtype=np.float64))
        except ValueError:
            at = next(i for i, s in enumerate(strings) if not _is_float(_point(s, decimal)))
            msg = f"row {at + 1}, column {feature!r}: {strings[at]!r} is not a number"
            raise InvalidInput(msg, errors=[{"loc": ["file", at + 1, feature], "msg": msg}]) from None
    with np.errstate(over="ignore"):
        matrix = np.stack(columns, axis=1).astype(np.float32)
    if not np.isfinite(matrix).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(matrix))[0])
        msg = f"row {i + 1}, column {predictor.features[j]!r}: {rows[i][header.index(predictor.features[j])]!r} "
        msg += "is not a finite number"
        raise InvalidInput(msg, errors=[{"loc": ["file", i + 1, predictor.features[j]], "msg": msg}])
    return CsvTable(header, rows, matrix)


def _point(text: str, decimal: str) -> str:
    """A number's text with a decimal point, where the file writes a decimal comma."""
    return text.replace(",", ".") if decimal == "," else text


def csv_rows_to_raw(header: list[str], rows: list[list[str]], plan: FeaturePlan, decimal: str = ".") -> RawRows:
    """CSV cells -> a preprocessed model's raw layout; blanks allowed, numbers converted per
    distinct text, categories looked up with numpy. Rows are named as in the file, from 1."""
    matrix = np.empty((len(rows), len(plan.columns)), dtype=np.float32)
    warnings: list[dict[str, Any]] = []

    def where(i: int) -> tuple[Any, list[Any]]:
        return i + 1, ["file", i + 1]

    blank_tokens = np.array(sorted(MISSING_TOKENS))
    for j, column in enumerate(plan.columns):
        at = header.index(column.name)
        strings = np.array([row[at].strip() for row in rows], dtype=np.str_)
        blank = np.isin(strings, blank_tokens)
        if column.kind == "category" and column.level_type == "text":
            values = np.where(blank, "", strings)
        else:
            distinct, inverse = np.unique(np.where(blank, "", strings), return_inverse=True)
            numbers = np.empty(len(distinct))
            for k, text in enumerate(distinct.tolist()):
                try:
                    numbers[k] = float(_point(text, decimal)) if text else np.nan
                except ValueError:
                    i = int(np.flatnonzero(inverse == k)[0])
                    msg = f"row {i + 1}, column {column.name!r}: {text!r} is not a number"
                    raise InvalidInput(msg, errors=[{"loc": ["file", i + 1, column.name], "msg": msg}]) from None
            values = numbers[inverse]
            bad = np.flatnonzero(~blank & (~np.isfinite(values) | (np.abs(values) > _FLOAT32_MAX)))
            if len(bad):
                i = int(bad[0])
                problem = "is out of float32 range" if np.isfinite(values[i]) else "is not a finite number"
                msg = f"row {i + 1}, column {column.name!r}: {strings[i]!r} {problem}"
                raise InvalidInput(msg, errors=[{"loc": ["file", i + 1, column.name], "msg": msg}])
        matrix[:, j], found = column_to_raw(column, values, blank, where)
        warnings += found
    return RawRows(matrix, warnings)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- answers ---------------------------------------------------------------------------------


def encode_json(predictor: Predictor, outcome: Outcome, warnings: list[dict[str, Any]] | None = None) -> bytes:
    predictions = outcome.predictions
    body: dict[str, Any] = {
        "model_id": predictor.model_id,
        "name": predictor.name,
        "version": predictor.version,
        # orjson writes numeric arrays itself; text labels go through Python strings.
        "predictions": predictions.tolist() if predictions.dtype.kind in "UO" else predictions,
        "probabilities": outcome.probabilities,
        "classes": predictor.classes,
    }
    if predictor.preprocessing is not None:
        body["warnings"] = warnings or []
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_csv(table: CsvTable, predictor: Predictor, outcome: Outcome) -> bytes:
    """The rows as sent, each followed by its prediction (and class probabilities)."""
    predictions = outcome.predictions.reshape(len(table.rows), -1)
    parts = [predictions.astype(str)]  # numpy writes the shortest text that reads back the same
    if outcome.probabilities is not None:
        parts.append(outcome.probabilities.astype(str))
    extra = np.concatenate(parts, axis=1).tolist()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = prediction_columns(predictor.targets, predictor.classes)
    if table.warnings is not None:
        # A model with preprocessing: one more column saying what each row was answered despite.
        notes: list[list[str]] = [[] for _ in table.rows]
        for warning in table.warnings:
            notes[warning["row"] - 1].append(f"{warning['column']}: {warning['message']}")
        extra = [[*added, "; ".join(note)] for added, note in zip(extra, notes, strict=True)]
        columns = [*columns, "warnings"]
    writer.writerow(table.header + columns)
    writer.writerows(row + added for row, added in zip(table.rows, extra, strict=True))
    return out.getvalue().encode()
