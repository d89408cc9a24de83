"""Columns to features: imputation, missing indicators and one-hot categories, fitted on the
training split and saved with the model as JSON (no pickle).

Two layouts:

- the **raw layout** is what a caller (``/predict``, an exported program) hands the model:
  one float32 column per feature, in the model's feature order. A number is its value or
  NaN when missing; a boolean 0/1 or NaN; a category is the index of its level in the
  sorted vocabulary, NaN when missing, -1 when the level was never seen in training.
- the **encoded layout** is what the network takes: every number column (blanks filled),
  then one missing-indicator per number column that had blanks in training, then each
  one-hot category's block (its levels in vocabulary order, then a blank level when
  training had blanks; an unseen level, or a blank the model never saw, is all zeros), then
  one level-index column per embedded category (``network.Embeddings`` turns each into its
  trained vector before the scaler: rows are the levels, then unknown, then blank).

``network.FeatureEncoder`` maps raw to encoded with a fixed handful of tensor operations (no
data-dependent control flow, so it traces and exports), and training encodes the whole
table once with it into the float32 matrix the loop already uses. A clean numeric table
needs no encoder at all (``FeaturePlan.is_identity``): it trains exactly as before.

Knows numpy; no torch (the encoder, a torch module, is ``network.FeatureEncoder``), no HTTP,
no SQL: the API process validates and reads rows with it before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from trainserve.datasets.tables import Table
from trainserve.errors import InvalidInput
from trainserve.training import spec as S

FORMAT = 1
_SAMPLE_ROWS = 5  # rows named in an error message


def _fail(msg: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])


@dataclass(frozen=True)
class ColumnPlan:
    """One feature column's fitted preprocessing (JSON-ready via ``asdict``)."""

    name: str
    kind: Literal["number", "boolean", "category"]
    missing: str  # median, mean, constant, drop_row, error; "level" for a category's default
    fill_value: float | str | None  # numbers: the imputed value; categories: a label blanks become, if any
    indicator: bool = False  # numbers: a 0/1 column saying "this was blank"
    encoding: str | None = None  # categories: one_hot
    levels: list[Any] = field(default_factory=list)  # categories: the sorted vocabulary
    level_type: Literal["text", "number"] | None = None
    blank_level: bool = False  # categories: blanks were seen in training and have their own slot
    embedding_dim: int | None = None  # categories with encoding "embedding"

    @property
    def embedded(self) -> bool:
        return self.kind == "category" and self.encoding == "embedding"

    @property
    def width(self) -> int:
        """Columns in the encoded layout (an embedded category is one column: its level index)."""
        if self.embedded:
            return 1
        if self.kind == "category":
            return len(self.levels) + int(self.blank_level)
        return 1 + int(self.indicator)

    @property
    def embedding(self) -> tuple[int, int] | None:
        """(rows, dim) of an embedded category's table: its levels, then unknown, then blank."""
        if not self.embedded:
            return None
        assert self.embedding_dim is not None
        return len(self.levels) + 2, self.embedding_dim


@dataclass(frozen=True)
class FeaturePlan:
    columns: list[ColumnPlan]
    # The training table's other columns, neither features nor targets (declared "ignore", or
    # left out of an explicit features list): a JSON /predict row may carry them, and they are
    # disregarded, as when a user sends back whole rows as uploaded. Empty in plans saved before
    # this was recorded, whose models keep refusing such columns.
    ignored: list[str] = field(default_factory=list)

    @property
    def features(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def embeddings(self) -> list[tuple[int, int]]:
        """The embedding tables, in the order of their index columns (last in the encoded layout)."""
        return [c.embedding for c in self.columns if c.embedding is not None]

    @property
    def net_width(self) -> int:
        """The network's input width: the encoded layout with each index column as its embedding."""
        return self.width + sum(dim - 1 for _, dim in self.embeddings)

    @property
    def is_identity(self) -> bool:
        """Encoding changes nothing: every feature a number without blanks in training."""
        return all(c.kind == "number" and not c.indicator for c in self.columns)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "columns": [asdict(c) for c in self.columns],
            "encoded_width": self.width,
            "ignored": list(self.ignored),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeaturePlan:
        return cls([ColumnPlan(**c) for c in data["columns"]], list(data.get("ignored", [])))

    def export_layout(self) -> dict[str, Any]:
        """The raw layout and the vocabularies, for ``trainserve.json`` in an export."""
        return {
            "raw_layout": [
                {
                    "column": c.name,
                    "kind": c.kind,
                    "encoding": c.encoding,
                    "value": "level index in 'levels', NaN when blank, -1 when unseen"
                    if c.kind == "category"
                    else "the number, NaN when blank",
                    **({"levels": c.levels} if c.kind == "category" else {}),
                }
                for c in self.columns
            ],
            "encoded_width": self.width,
        }


# -- missing values ----------------------------------------------------------------------------


def is_blank(values: np.ndarray) -> np.ndarray:
    """Missing cells of a column as the table holds them: NaN for numbers, "" for text."""
    if values.dtype.kind == "U":
        return np.asarray(values == "")
    if values.dtype.kind == "f":
        return np.asarray(np.isnan(values))
    return np.zeros(len(values), dtype=bool)


def _rows_text(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r) + 1) for r in rows[:_SAMPLE_ROWS])
    return f"rows {shown}{' and more' if len(rows) > _SAMPLE_ROWS else ''}"


