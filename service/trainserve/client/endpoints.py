"""Every endpoint the clients call, described once: its route (method and path template),
how a call's arguments become the request, and the type its answer is read into.

An endpoint applied to arguments is a ``Call[T]``, a request ready to send; both clients
(``trainserve.client.http``) only send it and hand its answer to ``Call.read``, so mypy
knows what each verb returns and neither client spells out a method or a path. Several
endpoints may share a route: ``POST /predict`` takes JSON rows, a ``.npy`` matrix or a CSV,
and answers in kind.

Imports stay light (httpx, numpy, pydantic and the API's schemas): no torch, no FastAPI.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, ParamSpec, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import TypeAdapter

from trainserve.api.schemas import (
    Alias,
    Comparison,
    Dataset,
    DriftReport,
    Evaluation,
    Job,
    JobDetail,
    Model,
    ModelDetail,
    ModelName,
    PredictionLogEntry,
    PredictResponse,
    ShadowAgreement,
    Sweep,
    SweepDetail,
)
from trainserve.jobs.status import JobStatus
from trainserve.wire import NPY_MEDIA_TYPE

T = TypeVar("T")
P = ParamSpec("P")
FileArg = str | os.PathLike[str] | bytes
# The async client's reads of a file it sends as the body (upload_dataset), each in a worker
# thread, so the event loop does not wait on the disk; large enough that the thread hops cost
# nothing beside the network. (A file in a multipart form is read by httpx itself, on the loop.)
_ASYNC_CHUNK_BYTES = 256 * 1024


class ApiError(Exception):
    """A refused request: the server's status code and its JSON body (or text). Status 0:
    no answer at all, an event stream that kept breaking off."""

    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code = status_code
        self.body = body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"{status_code}: {detail}")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers every request carries: the API key given, else ``$TRAINSERVE_API_KEY``."""
    key = api_key or os.environ.get("TRAINSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


# -- answers --------------------------------------------------------------------------------------

Reader = Callable[[httpx.Response], T]


def checked(response: httpx.Response) -> httpx.Response:
    """The response itself, or ``ApiError`` for an error status (its body must be read)."""
    if response.is_error:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        raise ApiError(response.status_code, body)
    return response


def no_body(response: httpx.Response) -> None:
    checked(response)


def raw_bytes(response: httpx.Response) -> bytes:
    return checked(response).content


def npy_array(response: httpx.Response) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(checked(response).content), allow_pickle=False)
    return array


def json_as(kind: type[T]) -> Reader[T]:
    """A reader validating the JSON answer as ``kind`` (a schema, or a list of them)."""
    adapter = TypeAdapter(kind)

    def read(response: httpx.Response) -> T:
        return adapter.validate_json(checked(response).content)

    return read


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnDisk:
    """A file sent as it is read from disk, never whole in memory (a table may be larger than
    the client's memory); opened only while its call is sent."""

    path: Path


Body = bytes | OnDisk


@dataclass(frozen=True)
class Request:
    """What a call sends besides its route: the path template's values and the rest."""

    path: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str | int] | None = None
    json: Any = None
    data: Mapping[str, str] | None = None
    files: Mapping[str, tuple[str, Body]] | None = None
    content: Body | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request ready to send, and how its answer is read."""

    method: str
    url: str
    request: Request
    read: Reader[T]

    @contextmanager
    def opened(self, http: httpx.Client | httpx.AsyncClient) -> Iterator[httpx.Request]:
        """The httpx request, its files on disk open while the block sends it, closed after."""
        with ExitStack() as files:
            yield self.build(http, files)

    def build(self, http: httpx.Client | httpx.AsyncClient, files: ExitStack | None = None) -> httpx.Request:
        """The httpx request, on ``http``'s base URL and with its headers (the API key).
        A file on disk is opened on ``files``, which must then outlive the send."""
        sent = self.request
        headers = dict(sent.headers or {})
        content: Any = sent.content
        if isinstance(content, OnDisk):
            handle = _open(content, files)
            if isinstance(http, httpx.AsyncClient):
                # httpx reads a file object only in a sync client; its length, which httpx
                # takes from the file there, is given here so that the body is not chunked.
                headers["Content-Length"] = str(os.fstat(handle.fileno()).st_size)
                content = _read_in_thread(handle)
            else:
                content = handle  # read 64 KiB at a time; Content-Length from the file's size
        parts = None
        if sent.files is not None:
            # httpx streams a file object in multipart too, and counts its size for Content-Length.
            parts = {
                key: (name, _open(body, files) if isinstance(body, OnDisk) else body)
                for key, (name, body) in sent.files.items()
            }
        return http.build_request(
            self.method,
            self.url,
            params=sent.params,
            json=sent.json,
            data=sent.data,
            files=parts,
            content=content,
            headers=headers or None,
        )


def _open(body: OnDisk, files: ExitStack | None) -> IO[bytes]:
    if files is None:
        raise TypeError(f"{body.path} is sent from disk: build the request with Call.opened, which closes it")
    return files.enter_context(open(body.path, "rb"))


async def _read_in_thread(handle: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(handle.read, _ASYNC_CHUNK_BYTES):
        yield chunk


@dataclass(frozen=True)
class Route:
    """A method and a path template of the server's API, e.g. ``GET /jobs/{job_id}``."""

    method: str
    path: str

    def reads(self, read: Reader[T]) -> Callable[[Callable[P, Request]], Endpoint[P, T]]:
        """Decorates a request builder into an endpoint on this route answering ``T``."""

        def endpoint(build: Callable[P, Request]) -> Endpoint[P, T]:
            return Endpoint(self, build, read)

        return endpoint


