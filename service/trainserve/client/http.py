"""Typed httpx clients for the trainserve API, sync and async.

    with TrainserveClient("http://127.0.0.1:8000") as ts:
        dataset = ts.upload_dataset("moons.csv")
        job = ts.train({"dataset_id": dataset.id, "model": [...], "loss": "CrossEntropyLoss"})
        job = ts.wait(job.id)
        print(ts.predict(job.model_id, [[0.5, -0.2]]).predictions)

Both clients build the same requests and read the same responses (``_Calls``); only
sending differs. Errors come back as ``ApiError`` carrying the server's JSON body.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel, TypeAdapter

from trainserve.api.schemas import Dataset, Job, JobDetail, JobEvent, Model, PredictResponse

T = TypeVar("T")
FileArg = str | os.PathLike[str] | bytes
NPY_MEDIA_TYPE = "application/x-npy"  # the server's prediction_io says the same; not imported: it pulls in torch
ENDED = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code = status_code
        self.body = body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"{status_code}: {detail}")


def _file_part(file: FileArg, name: str | None) -> tuple[str, bytes]:
    if isinstance(file, bytes):
        return name or "upload.csv", file
    path = Path(file)
    return name or path.name, path.read_bytes()


def _params(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class _EventParser:
    """Server-Sent Events wire format -> JobEvent, one line at a time."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> JobEvent | None:
        if line == "":
            fields, self.fields = self.fields, {}
            if "data" not in fields:
                return None
            event_id = fields.get("id", "")
            return JobEvent(
                event=fields.get("event", "message"),
                id=int(event_id) if event_id.isdigit() else None,
                data=json.loads(fields["data"]),
            )
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data" and "data" in self.fields:
            value = f"{self.fields['data']}\n{value}"
        self.fields[name] = value
        return None


# Reconnections in a row, without an event between them, before events() gives up.
_EVENT_RECONNECTS = 5


class _Calls:
    """Request builders and response readers shared by both clients."""

    def __init__(self, api_key: str | None) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def upload(self, file: FileArg, filename: str | None) -> dict[str, Any]:
        return {"method": "POST", "url": "/datasets", "files": {"file": _file_part(file, filename)}}

    def train(self, spec: Mapping[str, Any], file: FileArg | None, filename: str | None) -> dict[str, Any]:
        if file is None:
            return {"method": "POST", "url": "/train", "json": dict(spec)}
        return {
            "method": "POST",
            "url": "/train",
            "data": {"spec": json.dumps(dict(spec))},
            "files": {"file": _file_part(file, filename)},
        }

    @staticmethod
    def predict(model_id: str | None, inputs: Any, name: str | None, version: int | None) -> dict[str, Any]:
        body = _params(model_id=model_id, name=name, version=version)
        return {"method": "POST", "url": "/predict", "json": {**body, "inputs": inputs}}

    @staticmethod
    def predict_array(x: Any, output: str, selector: dict[str, Any]) -> dict[str, Any]:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(x), allow_pickle=False)
        return {
            "method": "POST",
            "url": "/predict",
            "params": {**_params(**selector), "output": output},
            "content": buffer.getvalue(),
            "headers": {"Content-Type": NPY_MEDIA_TYPE, "Accept": NPY_MEDIA_TYPE},
        }

    @staticmethod
    def predict_csv(file: FileArg, filename: str | None, selector: dict[str, Any]) -> dict[str, Any]:
        fields = {key: str(value) for key, value in _params(**selector).items()}
        return {"method": "POST", "url": "/predict", "data": fields, "files": {"file": _file_part(file, filename)}}

    @staticmethod
    def read_array(response: httpx.Response) -> np.ndarray:
        _Calls.read(response, None)  # raises ApiError on an error status
        return np.load(io.BytesIO(response.content), allow_pickle=False)  # type: ignore[no-any-return]

    @staticmethod
    def read(response: httpx.Response, kind: type[T] | Any) -> T:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        if kind is None:
            return None  # type: ignore[return-value]
        if kind is bytes:
            return response.content  # type: ignore[return-value]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind.model_validate_json(response.content)  # type: ignore[return-value]
        return TypeAdapter(kind).validate_json(response.content)  # type: ignore[no-any-return]


class TrainserveClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._calls = _Calls(api_key or os.environ.get("TRAINSERVE_API_KEY"))
        self.http = httpx.Client(base_url=base_url, headers=self._calls.headers, timeout=timeout, transport=transport)

    def __enter__(self) -> TrainserveClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, kind: Any, **request: Any) -> Any:
        return _Calls.read(self.http.request(**request), kind)

    def upload_dataset(self, file: FileArg, filename: str | None = None) -> Dataset:
        return self._send(Dataset, **self._calls.upload(file, filename))  # type: ignore[no-any-return]

    def list_datasets(self) -> list[Dataset]:
        return self._send(list[Dataset], method="GET", url="/datasets")  # type: ignore[no-any-return]

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._send(Dataset, method="GET", url=f"/datasets/{dataset_id}")  # type: ignore[no-any-return]

    def delete_dataset(self, dataset_id: str) -> None:
        self._send(None, method="DELETE", url=f"/datasets/{dataset_id}")

    def train(self, spec: Mapping[str, Any], *, file: FileArg | None = None, filename: str | None = None) -> Job:
        return self._send(Job, **self._calls.train(spec, file, filename))  # type: ignore[no-any-return]

    def get_job(self, job_id: str) -> JobDetail:
        return self._send(JobDetail, method="GET", url=f"/jobs/{job_id}")  # type: ignore[no-any-return]

    def list_jobs(self, status: str | None = None, *, name: str | None = None, limit: int = 100) -> list[Job]:
        params = _params(status=status, name=name, limit=limit)
        return self._send(list[Job], method="GET", url="/jobs", params=params)  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str) -> Job:
        return self._send(Job, method="POST", url=f"/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def wait(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.2) -> JobDetail:
        """Poll until the job has ended; returns its final state."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.status in ENDED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
            time.sleep(poll)

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[JobEvent]:
        """The job's events as they happen (status, epoch, ..., end), from the first, or
        after epoch ``last_event_id``. Ends after the ``end`` event; a dropped connection
        is resumed where it broke off."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
                    if response.status_code >= 400:
                        response.read()
                        _Calls.read(response, None)
                    parser = _EventParser()
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        failures = 0
                        last_event_id = event.id if event.id is not None else last_event_id
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError:
                pass
            failures += 1  # the stream broke off before its end event
            if failures > _EVENT_RECONNECTS:
                raise ApiError(0, f"the event stream of job {job_id} kept breaking off")
            time.sleep(min(2.0, 0.25 * failures))

    def list_models(self, *, name: str | None = None, limit: int = 100) -> list[Model]:
        """Newest first; with ``name``, that model's versions, newest version first."""
        params = _params(name=name, limit=limit)
        return self._send(list[Model], method="GET", url="/models", params=params)  # type: ignore[no-any-return]

    def get_model(self, model_id: str) -> Model:
        return self._send(Model, method="GET", url=f"/models/{model_id}")  # type: ignore[no-any-return]

    def download_weights(self, model_id: str) -> bytes:
        return self._send(bytes, method="GET", url=f"/models/{model_id}/weights")  # type: ignore[no-any-return]

    def delete_model(self, model_id: str) -> None:
        self._send(None, method="DELETE", url=f"/models/{model_id}")

    def loss_plot(self, job_id: str, *, width: int = 800, height: int = 600) -> bytes:
        """The job's train/validation loss curve as PNG bytes."""
        params = {"width": width, "height": height}
        return self._send(bytes, method="GET", url=f"/jobs/{job_id}/loss.png", params=params)  # type: ignore[no-any-return]

    def model_plot(self, model_id: str, *, width: int = 800, height: int = 600) -> bytes:
        """Decision regions, fitted curve or predicted-vs-actual, as PNG bytes."""
        params = {"width": width, "height": height}
        return self._send(bytes, method="GET", url=f"/models/{model_id}/plot.png", params=params)  # type: ignore[no-any-return]

    def export_model(self, model_id: str, format: str = "torchscript") -> bytes:
        """The model as a TorchScript archive or a torch.export program (``format``)."""
        params = {"format": format}
        return self._send(bytes, method="GET", url=f"/models/{model_id}/export", params=params)  # type: ignore[no-any-return]

    def predict(
        self, model_id: str | None, inputs: list[Any], *, name: str | None = None, version: int | None = None
    ) -> PredictResponse:
        """Rows as lists or objects; name the model by id, or by ``name`` (newest, or ``version``)."""
        request = _Calls.predict(model_id, inputs, name, version)
        return self._send(PredictResponse, **request)  # type: ignore[no-any-return]

    def predict_array(
        self,
        x: Any,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        output: str = "predictions",
    ) -> np.ndarray:
        """A matrix in and an array out, both as ``.npy`` (the fast form for large batches)."""
        request = _Calls.predict_array(x, output, {"model_id": model_id, "name": name, "version": version})
        return _Calls.read_array(self.http.request(**request))

    def predict_csv(
        self,
        file: FileArg,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        filename: str | None = None,
    ) -> bytes:
        """A CSV with the model's feature columns in; the same CSV with prediction columns out."""
        request = _Calls.predict_csv(file, filename, {"model_id": model_id, "name": name, "version": version})
        return self._send(bytes, **request)  # type: ignore[no-any-return]


class AsyncTrainserveClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._calls = _Calls(api_key or os.environ.get("TRAINSERVE_API_KEY"))
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=self._calls.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncTrainserveClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, kind: Any, **request: Any) -> Any:
        return _Calls.read(await self.http.request(**request), kind)

    async def upload_dataset(self, file: FileArg, filename: str | None = None) -> Dataset:
        return await self._send(Dataset, **self._calls.upload(file, filename))  # type: ignore[no-any-return]

    async def list_datasets(self) -> list[Dataset]:
        return await self._send(list[Dataset], method="GET", url="/datasets")  # type: ignore[no-any-return]

    async def get_dataset(self, dataset_id: str) -> Dataset:
        return await self._send(Dataset, method="GET", url=f"/datasets/{dataset_id}")  # type: ignore[no-any-return]

    async def delete_dataset(self, dataset_id: str) -> None:
        await self._send(None, method="DELETE", url=f"/datasets/{dataset_id}")

    async def train(self, spec: Mapping[str, Any], *, file: FileArg | None = None, filename: str | None = None) -> Job:
        return await self._send(Job, **self._calls.train(spec, file, filename))  # type: ignore[no-any-return]

    async def get_job(self, job_id: str) -> JobDetail:
        return await self._send(JobDetail, method="GET", url=f"/jobs/{job_id}")  # type: ignore[no-any-return]

    async def list_jobs(self, status: str | None = None, *, name: str | None = None, limit: int = 100) -> list[Job]:
        params = _params(status=status, name=name, limit=limit)
        return await self._send(list[Job], method="GET", url="/jobs", params=params)  # type: ignore[no-any-return]

    async def cancel_job(self, job_id: str) -> Job:
        return await self._send(Job, method="POST", url=f"/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    async def wait(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.2) -> JobDetail:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job.status in ENDED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
            await asyncio.sleep(poll)

    async def events(self, job_id: str, *, last_event_id: int | None = None) -> AsyncIterator[JobEvent]:
        """As ``TrainserveClient.events``, asynchronously."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
            try:
                async with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _Calls.read(response, None)
                    parser = _EventParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        failures = 0
                        last_event_id = event.id if event.id is not None else last_event_id
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError:
                pass
            failures += 1
            if failures > _EVENT_RECONNECTS:
                raise ApiError(0, f"the event stream of job {job_id} kept breaking off")
            await asyncio.sleep(min(2.0, 0.25 * failures))

    async def list_models(self, *, name: str | None = None, limit: int = 100) -> list[Model]:
        params = _params(name=name, limit=limit)
        return await self._send(list[Model], method="GET", url="/models", params=params)  # type: ignore[no-any-return]

    async def get_model(self, model_id: str) -> Model:
        return await self._send(Model, method="GET", url=f"/models/{model_id}")  # type: ignore[no-any-return]

    async def download_weights(self, model_id: str) -> bytes:
        return await self._send(bytes, method="GET", url=f"/models/{model_id}/weights")  # type: ignore[no-any-return]

    async def delete_model(self, model_id: str) -> None:
        await self._send(None, method="DELETE", url=f"/models/{model_id}")

    async def loss_plot(self, job_id: str, *, width: int = 800, height: int = 600) -> bytes:
        params = {"width": width, "height": height}
        return await self._send(bytes, method="GET", url=f"/jobs/{job_id}/loss.png", params=params)  # type: ignore[no-any-return]

    async def model_plot(self, model_id: str, *, width: int = 800, height: int = 600) -> bytes:
        params = {"width": width, "height": height}
        return await self._send(bytes, method="GET", url=f"/models/{model_id}/plot.png", params=params)  # type: ignore[no-any-return]

    async def export_model(self, model_id: str, format: str = "torchscript") -> bytes:
        params = {"format": format}
        return await self._send(bytes, method="GET", url=f"/models/{model_id}/export", params=params)  # type: ignore[no-any-return]

    async def predict(
        self, model_id: str | None, inputs: list[Any], *, name: str | None = None, version: int | None = None
    ) -> PredictResponse:
        request = _Calls.predict(model_id, inputs, name, version)
        return await self._send(PredictResponse, **request)  # type: ignore[no-any-return]

    async def predict_array(
        self,
        x: Any,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        output: str = "predictions",
    ) -> np.ndarray:
        request = _Calls.predict_array(x, output, {"model_id": model_id, "name": name, "version": version})
        return _Calls.read_array(await self.http.request(**request))

    async def predict_csv(
        self,
        file: FileArg,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        filename: str | None = None,
    ) -> bytes:
        request = _Calls.predict_csv(file, filename, {"model_id": model_id, "name": name, "version": version})
        return await self._send(bytes, **request)  # type: ignore[no-any-return]
