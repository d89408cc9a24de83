"""Parse and validate uploaded tables (CSV and other delimited text, Parquet, NPZ) into
typed columns, a schema and a profile per column.

The data contract (training and serving rely on it):

- a numeric column is ``float64`` with NaN for a missing value, or ``int64`` when it has none;
- a boolean column (true/false, True/False, TRUE/FALSE; 0/1 stays an integer column) is
  ``float64`` 0.0/1.0 with NaN for missing;
- a category (text) column is numpy unicode with ``""`` for missing;
- ``inf``/``-inf`` in a file is refused (not finite); a missing number is NaN, never refused.

Errors name the row ("row N" counts data rows from 1) or the physical line (encoding).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import mmap
import os
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import numpy as np

from trainserve.errors import InvalidInput

# pyarrow is imported in the functions that parse or profile a file: it took 0.1-0.3 s of
# every start of the API and the workers, which import this module for its schema classes.
if TYPE_CHECKING:
    import pyarrow as pa

ColumnType = Literal["int64", "float64", "string"]
Kind = Literal["number", "integer", "boolean", "category"]
Format = Literal["csv", "npz", "parquet"]

# Beyond this many distinct values a column is not offered as class labels.
MAX_CLASSES = 1000
MAX_COLUMNS = 10_000
# A text column with more distinct values than this gets a high-cardinality warning
# (the service passes Settings.category_limit).
DEFAULT_CATEGORY_LIMIT = 1000
TOP_VALUES = 10
_MATRIX_BLOCK_ROWS = 16_384  # x 32 float32 features: 2 MiB, a cache-sized block
_RELEASE_EVERY_BLOCKS = 4
# Below this many rows a table is profiled column after column: threads would cost more.
_PARALLEL_PROFILE_ROWS = 50_000
# A would-be target: few classes; one of them under 1% of the rows or under 5 rows is rare.
_TARGET_MAX_CLASSES = 20
_RARE_SHARE = 0.01
_RARE_ROWS = 5
_ID_MIN_ROWS = 10

_KIND_OF_DTYPE: dict[str, Kind] = {"string": "category", "int64": "integer", "float64": "number"}
_UNSET = cast(Kind, "")  # ColumnInfo(name, dtype, classes) derives its kind from the dtype


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    dtype: ColumnType
    classes: list[Any] | None = None  # sorted distinct non-missing values, when they can be class labels
    kind: Kind = _UNSET
    missing: int = 0
    profile: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable; {} for old records

    def __post_init__(self) -> None:
        if self.kind == _UNSET:
            object.__setattr__(self, "kind", _KIND_OF_DTYPE[self.dtype])

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "classes": self.classes,
            "kind": self.kind,
            "missing": self.missing,
            "profile": self.profile,
        }


@dataclass(frozen=True)
class TableSchema:
    n_rows: int
    columns: list[ColumnInfo]

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    @classmethod
    def from_dicts(cls, n_rows: int, columns: list[dict[str, Any]]) -> TableSchema:
        """Also reads records stored before kinds and profiles existed (kind from dtype, nothing missing)."""
        return cls(
            n_rows,
            [
                ColumnInfo(
                    c["name"],
                    c["dtype"],
                    c.get("classes"),
                    c.get("kind") or _KIND_OF_DTYPE[c["dtype"]],
                    int(c.get("missing") or 0),
                    c.get("profile") or {},
                )
                for c in columns
            ],
        )


@dataclass
class Table:
    names: list[str]
    columns: list[np.ndarray]
    # Columns memory-mapped from a stored file: index -> (the mapping, byte offset, byte length).
    mapped: dict[int, tuple[mmap.mmap, int, int]] = field(default_factory=dict, repr=False, compare=False)
    # What the parser learnt that the arrays alone don't say (a boolean is float64 like a number;
    # a mixed column's stray words); empty for stored tables, whose kinds come from the dtype.
    kinds: dict[str, Kind] = field(default_factory=dict, repr=False, compare=False)
    stray: dict[str, list[tuple[int, str]]] = field(default_factory=dict, repr=False, compare=False)
    delimiter: str | None = field(default=None, compare=False)
    decimal: str | None = field(default=None, compare=False)

    @property
    def n_rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def column(self, name: str) -> np.ndarray:
        return self.columns[self.names.index(name)]

    def matrix(self, names: list[str], dtype: type = np.float32) -> np.ndarray:
        """The named numeric columns side by side, as one C-contiguous array.

        Filled a block of rows at a time, so that the block being written stays in the CPU's
        caches (column by column, each pass over a 1M x 32 matrix wrote every cache line of
        it again), with blocks spread over the cores (numpy copies without the GIL):
        measured at 1M x 32, 0.6 s column by column, 0.11 s by blocks, 0.07 s on 2 cores,
        against a 2.5 s epoch. Mapped columns' pages are released behind the blocks."""
        out: np.ndarray = np.empty((self.n_rows, len(names)), dtype=dtype)
        indices = [self.names.index(name) for name in names]
        n = self.n_rows
        threads = max(1, min(os.cpu_count() or 1, 8, n // _MATRIX_BLOCK_ROWS))
        span = -(-n // threads)

        def fill(first: int) -> None:
            # One contiguous span of rows per thread, its mapped pages released every few
            # blocks: releasing costs every core a TLB flush, too dear after every block.
            last = min(first + span, n)
            released = first
            for k, start in enumerate(range(first, last, _MATRIX_BLOCK_ROWS), start=1):
                stop = min(start + _MATRIX_BLOCK_ROWS, last)
                block = out[start:stop]
                for j, index in enumerate(indices):
                    block[:, j] = self.columns[index][start:stop]
                if k % _RELEASE_EVERY_BLOCKS == 0 or stop == last:
                    for index in indices:
                        self._release(index, released, stop)
                    released = stop

        if threads == 1:
            fill(0)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fill, range(0, n, span)))
        return out

    def _release(self, index: int, start_row: int = 0, stop_row: int | None = None) -> None:
        """Drop the pages of a mapped column's rows [start_row, stop_row) that lie wholly
        inside them from this process; the OS page cache keeps them, and reading them again
        maps them back. Once copied into a matrix they would only double the job's memory."""
        if index not in self.mapped or not hasattr(mmap, "MADV_DONTNEED"):
            return
        mapping, offset, length = self.mapped[index]
        itemsize = self.columns[index].itemsize
        first = offset + start_row * itemsize
        last = offset + (length if stop_row is None else min(length, stop_row * itemsize))
        if start_row > 0:  # the page it starts in may hold the previous block's rows
            first += -first % mmap.PAGESIZE
        else:
            first -= first % mmap.PAGESIZE
        if stop_row is not None and stop_row < self.n_rows:  # and the page it ends in, the next block's
            last -= last % mmap.PAGESIZE
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def schema(self, *, category_limit: int = DEFAULT_CATEGORY_LIMIT) -> TableSchema:
        """Every column described, columns spread over the cores (numpy sorts without the GIL)."""

        def one(index: int) -> ColumnInfo:
            name = self.names[index]
            info = describe(name, self.columns[index], self.kinds.get(name), self.stray.get(name, []), category_limit)
            self._release(index)
            return info

        threads = max(1, min(os.cpu_count() or 1, 8, len(self.names)))
        if threads == 1 or self.n_rows < _PARALLEL_PROFILE_ROWS:
            return TableSchema(self.n_rows, [one(i) for i in range(len(self.names))])
        with ThreadPoolExecutor(threads) as pool:
            return TableSchema(self.n_rows, list(pool.map(one, range(len(self.names)))))


def _bad(msg: str, **where: Any) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": ["file"], "msg": msg, **where}])


def _missing_mask(values: np.ndarray) -> np.ndarray | None:
    if values.dtype.kind == "U":
        return np.asarray(values == "", dtype=bool)
    if values.dtype.kind == "f":
        return np.asarray(np.isnan(values), dtype=bool)
    return None


def _dtype_of(values: np.ndarray) -> ColumnType:
    return "string" if values.dtype.kind == "U" else "int64" if values.dtype.kind in "iub" else "float64"


def _number(value: Any) -> int | float:
    """A JSON-friendly number: an int when whole and exact."""
    as_float = float(value)
    return int(as_float) if as_float.is_integer() and abs(as_float) <= 2**53 else as_float


def describe(
    name: str,
    values: np.ndarray,
    kind: Kind | None = None,
    stray: list[tuple[int, str]] | None = None,
    category_limit: int = DEFAULT_CATEGORY_LIMIT,
) -> ColumnInfo:
    """A column's schema entry: dtype, class labels, kind, missing count and profile."""
    dtype = _dtype_of(values)
    kind = kind or _KIND_OF_DTYPE[dtype]
    n_rows = len(values)
    mask = _missing_mask(values)
    present = values[~mask] if mask is not None and mask.any() else values
    n_missing = n_rows - len(present)
    if dtype == "string":
        distinct, unique, counts = _text_counts(present)
    else:
        distinct, unique, counts = _number_counts(present)
    classes: list[Any] | None = None
    if distinct <= MAX_CLASSES and len(present):
        assert unique is not None
        if dtype == "string":
            classes = unique.tolist()
        elif dtype == "int64" or (np.all(np.mod(unique, 1) == 0) and np.abs(unique).max() <= 2**53):
            classes = [int(v) for v in unique]
    profile: dict[str, Any] = {
        "kind": kind,
        "missing": n_missing,
        "missing_share": round(n_missing / n_rows, 6) if n_rows else 0.0,
        "distinct": distinct,
    }
    if kind == "category":
        profile["top"] = [{"value": v, "count": c} for v, c in counts[:TOP_VALUES]]
    elif len(present):
        assert unique is not None
        profile["min"], profile["max"] = _number(unique[0]), _number(unique[-1])
        profile["mean"] = float(np.mean(present))
    if kind == "boolean":
        profile["top"] = [{"value": bool(v), "count": c} for v, c in counts]
    profile["warnings"] = _warnings(name, kind, n_rows, n_missing, distinct, counts, stray or [], category_limit)
    return ColumnInfo(name, dtype, classes, kind, n_missing, profile)


def _most_frequent_first(pairs: Any) -> list[tuple[Any, int]]:
    return sorted(pairs, key=lambda vc: (-vc[1], str(vc[0])))


def _text_counts(present: np.ndarray) -> tuple[int, np.ndarray | None, list[tuple[Any, int]]]:
    """Distinct count, sorted distinct values (when few enough to be classes) and the values'
    counts, most frequent first: one hashed pass (pyarrow), where numpy sorts text."""
    import pyarrow as pa  # here, not at import: the API starts without pyarrow (docs/performance-16.md)
    import pyarrow.compute as pc

    if not len(present):
        return 0, None, []
    tally = pc.value_counts(pa.array(present))
    values = tally.field("values").to_pylist()
    counts = _most_frequent_first(zip(values, tally.field("counts").to_pylist(), strict=True))
    unique = np.array(sorted(values), dtype=present.dtype) if len(values) <= MAX_CLASSES else None
    return len(values), unique, counts


def _number_counts(present: np.ndarray) -> tuple[int, np.ndarray | None, list[tuple[Any, int]]]:
    """The same for numbers (no NaN among them), from one sort: the distinct count, the sorted
    distinct values (first and last always, all of them when few enough to be classes) and,
    with at most ``_TARGET_MAX_CLASSES`` values, their counts. The sort is the profile's cost:
    it is done once, and np.unique's second pass over every row to gather all values is left
    to the columns with few."""
    if not len(present):
        return 0, None, []
    ordered = np.sort(present)
    starts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    distinct = len(starts) + 1
    if distinct > MAX_CLASSES:
        return distinct, ordered[[0, -1]], []
    starts = np.concatenate(([0], starts))
    unique = ordered[starts]
    counts: list[tuple[Any, int]] = []
    if distinct <= _TARGET_MAX_CLASSES:
        sizes = np.diff(np.append(starts, len(ordered)))
        counts = _most_frequent_first(zip(unique.tolist(), sizes.tolist(), strict=True))
    return distinct, unique, counts


def _warnings(
    name: str,
    kind: Kind,
    n_rows: int,
    n_missing: int,
    distinct: int,
    counts: list[tuple[Any, int]],
    stray: list[tuple[int, str]],
    category_limit: int,
) -> list[str]:
    """What a careful person would want to know before training on the column."""
    warnings: list[str] = []
    n_present = n_rows - n_missing
    if n_present == 0:
        warnings.append("missing in every row: it carries nothing; leave it out")
        return warnings
    if stray:
        samples = ", ".join(f"row {row}: {value!r}" for row, value in stray[:3])
        warnings.append(
            f"mixed column: mostly numbers but also text ({samples}), so it is read as a category; "
            "fix or blank those cells (or name them in 'na_values') to read it as numbers"
        )
    if distinct == 1:
        warnings.append(f"constant: every non-missing row holds {counts[0][0] if counts else 'the same value'!r}")
    if n_missing * 2 > n_rows:
        warnings.append(f"missing in most rows ({n_missing} of {n_rows})")
    if kind == "category" and distinct == n_present and n_present >= _ID_MIN_ROWS:
        warnings.append("every value is different: it looks like an id, not a feature; leave it out")
    elif kind == "category" and distinct > category_limit:
        warnings.append(f"very high cardinality: {distinct} distinct values, over the limit of {category_limit}")
    if 2 <= distinct <= _TARGET_MAX_CLASSES and kind != "number" and n_present >= 2 * _RARE_ROWS:
        value, count = min(counts, key=lambda vc: vc[1])
        if count < _RARE_ROWS or count < _RARE_SHARE * n_present:
            share = 100 * count / n_present
            warnings.append(
                f"as a target, class {value!r} is rare: {count} of {n_present} rows ({share:.1f}%); "
                "a model may never predict it (class weights or more rows help)"
            )
    return warnings


def _check_finite(name: str, values: np.ndarray, first_row: int = 1) -> None:
    if values.dtype.kind == "f":
        bad = np.flatnonzero(np.isinf(values))
        if len(bad):
            row = int(bad[0]) + first_row
            raise _bad(
                f"row {row}, column {name!r}: value {values[bad[0]]} is not a finite number",
                row=row,
                column=name,
            )


# -- CSV ----------------------------------------------------------------------------------
#
# pyarrow reads the file (C++, multi-threaded, a block at a time); every column is read as
# text and typed afterwards over the WHOLE column, because pyarrow's own inference decides
# from the first block and then fails on a later one (a blank, a stray word, a float after
# many ints). Typing a column of text is one vectorised cast per column.

DEFAULT_NA_VALUES: tuple[str, ...] = ("", "NA", "N/A", "NaN", "null", "None", "-")
DELIMITERS: dict[str, str] = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_TRUE = ("true", "True", "TRUE")
_FALSE = ("false", "False", "FALSE")
SNIFF_BYTES = 64 * 1024  # of a CSV's head, where the delimiter and decimal mark are sniffed (uploads and predictions)
_SNIFF_ROWS = 200
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_BLOCK_BYTES = 1024 * 1024  # pyarrow's default; measured faster than 4 or 16 MiB on 2 cores
_COMMA_DECIMAL = re.compile(r"[-+]?\d+,\d+")
_DOT_DECIMAL = re.compile(r"[-+]?\d*\.\d+")


@dataclass(frozen=True)
class CsvOptions:
    """What the uploader may override; None means "guess"."""

    delimiter: str | None = None
    decimal: str | None = None
    na_values: tuple[str, ...] = DEFAULT_NA_VALUES


def _delimiter_name(delimiter: str) -> str:
    return f"{DELIMITERS[delimiter]} ({delimiter!r})" if delimiter in DELIMITERS else repr(delimiter)


def _sample(path: Path) -> str:
    """The first rows of the file as text (BOM dropped), cut at the last whole line."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
        # A header longer than the sample (thousands of columns): read on to its end.
        while b"\n" not in head.lstrip(b"\r\n") and len(head) < _MAX_HEADER_BYTES:
            chunk = handle.read(SNIFF_BYTES)
            if not chunk:
                break
            head += chunk
        more = bool(handle.read(1))
    if more and b"\n" in head:
        head = head[: head.rindex(b"\n") + 1]
    try:
        return head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            raise _bad_utf8(path) from None
        return head[: exc.start].decode("utf-8-sig")


def _sample_rows(text: str, delimiter: str) -> list[list[str]]:
    rows: list[list[str]] = []
    try:
        for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            if row:
                rows.append(row)
            if len(rows) >= _SNIFF_ROWS:
                break
    except csv.Error:
        return rows  # a quote the sample cuts off: judge on what came before it
    return rows


def sniff_delimiter(text: str, filename: str | None = None) -> str:
    """The candidate that splits the header into most columns, every sampled row alike.

    csv.Sniffer guesses from character frequencies and picks ',' inside decimal commas or
    quoted text; a delimiter must instead give one consistent shape to header and rows.
    """
    best, best_key = None, (0.5, 1)
    for delimiter in DELIMITERS:
        rows = _sample_rows(text, delimiter)
        if not rows:
            continue
        width = len(rows[0])
        # A ragged row or two must not hide the delimiter: the parser then names them.
        alike = sum(len(row) == width for row in rows[1:]) / (len(rows) - 1) if len(rows) > 1 else 1.0
        if width > 1 and (alike, width) > best_key:
            best, best_key = delimiter, (alike, width)
    if best is not None:
        return best
    if filename and filename.lower().endswith((".tsv", ".tab")):
        return "\t"
    return ","


def sniff_decimal(text: str, delimiter: str) -> str:
    """',' when the sampled cells hold more decimal commas (1,5) than decimal points (1.5)."""
    if delimiter == ",":
        return "."
    commas = dots = 0
    for row in _sample_rows(text, delimiter)[1:]:
        for cell in row:
            cell = cell.strip()
            commas += bool(_COMMA_DECIMAL.fullmatch(cell))
            dots += bool(_DOT_DECIMAL.fullmatch(cell))
    return "," if commas > dots else "."


def _header(row: list[str]) -> list[str]:
    names = [name.strip() for name in row]
    if len(names) > MAX_COLUMNS:
        raise _bad(f"the header has {len(names)} columns, the limit is {MAX_COLUMNS}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if not name:
            raise _bad(f"header: column {i} has an empty name", row=1, column=i)
        if name in seen:
            raise _bad(f"header: column name {name!r} appears twice (columns {seen[name]} and {i})", row=1)
        seen[name] = i
    return names


def _refuse_implausible_shape(names: list[str], delimiter: str) -> None:
    """One column whose name holds another delimiter is a file split with the wrong one."""
    if len(names) != 1:
        return
    inside = [d for d in DELIMITERS if d != delimiter and d in names[0]]
    if inside:
        msg = (
            f"the file reads as ONE column named {names[0]!r} with the {_delimiter_name(delimiter)} delimiter, "
            f"but that name holds {_delimiter_name(inside[0])}: set the form field 'delimiter' "
            f"to the character that separates the columns"
        )
        raise InvalidInput(msg, errors=[{"loc": ["body", "delimiter"], "msg": msg, "delimiter": delimiter}])


def _refuse_nul_bytes(path: Path) -> bool:
    """Text never holds NUL; a parser would take it, and numpy would drop it silently.
    Says whether the file holds a double quote (in the same pass)."""
    offset = 0
    quoted = False
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 1024 * 1024):
            quoted = quoted or b'"' in chunk
            at = chunk.find(b"\x00")
            if at >= 0:
                handle.seek(0)
                line = 1 + handle.read(offset + at).count(b"\n")  # lines counted only when needed
                raise _bad(f"line {line} holds a NUL byte: the file is binary, not UTF-8 CSV text", line=line)
            offset += len(chunk)
    return quoted


def _bad_utf8(path: Path) -> InvalidInput:
    """Find the first byte that is not UTF-8, counting bytes and lines from the start."""
    offset = 0
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                msg = f"line {line} is not UTF-8 text (byte {offset + exc.start}: {exc.reason})"
                return _bad(msg, line=line)
            offset += len(raw)
    return _bad("the file is not UTF-8 text")


def _ragged_row(path: Path, delimiter: str, width: int) -> InvalidInput | None:
    """Name the first data row whose field count differs from the header's (error path only:
    pyarrow reports the offending text but no row number when it reads in parallel)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        rows = (row for row in csv.reader(handle, delimiter=delimiter) if row)
        try:
            next(rows, None)
            for number, row in enumerate(rows, start=1):
                if len(row) != width:
                    msg = (
                        f"row {number} has {len(row)} fields, the header has {width} "
                        f"(split on the {_delimiter_name(delimiter)} delimiter: if that is wrong, "
                        f"set the form field 'delimiter')"
                    )
                    return _bad(msg, row=number, delimiter=delimiter)
        except csv.Error as exc:
            return _bad(f"the file is not valid CSV: {exc}")
    return None


