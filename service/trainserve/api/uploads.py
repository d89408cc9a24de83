"""Multipart uploads streamed straight into the store's ``tmp/``, hashed on the way.

Starlette's form parser spools each file to a ``SpooledTemporaryFile``: 1 MiB in memory,
then an anonymous file in the system temp folder, which is often a RAM-backed tmpfs in
containers, and which the dataset code then copied a second time into the store. Here
python-multipart's push parser feeds the request stream, as it arrives, into one file
under the store's ``tmp/`` (same disk as the final table, removed when the request ends),
counting bytes against the upload limit and computing the sha256 in the same pass. Text
fields are small and kept in memory, up to a bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trainserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from trainserve.storage.base import Store

MAX_TEXT_FIELD_BYTES = 1024 * 1024
# Received file bytes are written out once this many are pending: bounds what an upload
# holds in memory, while a thread hop per 64 KiB network chunk cost more than the write.
FLUSH_BYTES = 128 * 1024
# How to read an uploaded table, beside its file on every upload form (POST /datasets and
# the file + spec form of POST /train): each overrides what the parser would guess.
TABLE_OPTION_FIELDS = frozenset({"delimiter", "decimal", "na_values"})


@dataclass
class ReceivedFile:
    path: Path  # under the store's tmp/, removed when the request ends
    filename: str | None
    size: int
    sha256: str
    options: dict[str, str] = field(default_factory=dict)  # the TABLE_OPTION_FIELDS sent


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    file: ReceivedFile | None = None


def _bad(msg: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])


class _FormReader:
    """python-multipart callbacks; file bytes are queued and written off the event loop."""

    def __init__(self, path: Path, *, file_field: str, text_fields: set[str], max_file_bytes: int) -> None:
        self.path, self.file_field, self.text_fields = path, file_field, text_fields
        self.max_file_bytes = max_file_bytes
        self.form = ReceivedForm()
        self.pending: list[bytes] = []  # file bytes parsed but not written yet
        self.pending_bytes = 0
        self.handle: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._size = 0
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
            self.form.file = ReceivedFile(self.path, filename, 0, "")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self._size += len(chunk)
            if self._size > self.max_file_bytes:
                raise PayloadTooLarge(f"the file is larger than the limit of {self.max_file_bytes} bytes")
            self._digest.update(chunk)
            self.pending.append(chunk)
            self.pending_bytes += len(chunk)
        else:
            if len(self._text) + len(chunk) > MAX_TEXT_FIELD_BYTES:
                raise PayloadTooLarge(f"form field {self._name!r} is larger than {MAX_TEXT_FIELD_BYTES} bytes")
            self._text.extend(chunk)

    def _part_end(self) -> None:
        if self._is_file:
            assert self.form.file is not None
            self.form.file.size, self.form.file.sha256 = self._size, self._digest.hexdigest()
            return
        try:
            self.form.fields[self._name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"form field {self._name!r} is not UTF-8 text", ["body", self._name]) from None

    def flush(self) -> None:
        """Write the queued file bytes (called in a worker thread)."""
        if not self.pending:
            return
        if self.handle is None:
            self.handle = open(self.path, "wb")  # noqa: SIM115 (closed in receive_form)
        self.handle.write(b"".join(self.pending))
        self.pending.clear()
        self.pending_bytes = 0


def base_name(filename: str) -> str | None:
    """The last part of a client's file name, by either slash: ``../../x.csv`` and
    ``C:\\data\\x.csv`` are both stored as ``x.csv``; nothing left is no name."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return None if name in ("", ".", "..") else name


def require_multipart(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}: send multipart/form-data with a 'file' field"
        )


@asynccontextmanager
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
        accepted = set(text_fields) | TABLE_OPTION_FIELDS
        reader = _FormReader(path, file_field=file_field, text_fields=accepted, max_file_bytes=max_file_bytes)
        callbacks: Any = reader.callbacks()
        parser = MultipartParser(boundary, callbacks)
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if reader.pending_bytes >= FLUSH_BYTES:
                    await run_in_threadpool(reader.flush)
            parser.finalize()
            await run_in_threadpool(reader.flush)
        except FormParserError as exc:
            raise _bad(f"the multipart body cannot be parsed: {exc}", ["body"]) from None
        finally:
            if reader.handle is not None:
                reader.handle.close()
        if reader.form.file is not None:
            if not reader.form.file.sha256:  # its part never ended
                raise _bad("the multipart body ends inside the file", ["body", file_field])
            if reader.handle is None:
                path.touch()  # an empty file part: the dataset code names the problem
            options = {name: reader.form.fields.pop(name) for name in TABLE_OPTION_FIELDS & set(reader.form.fields)}
            reader.form.file.options = options
        elif TABLE_OPTION_FIELDS & set(reader.form.fields):
            name = sorted(TABLE_OPTION_FIELDS & set(reader.form.fields))[0]
            raise _bad(f"form field {name!r} says how to read an uploaded file, but no file was sent", ["body", name])
        yield reader.form