def as_numbers(name: str, values: np.ndarray) -> np.ndarray:
    """A column as float64 with NaN for blanks; text that is not a number is an error naming its rows.

    Text is converted per distinct value, not per cell."""
    if values.dtype.kind != "U":
        return values.astype(np.float64)
    distinct, inverse = np.unique(values, return_inverse=True)
    converted = np.empty(len(distinct))
    bad = []
    for i, text in enumerate(distinct.tolist()):
        stripped = text.strip()
        if not stripped:
            converted[i] = math.nan
            continue
        try:
            converted[i] = float(stripped)
        except ValueError:
            bad.append(i)
    if bad:
        rows = np.flatnonzero(np.isin(inverse, bad))
        samples = ", ".join(repr(str(distinct[i])) for i in bad[:3])
        msg = (
            f"columns.{name}: type 'number' but {_rows_text(rows)} hold text ({samples}): "
            "fix those cells, or treat the column as a category"
        )
        raise _fail(msg, ["columns", name, "type"])
    return converted[inverse]


def check_numbers(table: Table, spec: S.TrainSpec) -> None:
    """Refuse a spec that asks 'number' of a text column holding words, naming their rows."""
    for name, override in (spec.columns or {}).items():
        if override.type == "number" and name in table.names and table.column(name).dtype.kind == "U":
            as_numbers(name, table.column(name))


# -- fitting -----------------------------------------------------------------------------------


def _inferred_kind(values: np.ndarray) -> Literal["number", "boolean", "category"]:
    if values.dtype.kind == "U":
        return "category"
    return "number"


def _fit_column(name: str, values: np.ndarray, override: S.ColumnSpec | None, max_levels: int) -> ColumnPlan:
    """``values``: the column's training rows only."""
    kind = override.type if override is not None and override.type is not None else _inferred_kind(values)
    assert kind != "ignore"
    strategy = override.missing if override is not None else None
    constant = override.fill_value if override is not None else None
    if kind == "category":
        blanks = is_blank(values)
        present = values[~blanks]
        if values.dtype.kind == "U":
            level_type: Literal["text", "number"] = "text"
            levels: list[Any] = np.unique(present).tolist()
        else:
            level_type = "number"
            levels = [float(v) for v in np.unique(present.astype(np.float64))]
        if strategy == "constant" and constant is not None and constant not in levels:
            levels = sorted([*levels, constant])
        if len(levels) > max_levels:
            raise _fail(
                f"column {name!r} has {len(levels)} distinct values in training, the limit is {max_levels} "
                f"(TRAINSERVE_CATEGORY_LIMIT): ignore it or treat it as a number",
                ["columns", name],
            )
        if not levels:
            raise _fail(f"column {name!r} is blank in every training row: ignore it", ["columns", name])
        blank_level = bool(blanks.any()) and strategy in (None,)
        embedded = S.wants_embedding(override, len(levels))
        dim = None
        if embedded:
            dim = override.embedding_dim if override is not None and override.embedding_dim else None
            dim = dim or S.embedding_dim(len(levels))
        return ColumnPlan(
            name,
            "category",
            strategy or "level",
            constant,
            encoding="embedding" if embedded else "one_hot",
            levels=levels,
            level_type=level_type,
            blank_level=blank_level,
            embedding_dim=dim,
        )
    numbers = as_numbers(name, values)
    blanks = np.isnan(numbers)
    present = numbers[~blanks]
    if len(present) == 0:
        raise _fail(f"column {name!r} is blank in every training row: ignore it", ["columns", name])
    strategy = strategy or "median"
    if strategy == "mean":
        fill = float(present.mean())
    elif strategy == "constant":
        assert isinstance(constant, int | float)
        fill = float(constant)
    else:  # median; drop_row and error keep a median for blanks that arrive at prediction
        fill = float(np.median(present))
    indicator = bool(blanks.any()) and strategy in ("median", "mean", "constant")
    return ColumnPlan(name, kind, strategy, fill, indicator=indicator)


def fit(
    table: Table, features: list[str], spec: S.TrainSpec, train_rows: np.ndarray, *, max_levels: int
) -> FeaturePlan:
    """Fit each feature's preprocessing on ``train_rows`` of the table."""
    overrides = spec.columns or {}
    return FeaturePlan(
        [_fit_column(name, table.column(name)[train_rows], overrides.get(name), max_levels) for name in features]
    )