class Endpoint(Generic[P, T]):
    """A route, how its request is built from the verb's arguments (``P``), and what its answer
    is read into (``T``). Calling it gives the ``Call[T]`` a client sends."""

    def __init__(self, route: Route, build: Callable[P, Request], read: Reader[T]) -> None:
        self.route = route
        self.build = build
        self.read = read
        self.name = build.__name__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Call[T]:
        request = self.build(*args, **kwargs)
        # Quoted, so that an id holding "/" or ".." stays one path segment.
        url = self.route.path.format_map({key: quote(value, safe="") for key, value in request.path.items()})
        return Call(self.route.method, url, request, self.read)

    def __repr__(self) -> str:
        return f"<Endpoint {self.name}: {self.route.method} {self.route.path}>"


def _file_part(file: FileArg, name: str | None) -> tuple[str, Body]:
    """The file's name and its bytes, or (a regular file) the file itself, read as it is sent."""
    if isinstance(file, bytes):
        return name or "upload.csv", file
    path = Path(file)
    if path.is_file():
        return name or path.name, OnDisk(path)
    # A pipe (`<(zcat t.csv.gz)`, /dev/stdin) has no size to send as Content-Length: read
    # whole, as every file once was. A missing path fails here, before anything is sent.
    return name or path.name, path.read_bytes()


def _present(**values: str | int | None) -> dict[str, str | int]:
    """The values given: a ``None`` argument is left out of the query or form."""
    return {key: value for key, value in values.items() if value is not None}


# -- the table ------------------------------------------------------------------------------------
# One builder per endpoint; the decorator names its route and the type of its answer.


def _reading(delimiter: str | None, decimal: str | None, na_values: Sequence[str] | None) -> dict[str, str]:
    """How the server is to read an uploaded CSV (left out: it guesses); refused with no file."""
    fields = _present(delimiter=delimiter, decimal=decimal)
    if na_values is not None:
        if isinstance(na_values, str):  # a str is a Sequence[str] too: "NA" would send N and A
            raise TypeError("na_values is a list of strings, such as ['NA', '?']")
        fields["na_values"] = json.dumps(list(na_values))
    return {key: str(value) for key, value in fields.items()}


def _json_or_form(
    field: str, body: Mapping[str, Any], file: FileArg | None, filename: str | None, reading: dict[str, str]
) -> Request:
    """``body`` as JSON (it names an uploaded dataset), or as the form field ``field`` beside
    the file, with how to read it (refused without a file)."""
    if file is None:
        if reading:
            raise TypeError(f"{sorted(reading)} say how to read an uploaded file: pass the file too")
        return Request(json=dict(body))
    return Request(data={field: json.dumps(dict(body)), **reading}, files={"file": _file_part(file, filename)})


@Route("POST", "/datasets").reads(json_as(Dataset))
def upload_dataset(
    file: FileArg,
    filename: str | None = None,
    *,
    delimiter: str | None = None,
    decimal: str | None = None,
    na_values: Sequence[str] | None = None,
) -> Request:
    """The file as the request body itself, its name and the reading options in the query:
    no multipart framing for the server to parse (the fast way for large tables)."""
    name, payload = _file_part(file, filename)
    params = {"filename": name, **_reading(delimiter, decimal, na_values)}
    return Request(params=params, content=payload, headers={"content-type": "application/octet-stream"})


