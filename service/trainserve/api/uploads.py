"""Uploads streamed straight into the store's ``tmp/``, hashed on the way.

Starlette's form parser spools each file to a ``SpooledTemporaryFile``: 1 MiB in memory,
then an anonymous file in the system temp folder, which is often a RAM-backed tmpfs in
containers, and which the dataset code then copied a second time into the store. Here
python-multipart's push parser feeds the request stream, as it arrives, into one file
under the store's ``tmp/`` (same disk as the final table, removed when the request ends),
counting bytes against the upload limit and computing the sha256 in the same pass. Text
fields are small and kept in memory, up to a bound.

A table may also come as the request body itself (``Content-Type: text/csv`` or
``application/octet-stream``, its name and reading options in the query string): no
multipart framing to parse, which the Python client and the CLI use for large files.

Either way the bytes are hashed and written in a worker thread while the event loop
receives the next ones (``_Spool``): hashing on the loop, then writing, one after the
other, left each idle half the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trainserve.errors import InvalidInput, PayloadTooLarge
from trainserve.storage.base import Store

MAX_TEXT_FIELD_BYTES = 1024 * 1024
# Received file bytes are hashed and written out once this many are pending: bounds what
# an upload holds in memory (twice this: one batch being written, one being received),
# while a thread hop per 64 KiB network chunk cost more than the write.
FLUSH_BYTES = 128 * 1024
# How to read an uploaded table, beside its file on every upload form (POST /datasets and
# the file + spec form of POST /train): each overrides what the parser would guess.
TABLE_OPTION_FIELDS = frozenset({"delimiter", "decimal", "na_values"})
# Bodies that are a table themselves (anything else is refused with 415, naming both forms).
RAW_TABLE_TYPES = frozenset(
    {
        "text/csv",
        "text/tab-separated-values",
        "text/plain",
        "application/octet-stream",
        "application/vnd.apache.parquet",
        "application/x-parquet",
        "application/zip",
    }
)
# The query string of a raw upload: the file's name (a label and a format hint) and the options.
RAW_QUERY_FIELDS = frozenset({"filename"}) | TABLE_OPTION_FIELDS


@dataclass
class ReceivedFile:
    path: Path  # under the store's tmp/, removed when the request ends
    filename: str | None
    size: int
    sha256: str
    options: dict[str, str] = field(default_factory=dict)  # the TABLE_OPTION_FIELDS sent
    options_in: Literal["body", "query"] = "body"  # form fields, or a raw upload's query string


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    file: ReceivedFile | None = None


def _bad(msg: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])


class _Spool:
    """A received file's bytes, hashed and written to ``path`` in a worker thread while the
    event loop receives the next batch; at most one batch is being written at a time."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing: asyncio.Future[None] | None = None
        self._handle: IO[bytes] | None = None

    def add(self, chunk: bytes) -> None:
        """Queue a chunk (on the event loop); PayloadTooLarge past the limit."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"the file is larger than the limit of {self.max_bytes} bytes")
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)

    async def flush(self, *, force: bool = False) -> None:
        """Hand the queued bytes to the writer thread once enough are queued (or ``force``);
        waits only for the batch before them."""
        if not self._pending or (self._pending_bytes < FLUSH_BYTES and not force):
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        await self.wait()
        self._writing = asyncio.ensure_future(run_in_threadpool(self._write, batch))

    async def finish(self) -> str:
        """Everything written; the sha256 of all the bytes."""
        await self.flush(force=True)
        await self.wait()
        if self._handle is None:
            self.path.touch()  # an empty file: the dataset code names the problem
        return self._digest.hexdigest()

    async def wait(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def close(self) -> None:
        """After a write in flight has finished (its error, if any, left to the one already
        raised): only then may the file be closed and removed."""
        with contextlib.suppress(Exception):
            await self.wait()
        if self._handle is not None:
            self._handle.close()

    def _write(self, batch: list[bytes]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        for chunk in batch:  # both without the GIL
            self._digest.update(chunk)
            self._handle.write(chunk)


class _FormReader:
    """python-multipart callbacks; file bytes are queued and written off the event loop."""

    def __init__(self, spool: _Spool, *, file_field: str, text_fields: set[str]) -> None:
        self.spool, self.file_field, self.text_fields = spool, file_field, text_fields
        self.form = ReceivedForm()
        self.file_ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._text = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_part,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self._disposition, self._name, self._is_file = b"", "", False
        self._text = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise _bad("a multipart part has no name in its Content-Disposition header", ["body"])
        self._name = raw_name.decode("utf-8", "replace")
        self._is_file = b"filename" in options
        expected = [self.file_field, *sorted(self.text_fields)]
        if self._name not in expected:
            raise _bad(f"unexpected form field {self._name!r}: this endpoint takes {expected}", ["body", self._name])
        if self._is_file != (self._name == self.file_field):
            kind = "a file" if self._name == self.file_field else "a text field, not a file"
            raise _bad(f"form field {self._name!r} must be {kind}", ["body", self._name])
        if self._name in self.form.fields or (self._is_file and self.form.file is not None):
            raise _bad(f"form field {self._name!r} appears twice", ["body", self._name])
        if self._is_file:
            filename = base_name(options.get(b"filename", b"").decode("utf-8", "replace"))
            # Only a hint for the format and a label: never used as a path.
            self.form.file = ReceivedFile(self.spool.path, filename, 0, "")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.spool.add(chunk)
        else:
            if len(self._text) + len(chunk) > MAX_TEXT_FIELD_BYTES:
                raise PayloadTooLarge(f"form field {self._name!r} is larger than {MAX_TEXT_FIELD_BYTES} bytes")
            self._text.extend(chunk)

    def _part_end(self) -> None:
        if self._is_file:
            self.file_ended = True
            return
        try:
            self.form.fields[self._name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"form field {self._name!r} is not UTF-8 text", ["body", self._name]) from None


def base_name(filename: str) -> str | None:
    """The last part of a client's file name, by either slash: ``../../x.csv`` and
    ``C:\\data\\x.csv`` are both stored as ``x.csv``; nothing left is no name."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return None if name in ("", ".", "..") else name