def rows_to_drop(table: Table, features: list[str], targets: list[str], spec: S.TrainSpec) -> dict[str, np.ndarray]:
    """Rows that cannot train, by reason: a blank target, or a blank in a 'drop_row' column.
    A blank in an 'error' column is refused, naming its rows."""
    drop: dict[str, np.ndarray] = {}
    blank_target = np.zeros(table.n_rows, dtype=bool)
    for name in targets:
        blank_target |= is_blank(table.column(name))
    drop["blank target"] = blank_target
    dropped = np.zeros(table.n_rows, dtype=bool)
    for name, override in (spec.columns or {}).items():
        if name not in features or override.missing not in ("drop_row", "error"):
            continue
        blanks = is_blank(table.column(name))
        if override.missing == "error" and blanks.any():
            msg = f"columns.{name}: missing is 'error' and {_rows_text(np.flatnonzero(blanks))} are blank"
            raise _fail(msg, ["columns", name, "missing"])
        dropped |= blanks
    drop["blank in a drop_row column"] = dropped & ~blank_target
    return drop


# -- the raw layout ----------------------------------------------------------------------------


def level_index(column: ColumnPlan, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Category values -> (raw codes: level index, NaN blank, -1 unseen; the unseen mask).

    ``values``: text (``""`` blank) for a text vocabulary, float64 (NaN blank) for a numeric one."""
    if column.level_type == "text":
        vocabulary = np.asarray(column.levels, dtype=np.str_)
        values = values.astype(np.str_) if values.dtype.kind != "U" else values
    else:
        vocabulary = np.asarray(column.levels, dtype=np.float64)
        values = values.astype(np.float64)
    blanks = is_blank(values)
    if column.missing == "constant" and column.fill_value is not None:
        fill = np.asarray([column.fill_value], dtype=vocabulary.dtype)
        values = np.where(blanks, fill, values)
        blanks = np.zeros(len(values), dtype=bool)
    at = np.searchsorted(vocabulary, values)
    found = vocabulary[np.minimum(at, len(vocabulary) - 1)] == values
    codes = np.where(found, at, -1).astype(np.float32)
    codes[blanks] = np.nan
    return codes, ~found & ~blanks


def raw_matrix(plan: FeaturePlan, columns: list[np.ndarray]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Feature columns (as a table holds them, in plan order) -> (raw layout float32, unseen
    masks by column position). Numbers are cast, categories looked up with np.searchsorted."""
    out = np.empty((len(columns[0]) if columns else 0, len(plan.columns)), dtype=np.float32)
    unseen: dict[int, np.ndarray] = {}
    for j, (column, values) in enumerate(zip(plan.columns, columns, strict=True)):
        if column.kind == "category":
            codes, mask = level_index(column, values)
            out[:, j] = codes
            if mask.any():
                unseen[j] = mask
        else:
            with np.errstate(over="ignore"):
                out[:, j] = as_numbers(column.name, values)
    return out, unseen


def encode_table(plan: FeaturePlan, table: Table, rows: np.ndarray | None = None) -> np.ndarray:
    """The whole table (or ``rows`` of it) in the encoded layout, as one float32 matrix: what
    ``network.FeatureEncoder`` computes from the raw layout, written column by column with numpy (a
    one-hot block is one scatter of ones, not a comparison per level: 500,000 rows with 56
    encoded columns took 4 s through the encoder's torch operations on a loaded 2-core machine,
    well under 1 s this way). Selections and comparisons only, so the values are the same bits
    as the encoder's (tests/training/test_features.py checks it)."""
    columns = [table.column(name) if rows is None else table.column(name)[rows] for name in plan.features]
    raw, _ = raw_matrix(plan, columns)
    out = np.zeros((len(raw), plan.width), dtype=np.float32)
    # A block of rows at a time, so that the block being written stays in the CPU's caches
    # (column by column over the whole matrix, every column pass wrote every cache line again).
    for start in range(0, len(raw), _ENCODE_BLOCK_ROWS):
        stop = min(start + _ENCODE_BLOCK_ROWS, len(raw))
        _encode_block(plan, raw[start:stop], out[start:stop])
    return out


_ENCODE_BLOCK_ROWS = 8_192


def _encode_block(plan: FeaturePlan, raw: np.ndarray, out: np.ndarray) -> None:
    numbers = [(j, c) for j, c in enumerate(plan.columns) if c.kind != "category"]
    at = 0
    for j, c in numbers:
        blank = np.isnan(raw[:, j])
        out[:, at] = np.where(blank, np.float32(c.fill_value or 0.0), raw[:, j])
        at += 1
    for j, c in numbers:
        if c.indicator:
            out[:, at] = np.isnan(raw[:, j])
            at += 1
    every = np.arange(len(raw))
    for j, c in enumerate(plan.columns):
        if c.kind != "category" or c.embedded:
            continue
        codes = raw[:, j]
        blank = np.isnan(codes)
        known = ~blank & (codes >= 0) & (codes < len(c.levels))
        out[every[known], at + codes[known].astype(np.int64)] = 1.0
        if c.blank_level:
            out[blank, at + len(c.levels)] = 1.0
        at += c.width
    for j, c in enumerate(plan.columns):
        if c.embedded:
            codes = raw[:, j]
            unknown, blank_row = len(c.levels), len(c.levels) + int(c.blank_level)
            outside = (codes < 0) | (codes >= unknown)
            out[:, at] = np.where(np.isnan(codes), blank_row, np.where(outside, unknown, codes))
            at += 1


# -- a table made ready to train -----------------------------------------------------------------


@dataclass
class Prepared:
    """What the worker hands the training loop, and what it saves beside the weights."""

    plan: S.TrainingPlan  # in_features and n_parameters are the fitted encoding's
    features: FeaturePlan
    x: np.ndarray  # float32, the encoded layout (the raw one for an identity plan)
    y: np.ndarray
    split: Any  # training.loop.Split
    notes: list[str]


def _targets(table: Table, plan: S.TrainingPlan, keep: np.ndarray | None) -> np.ndarray:
    if plan.task == "regression":
        y = table.matrix(plan.targets, dtype=np.float64)
        return y if keep is None else y[keep]
    column = table.column(plan.targets[0])
    return column if keep is None else column[keep]


def prepare(
    table: Table, spec: S.TrainSpec, plan: S.TrainingPlan, limits: S.Limits, inherited: FeaturePlan | None = None
) -> Prepared:
    """Drop the rows that cannot train, split, fit the preprocessing on the training rows
    (or take ``inherited``, a warm start's parent's), and encode the whole table once into
    the float32 matrix the loop trains on."""
    from trainserve.training import loop  # the loop imports the network; this module stays below it

    check_numbers(table, spec)
    notes: list[str] = []
    dropped = np.zeros(table.n_rows, dtype=bool)
    for reason, mask in rows_to_drop(table, plan.features, plan.targets, spec).items():
        if mask.any():
            notes.append(f"{int(mask.sum())} row(s) of {table.n_rows} dropped: {reason}")
            dropped |= mask
    keep = np.flatnonzero(~dropped) if dropped.any() else None
    y = _targets(table, plan, keep)
    labels = None
    if plan.task != "regression":
        labels = loop.encode_targets(y, plan.task, plan.classes).numpy().reshape(-1).astype(np.int64)
    split = loop.split_rows(spec, len(y), labels)
    if plan.classes is not None and len(split.train) < len(plan.classes):
        raise _fail(
            f"the split leaves {len(split.train)} training row(s), fewer than the {len(plan.classes)} classes",
            ["split" if spec.split is not None else "validation_split"],
        )
    if len(split.train) == 0:
        raise _fail("the split leaves no training rows", ["validation_split"])
    train_in_table = split.train if keep is None else keep[split.train]
    if inherited is not None:
        fitted = inherited
    else:
        fitted = fit(table, plan.features, spec, train_in_table, max_levels=limits.max_category_levels)
    # This table's unused columns (a warm start's parent may have been trained on another table).
    used = {*plan.features, *plan.targets}
    fitted = dataclasses.replace(fitted, ignored=[name for name in table.names if name not in used])
    if fitted.is_identity:
        x = table.matrix(plan.features)
        x = x if keep is None else x[keep]
    else:
        x = encode_table(fitted, table, keep)
        described = ", ".join(
            f"{c.name} ({c.kind}{', ' + str(len(c.levels)) + ' levels' if c.kind == 'category' else ''}"
            f"{', embedding of ' + str(c.embedding_dim) if c.embedded else ''}"
            f"{', missing indicator' if c.indicator else ''})"
            for c in fitted.columns
            if c.kind == "category" or c.indicator
        )
        notes.append(f"preprocessing: {len(plan.features)} columns -> {fitted.width} features; {described}")
    n_parameters, _ = S.count_parameters(spec.model, fitted.net_width)
    n_parameters += sum(rows * dim for rows, dim in fitted.embeddings)
    if n_parameters > limits.max_parameters:
        raise _fail(
            f"the model has {n_parameters:,} parameters with the encoded columns, the limit is "
            f"{limits.max_parameters:,}",
            ["model"],
        )
    resolved = dataclasses.replace(
        plan, in_features=fitted.net_width, n_parameters=n_parameters, embeddings=tuple(fitted.embeddings)
    )
    return Prepared(resolved, fitted, x, y, split, notes)