def _read_columns(
    path: Path,
    raw_names: list[str],
    delimiter: str,
    decimal: str,
    na_values: tuple[str, ...],
    *,
    infer: bool,
    quoted: bool,
) -> list[pa.ChunkedArray]:
    """Every column as pyarrow typed it (``infer``), or every column as text."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    read = pacsv.ReadOptions(block_size=_BLOCK_BYTES, use_threads=True)
    # A line break inside quotes makes pyarrow find row ends the slow way (measured 1.5x
    # the whole read): only a file with a quote in it can hold one.
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=quoted)
    if infer:
        convert = pacsv.ConvertOptions(
            null_values=sorted({"", *na_values}),
            strings_can_be_null=True,
            true_values=list(_TRUE),
            false_values=list(_FALSE),
            decimal_point=decimal,
            timestamp_parsers=["\x01"],  # never matches: a timestamp stays text, as written
        )
    else:
        convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in raw_names}, null_values=[], strings_can_be_null=False
        )
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        text = str(exc)
        if infer and "conversion error" in text:
            raise _Retry from None
        if "UTF8" in text or "UTF-8" in text:
            raise _bad_utf8(path) from None
        if "Expected" in text and "columns" in text:
            raise (_ragged_row(path, delimiter, len(raw_names)) or _bad(f"the file is not valid CSV: {text}")) from None
        raise _bad(f"the file is not valid CSV: {text}") from None
    if table.num_columns != len(raw_names):
        raise _bad(f"the header has {table.num_columns} columns where {len(raw_names)} were expected")
    return list(table.columns)


def _to_numpy_float(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


class _Retry(Exception):
    """pyarrow's types from the first block do not fit a later one."""


