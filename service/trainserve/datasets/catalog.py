"""Datasets: validate an upload, keep the parsed table in the store and a row in the database.

Re-uploading the same bytes, read the same way, makes a new dataset record (its own id,
name and lifetime) that shares the stored table of the first one: the local store links
the file (one copy on disk per upload sha256), and deleting one record removes only its
own name, never a table another record still uses. Stores that cannot share (S3) save
a copy.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from trainserve.config import Settings
from trainserve.datasets.tables import DELIMITERS, CsvOptions, Table, parse_table, sniff_format
from trainserve.db import DatasetRecord, JobRecord, SweepRecord, on_commit, on_rollback
from trainserve.errors import Conflict, InvalidInput, NotFound
from trainserve.jobs.status import ACTIVE
from trainserve.storage.base import Store, new_id

_DELIMITER_WORDS = {"tab": "\t", "\\t": "\t", **{word: char for char, word in DELIMITERS.items()}}


OptionsIn = Literal["body", "query"]  # the upload's form fields, or a raw upload's query string


def _option_error(name: str, msg: str, where: OptionsIn = "body") -> InvalidInput:
    what = "form field" if where == "body" else "query parameter"
    return InvalidInput(f"{what} {name!r}: {msg}", errors=[{"loc": [where, name], "msg": msg}])


def csv_options(fields: dict[str, str], default_na_values: list[str], where: OptionsIn = "body") -> CsvOptions:
    """The upload's ``delimiter``, ``decimal`` and ``na_values`` (form fields, or query
    parameters of a raw upload) as parser options."""
    delimiter: str | None = None
    if "delimiter" in fields:
        given = fields["delimiter"]
        delimiter = _DELIMITER_WORDS.get(given.lower(), given)
        if len(delimiter) != 1 or not delimiter.isascii() or delimiter.isalnum() or delimiter in '"\r\n.':
            raise _option_error(
                "delimiter",
                f"{given!r} is not a delimiter: send one character such as ',' ';' '|' or a tab "
                "(or the words comma, semicolon, tab, pipe)",
                where,
            )
    decimal: str | None = None
    if "decimal" in fields:
        decimal = fields["decimal"]
        if decimal not in (".", ","):
            raise _option_error("decimal", f"{decimal!r} is not a decimal separator: send '.' or ','", where)
    na_values = tuple(default_na_values)
    if "na_values" in fields:
        na_values = _na_values(fields["na_values"], where)
    return CsvOptions(delimiter=delimiter, decimal=decimal, na_values=na_values)


def _na_values(raw: str, where: OptionsIn) -> tuple[str, ...]:
    """A JSON list of strings. Only JSON: a comma-separated form could not hold a comma, and
    would take a stray number, ``true`` or ``{}`` for a token instead of refusing it."""
    try:
        values: Any = json.loads(raw)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        msg = f'{raw[:40]!r} is not a JSON list of strings: send one, such as ["NA", "?"]'
        raise _option_error("na_values", msg, where)
    return tuple(v.strip() for v in values)


def create_from_file(
    *,
    session: Session,
    store: Store,
    settings: Settings,
    raw: Path,
    size: int,
    sha256: str,
    filename: str | None,
    options: dict[str, str] | None = None,
    options_in: OptionsIn = "body",
) -> DatasetRecord:
    """Parse and check an uploaded file already on disk (size and sha256 of its bytes known),
    then publish table and row together. ``raw`` is left for the caller to remove."""
    if size == 0:
        raise InvalidInput("the file is empty", errors=[{"loc": ["file"], "msg": "the file is empty"}])
    options = options or {}
    parse_options = csv_options(options, settings.na_values, options_in)
    with open(raw, "rb") as handle:
        fmt = sniff_format(filename, handle.read(4))
    if fmt != "csv" and options:
        name = sorted(options)[0]
        raise _option_error(name, f"applies to CSV files only, and this one is {fmt}: leave it out", options_in)
    # An .npz decompresses; bound what it may expand to by the upload limit's worth of float64s.
    table = parse_table(
        raw, fmt, max_elements=settings.max_upload_bytes // 8 * 4, options=parse_options, filename=filename
    )
    dataset_id = new_id()
    if _seen(session, sha256):  # maybe the same table read the same way: then shared, not stored again
        columns = _columns(table, settings)
        same = _same_upload(session, sha256, columns)
        if same is not None and store.share_dataset(same.id, dataset_id):
            file_sha256 = same.file_sha256
        else:
            file_sha256 = store.save_dataset(dataset_id, table)
    else:
        columns, file_sha256 = _profile_while_saving(store, dataset_id, table, settings)
    record = DatasetRecord(
        id=dataset_id,
        filename=(filename or "")[:255] or None,
        format=fmt,
        n_rows=table.n_rows,
        columns=columns,
        size_bytes=size,
        sha256=sha256,
        file_sha256=file_sha256,
    )
    session.add(record)
    on_rollback(session, lambda: store.delete_dataset(dataset_id))
    session.flush()
    return record


def _columns(table: Table, settings: Settings) -> list[dict[str, Any]]:
    return [c.as_dict() for c in table.schema(category_limit=settings.category_limit).columns]


def _profile_while_saving(
    store: Store, dataset_id: str, table: Table, settings: Settings
) -> tuple[list[dict[str, Any]], str]:
    """The profile (sorts, in memory) and the stored file (writes and hashes) side by side:
    each would otherwise wait for the other, and together they were half of an upload's time.
    A profile that fails leaves no file behind."""
    with ThreadPoolExecutor(1, thread_name_prefix="save-dataset") as pool:
        saving = pool.submit(store.save_dataset, dataset_id, table)
        try:
            columns = _columns(table, settings)
        except BaseException:
            if saving.exception() is None:
                store.delete_dataset(dataset_id)
            raise
        return columns, saving.result()


def _seen(session: Session, sha256: str) -> bool:
    return session.scalar(select(DatasetRecord.id).where(DatasetRecord.sha256 == sha256).limit(1)) is not None


def _shape(columns: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What reading options change about a table: names, types, missing counts, classes."""
    return [(c["name"], c["dtype"], c.get("kind"), c.get("missing"), c.get("classes")) for c in columns]