@Route("GET", "/datasets").reads(json_as(list[Dataset]))
def list_datasets() -> Request:
    return Request()


@Route("GET", "/datasets/{dataset_id}").reads(json_as(Dataset))
def get_dataset(dataset_id: str) -> Request:
    return Request(path={"dataset_id": dataset_id})


@Route("DELETE", "/datasets/{dataset_id}").reads(no_body)
def delete_dataset(dataset_id: str) -> Request:
    return Request(path={"dataset_id": dataset_id})


@Route("POST", "/train").reads(json_as(Job))
def train(
    spec: Mapping[str, Any],
    *,
    file: FileArg | None = None,
    filename: str | None = None,
    delimiter: str | None = None,
    decimal: str | None = None,
    na_values: Sequence[str] | None = None,
) -> Request:
    """The spec as JSON naming an uploaded dataset, or as a form field beside the file to train on."""
    return _json_or_form("spec", spec, file, filename, _reading(delimiter, decimal, na_values))


@Route("GET", "/jobs/{job_id}").reads(json_as(JobDetail))
def get_job(job_id: str) -> Request:
    return Request(path={"job_id": job_id})


@Route("GET", "/jobs").reads(json_as(list[Job]))
def list_jobs(
    status: JobStatus | None = None, *, name: str | None = None, limit: int = 100, offset: int = 0
) -> Request:
    """Newest first, one page: ``limit`` jobs (at most 1000) after the first ``offset``."""
    return Request(params=_present(status=status, name=name, limit=limit, offset=offset or None))


@Route("POST", "/jobs/{job_id}/cancel").reads(json_as(Job))
def cancel_job(job_id: str) -> Request:
    return Request(path={"job_id": job_id})


# Server-Sent Events: the clients stream the body line by line (trainserve.client.events);
# the reader only turns an error status into ApiError.
@Route("GET", "/jobs/{job_id}/events").reads(no_body)
def events(job_id: str, *, last_event_id: int | None = None) -> Request:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else None
    return Request(path={"job_id": job_id}, headers=headers)


@Route("GET", "/jobs/{job_id}/loss.png").reads(raw_bytes)
def loss_plot(job_id: str, *, width: int = 800, height: int = 600) -> Request:
    return Request(path={"job_id": job_id}, params={"width": width, "height": height})


@Route("GET", "/models").reads(json_as(list[Model]))
def list_models(*, name: str | None = None, limit: int = 100, offset: int = 0) -> Request:
    """Newest first, one page: ``limit`` models (at most 1000) after the first ``offset``."""
    return Request(params=_present(name=name, limit=limit, offset=offset or None))


@Route("GET", "/models/{model_id}").reads(json_as(ModelDetail))
def get_model(model_id: str) -> Request:
    return Request(path={"model_id": model_id})


@Route("DELETE", "/models/{model_id}").reads(no_body)
def delete_model(model_id: str) -> Request:
    return Request(path={"model_id": model_id})


@Route("GET", "/models/{model_id}/weights").reads(raw_bytes)
def download_weights(model_id: str) -> Request:
    return Request(path={"model_id": model_id})


@Route("GET", "/models/{model_id}/plot.png").reads(raw_bytes)
def model_plot(model_id: str, *, width: int = 800, height: int = 600) -> Request:
    return Request(path={"model_id": model_id}, params={"width": width, "height": height})


@Route("GET", "/models/{model_id}/confusion.png").reads(raw_bytes)
def confusion_plot(model_id: str, *, part: str = "test", width: int = 800, height: int = 600) -> Request:
    return Request(path={"model_id": model_id}, params={"part": part, "width": width, "height": height})


@Route("GET", "/models/{model_id}/export").reads(raw_bytes)
def export_model(model_id: str, format: str = "torchscript") -> Request:
    return Request(path={"model_id": model_id}, params={"format": format})


_PREDICT = Route("POST", "/predict")


@_PREDICT.reads(json_as(PredictResponse))
def predict(
    model_id: str | None,
    inputs: list[Any],
    *,
    name: str | None = None,
    version: int | None = None,
    alias: str | None = None,
) -> Request:
    return Request(json={**_present(model_id=model_id, name=name, version=version, alias=alias), "inputs": inputs})