def _typed(name: str, column: pa.ChunkedArray, na_values: tuple[str, ...], decimal: str) -> _Typed:
    """A column as pyarrow read it, in the contract's storage."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    n_missing = column.null_count
    if pa.types.is_integer(kind):
        if n_missing == 0:
            return _Typed(np.asarray(column.to_numpy(), dtype=np.int64), "integer", 0)
        return _Typed(_to_numpy_float(column.cast(pa.float64())), "integer", n_missing)
    if pa.types.is_floating(kind):
        values = _to_numpy_float(column)
        _check_finite(name, values)
        return _Typed(values, "number", n_missing)
    if pa.types.is_boolean(kind):
        return _Typed(_to_numpy_float(pc.if_else(column, 1.0, 0.0)), "boolean", n_missing)
    if pa.types.is_null(kind):  # nothing but blanks
        return _Typed(np.full(len(column), np.nan), "number", len(column))
    return _type_column(name, column.cast(pa.string()), na_values, decimal)


def _type_column(name: str, text: pa.ChunkedArray, na_values: tuple[str, ...], decimal: str) -> _Typed:
    """One column of text as int64, float64 (NaN missing), boolean float64 or unicode ("" missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    trimmed = pc.utf8_trim_whitespace(text)
    tokens = pa.array(sorted({"", *na_values}), pa.string())
    missing = pc.or_(pc.is_null(trimmed), pc.fill_null(pc.is_in(trimmed, value_set=tokens), True))
    present = pc.if_else(missing, pa.scalar(None, pa.string()), trimmed)
    n_missing = int(pc.sum(missing).as_py() or 0)
    n_present = len(text) - n_missing
    if n_present == 0:  # nothing to type by: a numeric column of NaN, reported as missing everywhere
        return _Typed(np.full(len(text), np.nan), "number", n_missing)
    try:  # ints stay exact only as int64; a blank among them makes the column float64
        ints = pc.cast(present, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    else:
        if n_missing == 0:
            return _Typed(np.asarray(ints.to_numpy(), dtype=np.int64), "integer", 0)
        return _Typed(_to_numpy_float(pc.cast(ints, pa.float64())), "integer", n_missing)
    numeric = pc.replace_substring(present, ",", ".") if decimal == "," else present
    try:
        floats = _to_numpy_float(pc.cast(numeric, pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    else:
        _check_finite(name, floats)
        return _Typed(floats, "number", n_missing)
    is_true = pc.is_in(present, value_set=pa.array(_TRUE))
    is_false = pc.is_in(present, value_set=pa.array(_FALSE))
    if pc.all(pc.or_(pc.or_(is_true, is_false), missing)).as_py():
        booleans = pc.if_else(missing, float("nan"), pc.if_else(is_true, 1.0, 0.0))
        return _Typed(_to_numpy_float(booleans), "boolean", n_missing)
    strings = pc.fill_null(present, "").to_numpy(zero_copy_only=False).astype(np.str_)
    stray = _stray_words(strings, numeric, n_present)
    return _Typed(strings, "category", n_missing, stray)


def _stray_words(strings: np.ndarray, numeric: pa.ChunkedArray, n_present: int) -> list[tuple[int, str]]:
    """(row, value) of the first non-numbers of a column that is mostly numbers; [] otherwise."""
    numbers = _numeric_mask(numeric)
    n_numbers = int(numbers.sum())
    if n_numbers == 0 or n_numbers < n_present / 2:
        return []
    words = np.flatnonzero(~numbers & (strings != ""))
    return [(int(i) + 1, str(strings[i])) for i in words[:5]]


def _numeric_mask(numeric: pa.ChunkedArray) -> np.ndarray:
    """Which cells parse as numbers (missing cells do not)."""
    import pyarrow.compute as pc

    looks = pc.match_substring_regex(numeric, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    return np.asarray(pc.fill_null(looks, False).to_numpy(zero_copy_only=False), dtype=bool)


@dataclass(frozen=True)
class _Typed:
    values: np.ndarray
    kind: Kind
    missing: int
    stray: list[tuple[int, str]] = field(default_factory=list)


def parse_csv(path: Path, options: CsvOptions | None = None, *, filename: str | None = None) -> Table:
    """Read a delimited text file with a header row. Row numbers in errors count data rows from 1."""
    import pyarrow as pa

    options = options or CsvOptions()
    quoted = _refuse_nul_bytes(path)
    text = _sample(path)
    delimiter = options.delimiter or sniff_delimiter(text, filename)
    decimal = options.decimal or sniff_decimal(text, delimiter)
    if decimal == delimiter:
        msg = f"the decimal separator {decimal!r} cannot also be the delimiter: set the form field 'decimal'"
        raise InvalidInput(msg, errors=[{"loc": ["body", "decimal"], "msg": msg}])
    rows = _sample_rows(text, delimiter)
    if not rows:
        raise _bad("the file is empty")
    raw_names = rows[0]
    names = _header(raw_names)
    _refuse_implausible_shape(names, delimiter)
    try:
        # Fast: pyarrow types each column as it reads. It decides by the first block, so a
        # column that changes its mind later (a word after numbers) fails the read: then
        # every column is read as text and typed over all of its rows.
        columns = _read_columns(path, raw_names, delimiter, decimal, options.na_values, infer=True, quoted=quoted)
    except _Retry:
        columns = _read_columns(path, raw_names, delimiter, decimal, options.na_values, infer=False, quoted=quoted)
    if not columns or len(columns[0]) == 0:
        raise _bad("the file has a header but no data rows")
    if any(pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type) for c in columns):
        raise _bad_utf8(path)  # pyarrow reads a column that is not UTF-8 as bytes
    typed = [_typed(name, column, options.na_values, decimal) for name, column in zip(names, columns, strict=True)]
    del columns
    kinds = {name: t.kind for name, t in zip(names, typed, strict=True)}
    stray = {name: t.stray for name, t in zip(names, typed, strict=True) if t.stray}
    return Table(names, [t.values for t in typed], kinds=kinds, stray=stray, delimiter=delimiter, decimal=decimal)


# -- NPZ ----------------------------------------------------------------------------------


def parse_npz(path: Path, *, max_elements: int) -> Table:
    """Read ``X`` (rows x features) and ``y`` (labels, 1-D or rows x targets)."""
    with open(path, "rb") as handle:  # ours to close, also when np.load fails half-way
        try:
            archive = np.load(handle, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise _bad(f"the file is not a readable .npz archive: {exc}") from None
        with archive:
            missing = [key for key in ("X", "y") if key not in archive.files]
            if missing:
                raise _bad(f"the archive has no array named {missing[0]!r} (it has: {archive.files})")
            x = _npz_array(archive, "X", max_elements)
            y = _npz_array(archive, "y", max_elements)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or y.ndim not in (1, 2):
        raise _bad(f"X must be 2-D and y 1-D or 2-D, got X{list(x.shape)} and y{list(y.shape)}")
    if len(x) != len(y):
        raise _bad(f"X has {len(x)} rows but y has {len(y)}")
    if len(x) == 0:
        raise _bad("the arrays have no rows")
    if x.dtype.kind not in "iuf":
        raise _bad(f"X must hold numbers, not {x.dtype}")
    names = [f"x{j}" for j in range(x.shape[1])]
    columns = [_numeric_column(x[:, j]) for j in range(x.shape[1])]
    y_columns = [y] if y.ndim == 1 else [y[:, j] for j in range(y.shape[1])]
    names += ["y"] if y.ndim == 1 else [f"y{j}" for j in range(y.shape[1])]
    for col in y_columns:
        if col.dtype.kind == "U":
            columns.append(np.ascontiguousarray(col))
        elif col.dtype.kind in "iufb":
            columns.append(_numeric_column(col))
        else:
            raise _bad(f"y must hold numbers or strings, not {col.dtype}")
    for name, values in zip(names, columns, strict=False):
        _check_finite(name, values)
    return Table(names, columns)


def _npz_array(archive: Any, key: str, max_elements: int) -> np.ndarray:
    member = f"{key}.npy"
    if member not in archive.zip.namelist():  # np.load hands back raw bytes for such members
        raise _bad(f"{key!r} in the archive is not a .npy array")
    try:
        # The header alone gives the shape: refuse a huge array before inflating any of it.
        with archive.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        size = math.prod(shape)
        if size > max_elements or size * dtype.itemsize > max_elements * 8:
            raise _bad(f"array {key!r} has {size} elements, the limit is {max_elements}")
        array = archive[key]
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _bad(f"array {key!r} cannot be read: {exc}") from None
    return np.asarray(array)


def _numeric_column(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iub":
        return np.ascontiguousarray(values, dtype=np.int64)
    return np.ascontiguousarray(values, dtype=np.float64)


# -- Parquet ------------------------------------------------------------------------------


def parse_parquet(path: Path) -> Table:
    """Read a Parquet file a record batch at a time; its own types decide each column's kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
        names = _header([str(name) for name in source.schema_arrow.names])
        batches = list(source.iter_batches(batch_size=65_536))
    except (pa.ArrowException, OSError) as exc:
        raise _bad(f"the file is not a readable Parquet file: {exc}") from None
    if not batches or sum(b.num_rows for b in batches) == 0:
        raise _bad("the Parquet file has no rows")
    table = pa.Table.from_batches(batches)
    del batches
    columns: list[np.ndarray] = []
    kinds: dict[str, Kind] = {}
    for name, column in zip(names, table.columns, strict=True):
        values, kinds[name] = _parquet_column(name, column)
        columns.append(values)
    return Table(names, columns, kinds=kinds)


def _parquet_column(name: str, column: pa.ChunkedArray) -> tuple[np.ndarray, Kind]:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if pa.types.is_boolean(kind):
        return _to_numpy_float(pc.fill_null(pc.if_else(column, 1.0, 0.0), float("nan"))), "boolean"
    if pa.types.is_integer(kind):
        if column.null_count == 0:
            return np.asarray(column.to_numpy(), dtype=np.int64), "integer"
        return _to_numpy_float(column.cast(pa.float64())), "integer"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = _to_numpy_float(column.cast(pa.float64()))
        _check_finite(name, values)
        return values, "number"
    try:
        text = column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        msg = f"column {name!r} has Parquet type {kind}, which cannot be read as numbers or text"
        raise _bad(msg, column=name) from None
    return pc.fill_null(text, "").to_numpy(zero_copy_only=False).astype(np.str_), "category"


def sniff_format(filename: str | None, head: bytes) -> Format:
    """Decide by content first (a zip header, Parquet's magic), by extension second."""
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.startswith(b"PAR1"):
        return "parquet"
    if filename and filename.lower().endswith(".npz"):
        raise _bad("the file is named .npz but is not a zip archive")
    if filename and filename.lower().endswith(".parquet"):
        raise _bad("the file is named .parquet but does not start as a Parquet file does")
    return "csv"


def parse_table(
    path: Path,
    fmt: Format,
    *,
    max_elements: int,
    options: CsvOptions | None = None,
    filename: str | None = None,
) -> Table:
    if fmt == "npz":
        return parse_npz(path, max_elements=max_elements)
    if fmt == "parquet":
        return parse_parquet(path)
    return parse_csv(path, options, filename=filename)


class _HashingWriter(io.RawIOBase):
    """Writes through to ``handle``, hashing the bytes on the way, and cannot seek. zipfile
    then writes each member once, front to back, with its sizes and CRC in a data descriptor
    after it (documented: "writing to unseekable streams"), instead of seeking back to patch
    the member's header: so the bytes hashed are the bytes in the file, and the stored
    table needs no second pass to read its sha256 back."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)  # without the GIL, as the write itself
        written = self.handle.write(view)
        self.position += len(view)
        return written if written is not None else len(view)

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("a stored table is written front to back")


def write_table(table: Table, handle: IO[bytes]) -> str:
    """Serialise a table as an uncompressed .npz (no pickles: loadable with allow_pickle=False);
    returns the sha256 of the bytes written.

    Uncompressed on purpose: each column is stored as a plain .npy inside the zip, so
    ``read_table`` can memory-map it instead of reading it.
    """
    writer = _HashingWriter(handle)
    arrays = {f"c{i}": c for i, c in enumerate(table.columns)}
    np.savez(writer, names=np.array(table.names, dtype=np.str_), **arrays)  # type: ignore[arg-type]
    return writer.digest.hexdigest()


def _mapped_members(path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[mmap.mmap, int, int]]] | None:
    """Every array of an uncompressed .npz as a read-only view of one memory mapping of the file,
    with where each lies in it; None if any member can't be mapped."""
    arrays: dict[str, np.ndarray] = {}
    where: dict[str, tuple[mmap.mmap, int, int]] = {}
    with open(path, "rb") as raw:
        mapping = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
        with zipfile.ZipFile(raw) as archive:
            infos = archive.infolist()
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            raw.seek(info.header_offset)
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            raw.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
            else:
                return None
            if dtype.hasobject:
                return None
            key, count, offset = info.filename[: -len(".npy")], math.prod(shape), raw.tell()
            flat = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
            arrays[key] = flat if flat.shape == shape else flat.reshape(shape, order="F" if fortran else "C")
            where[key] = (mapping, offset, count * dtype.itemsize)
    return arrays, where


def read_table(path: Path, *, memory_map: bool = True) -> Table:
    """Load a stored table; with ``memory_map`` its columns are read-only views of the file, paged in on use."""
    members = _mapped_members(path) if memory_map else None
    if members is not None:
        arrays, where = members
        names = [str(n) for n in arrays["names"].tolist()]
        columns = [arrays[f"c{i}"] for i in range(len(names))]
        return Table(names, columns, {i: where[f"c{i}"] for i in range(len(names))})
    with np.load(path, allow_pickle=False) as archive:
        names = archive["names"].tolist()
        return Table(names, [archive[f"c{i}"] for i in range(len(names))])