def _same_upload(session: Session, sha256: str, columns: list[dict[str, Any]]) -> DatasetRecord | None:
    query = select(DatasetRecord).where(DatasetRecord.sha256 == sha256).order_by(DatasetRecord.created_at)
    shape = _shape(columns)
    return next((r for r in session.scalars(query) if _shape(r.columns) == shape), None)


def get(*, session: Session, dataset_id: str) -> DatasetRecord:
    record = session.get(DatasetRecord, dataset_id)
    if record is None:
        raise NotFound(f"dataset {dataset_id!r} does not exist")
    return record


def list_all(*, session: Session, limit: int = 100, offset: int = 0) -> list[DatasetRecord]:
    query = select(DatasetRecord).order_by(DatasetRecord.created_at.desc(), DatasetRecord.id)
    return list(session.scalars(query.limit(limit).offset(offset)))


def delete(*, session: Session, store: Store, dataset_id: str) -> None:
    record = get(session=session, dataset_id=dataset_id)
    active = session.scalar(
        select(func.count()).where(JobRecord.dataset_id == dataset_id, JobRecord.status.in_(ACTIVE))
    )
    if active:
        raise Conflict(f"dataset {dataset_id} is used by {active} queued or running job(s); cancel them first")
    sweeps = session.scalar(
        select(func.count()).where(SweepRecord.dataset_id == dataset_id, SweepRecord.status == "running")
    )
    if sweeps:
        raise Conflict(f"dataset {dataset_id} is used by {sweeps} running sweep(s); cancel them first")
    session.delete(record)
    session.flush()
    on_commit(session, lambda: store.delete_dataset(dataset_id))