@contextlib.asynccontextmanager
async def receive_form(
    request: Request,
    store: Store,
    *,
    max_file_bytes: int,
    file_field: str = "file",
    text_fields: frozenset[str] = frozenset(),
) -> AsyncIterator[ReceivedForm]:
    """Parse a multipart body as it streams in; the file lives until the block ends."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad("the multipart Content-Type header has no boundary", ["header", "content-type"])
    with store.temp_path(".upload") as path:
        spool = _Spool(path, max_file_bytes)
        accepted = set(text_fields) | TABLE_OPTION_FIELDS
        reader = _FormReader(spool, file_field=file_field, text_fields=accepted)
        callbacks: Any = reader.callbacks()
        parser = MultipartParser(boundary, callbacks)
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                await spool.flush()
            parser.finalize()
            sha256 = await spool.finish()
        except FormParserError as exc:
            raise _bad(f"the multipart body cannot be parsed: {exc}", ["body"]) from None
        finally:
            await spool.close()
        if reader.form.file is not None:
            if not reader.file_ended:
                raise _bad("the multipart body ends inside the file", ["body", file_field])
            reader.form.file.size, reader.form.file.sha256 = spool.size, sha256
            options = {name: reader.form.fields.pop(name) for name in TABLE_OPTION_FIELDS & set(reader.form.fields)}
            reader.form.file.options = options
        elif TABLE_OPTION_FIELDS & set(reader.form.fields):
            name = sorted(TABLE_OPTION_FIELDS & set(reader.form.fields))[0]
            raise _bad(f"form field {name!r} says how to read an uploaded file, but no file was sent", ["body", name])
        yield reader.form


def is_raw_table(request: Request) -> bool:
    """Whether the body is a table itself rather than a multipart form."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return content_type in RAW_TABLE_TYPES


@contextlib.asynccontextmanager
async def receive_body(request: Request, store: Store, *, max_file_bytes: int) -> AsyncIterator[ReceivedFile]:
    """A body that is the file itself, streamed to disk as it arrives; its name and reading
    options come from the query string (``filename``, ``delimiter``, ``decimal``, ``na_values``).
    The file lives until the block ends."""
    query: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in RAW_QUERY_FIELDS:
            raise _bad(
                f"unexpected query parameter {name!r}: this upload takes {sorted(RAW_QUERY_FIELDS)}", ["query", name]
            )
        if name in query:
            raise _bad(f"query parameter {name!r} appears twice", ["query", name])
        query[name] = value
    filename = base_name(query.pop("filename", ""))
    with store.temp_path(".upload") as path:
        spool = _Spool(path, max_file_bytes)
        try:
            async for chunk in request.stream():
                spool.add(chunk)
                await spool.flush()
            sha256 = await spool.finish()
        finally:
            await spool.close()
        yield ReceivedFile(path, filename, spool.size, sha256, query, "query")