@_PREDICT.reads(npy_array)
def predict_array(
    x: Any,
    *,
    model_id: str | None = None,
    name: str | None = None,
    version: int | None = None,
    output: str = "predictions",
    alias: str | None = None,
) -> Request:
    """The model named in the query string, since the body is the matrix."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(x), allow_pickle=False)
    return Request(
        params={**_present(model_id=model_id, name=name, version=version, alias=alias), "output": output},
        content=buffer.getvalue(),
        headers={"Content-Type": NPY_MEDIA_TYPE, "Accept": NPY_MEDIA_TYPE},
    )


@_PREDICT.reads(raw_bytes)
def predict_csv(
    file: FileArg,
    *,
    model_id: str | None = None,
    name: str | None = None,
    version: int | None = None,
    filename: str | None = None,
    alias: str | None = None,
) -> Request:
    """The model named in form fields beside the file."""
    named = _present(model_id=model_id, name=name, version=version, alias=alias)
    fields = {key: str(value) for key, value in named.items()}
    return Request(data=fields, files={"file": _file_part(file, filename)})


@Route("GET", "/models/by-name/{name}").reads(json_as(ModelName))
def get_model_name(name: str) -> Request:
    return Request(path={"name": name})


@Route("PUT", "/models/by-name/{name}/aliases/{alias}").reads(json_as(Alias))
def set_alias(name: str, alias: str, version: int, *, note: str | None = None) -> Request:
    return Request(path={"name": name, "alias": alias}, json=_present(version=version, note=note))


@Route("DELETE", "/models/by-name/{name}/aliases/{alias}").reads(no_body)
def delete_alias(name: str, alias: str, *, note: str | None = None) -> Request:
    return Request(path={"name": name, "alias": alias}, params=_present(note=note))


@Route("GET", "/models/{model_id}/predictions").reads(json_as(list[PredictionLogEntry]))
def list_predictions(model_id: str, *, limit: int = 100) -> Request:
    return Request(path={"model_id": model_id}, params={"limit": limit})


@Route("GET", "/models/{model_id}/drift").reads(json_as(DriftReport))
def model_drift(model_id: str) -> Request:
    return Request(path={"model_id": model_id})


@Route("GET", "/models/by-name/{name}/shadow").reads(json_as(ShadowAgreement))
def shadow_agreement(name: str) -> Request:
    return Request(path={"name": name})


# -- sweeps and comparison -------------------------------------------------------------------------


@Route("POST", "/sweeps").reads(json_as(SweepDetail))
def create_sweep(
    sweep: Mapping[str, Any],
    *,
    file: FileArg | None = None,
    filename: str | None = None,
    delimiter: str | None = None,
    decimal: str | None = None,
    na_values: Sequence[str] | None = None,
) -> Request:
    """The sweep as JSON (its base naming an uploaded dataset), or as a form field beside the file."""
    return _json_or_form("sweep", sweep, file, filename, _reading(delimiter, decimal, na_values))


@Route("GET", "/sweeps").reads(json_as(list[Sweep]))
def list_sweeps(*, limit: int = 100) -> Request:
    return Request(params={"limit": limit})


@Route("GET", "/sweeps/{sweep_id}").reads(json_as(SweepDetail))
def get_sweep(sweep_id: str) -> Request:
    return Request(path={"sweep_id": sweep_id})


@Route("POST", "/sweeps/{sweep_id}/cancel").reads(json_as(SweepDetail))
def cancel_sweep(sweep_id: str) -> Request:
    return Request(path={"sweep_id": sweep_id})


@Route("GET", "/sweeps/{sweep_id}/compare").reads(json_as(Comparison))
def compare_sweep(sweep_id: str) -> Request:
    return Request(path={"sweep_id": sweep_id})


@Route("GET", "/models/compare").reads(json_as(Comparison))
def compare_models(model_ids: list[str]) -> Request:
    return Request(params={"ids": ",".join(model_ids)})


# -- evaluation ----------------------------------------------------------------------------------


@Route("POST", "/models/{model_id}/evaluate").reads(json_as(Evaluation))
def evaluate_model(model_id: str, dataset_id: str) -> Request:
    return Request(path={"model_id": model_id}, json={"dataset_id": dataset_id})


@Route("GET", "/models/{model_id}/evaluations").reads(json_as(list[Evaluation]))
def list_evaluations(model_id: str) -> Request:
    return Request(path={"model_id": model_id})
