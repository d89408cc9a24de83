"""Typed httpx clients for the trainserve API, sync and async.

    with TrainserveClient("http://127.0.0.1:8000") as ts:
        dataset = ts.upload_dataset("moons.csv")
        job = ts.train({"dataset_id": dataset.id, "model": [...], "loss": "CrossEntropyLoss"})
        job = ts.wait(job.id)
        print(ts.predict(job.model_id, [[0.5, -0.2]]).predictions)

Every endpoint is described once, in ``trainserve.client.endpoints`` (route, request, the
type of its answer); as httpx's ``Client`` and ``AsyncClient`` share a ``BaseClient``, the
two clients here only send: each verb applies an endpoint and sends the call. Errors come
back as ``ApiError`` carrying the server's JSON body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np

from trainserve.api.schemas import (
    Alias,
    Comparison,
    Dataset,
    DriftReport,
    Evaluation,
    Job,
    JobDetail,
    JobEvent,
    Model,
    ModelDetail,
    ModelName,
    PredictionLogEntry,
    PredictResponse,
    ShadowAgreement,
    Sweep,
    SweepDetail,
)
from trainserve.client import endpoints
from trainserve.client.endpoints import ApiError, Call, FileArg, auth_headers
from trainserve.client.events import EventStream, is_last
from trainserve.jobs.status import ENDED, JobStatus

__all__ = ["ApiError", "AsyncTrainserveClient", "FileArg", "TrainserveClient"]

T = TypeVar("T")


class _Deadline:
    """``wait``'s clock: has the job ended, and is there time left to poll again?"""

    def __init__(self, job_id: str, timeout: float) -> None:
        self.job_id, self.timeout = job_id, timeout
        self.at = time.monotonic() + timeout

    def reached(self, job: JobDetail) -> bool:
        if job.status in ENDED:
            return True
        if time.monotonic() > self.at:
            raise TimeoutError(f"job {self.job_id} still {job.status} after {self.timeout}s")
        return False


class TrainserveClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.http = httpx.Client(base_url=base_url, headers=auth_headers(api_key), timeout=timeout, transport=transport)

    def __enter__(self) -> TrainserveClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, call: Call[T]) -> T:
        with call.opened(self.http) as request:
            response = self.http.send(request)
        return call.read(response)

    def upload_dataset(
        self,
        file: FileArg,
        filename: str | None = None,
        *,
        delimiter: str | None = None,
        decimal: str | None = None,
        na_values: Sequence[str] | None = None,
    ) -> Dataset:
        return self._send(
            endpoints.upload_dataset(file, filename, delimiter=delimiter, decimal=decimal, na_values=na_values)
        )

    def list_datasets(self) -> list[Dataset]:
        return self._send(endpoints.list_datasets())

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._send(endpoints.get_dataset(dataset_id))

    def delete_dataset(self, dataset_id: str) -> None:
        self._send(endpoints.delete_dataset(dataset_id))

    def train(
        self,
        spec: Mapping[str, Any],
        *,
        file: FileArg | None = None,
        filename: str | None = None,
        delimiter: str | None = None,
        decimal: str | None = None,
        na_values: Sequence[str] | None = None,
    ) -> Job:
        return self._send(
            endpoints.train(
                spec, file=file, filename=filename, delimiter=delimiter, decimal=decimal, na_values=na_values
            )
        )

    def get_job(self, job_id: str) -> JobDetail:
        return self._send(endpoints.get_job(job_id))

    def list_jobs(
        self, status: JobStatus | None = None, *, name: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Job]:
        """One page of jobs, newest first (``offset``: how many newer ones to skip)."""
        return self._send(endpoints.list_jobs(status, name=name, limit=limit, offset=offset))

    def cancel_job(self, job_id: str) -> Job:
        return self._send(endpoints.cancel_job(job_id))

    def wait(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.2) -> JobDetail:
        """Poll until the job has ended; returns its final state."""
        deadline = _Deadline(job_id, timeout)
        while not deadline.reached(job := self.get_job(job_id)):
            time.sleep(poll)
        return job

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[JobEvent]:
        """The job's events as they happen (status, epoch, ..., end), from the first, or
        after epoch ``last_event_id``. Ends after the ``end`` event; a dropped connection
        is resumed where it broke off."""
        stream = EventStream(job_id, last_event_id)
        while True:
            call = stream.connect()
            try:
                response = self.http.send(call.build(self.http), stream=True)
                try:
                    if response.is_error:
                        response.read()
                        call.read(response)
                    for line in response.iter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                            if is_last(event):
                                return
                finally:
                    response.close()
            except httpx.TransportError:
                pass
            time.sleep(stream.broke_off())

    def list_models(self, *, name: str | None = None, limit: int = 100, offset: int = 0) -> list[Model]:
        """Newest first; with ``name``, that model's versions, newest version first. One page."""
        return self._send(endpoints.list_models(name=name, limit=limit, offset=offset))

    def get_model(self, model_id: str) -> ModelDetail:
        return self._send(endpoints.get_model(model_id))

    def download_weights(self, model_id: str) -> bytes:
        return self._send(endpoints.download_weights(model_id))

    def delete_model(self, model_id: str) -> None:
        self._send(endpoints.delete_model(model_id))

    def loss_plot(self, job_id: str, *, width: int = 800, height: int = 600) -> bytes:
        """The job's train/validation loss curve as PNG bytes."""
        return self._send(endpoints.loss_plot(job_id, width=width, height=height))

    def model_plot(self, model_id: str, *, width: int = 800, height: int = 600) -> bytes:
        """Decision regions, fitted curve or predicted-vs-actual, as PNG bytes."""
        return self._send(endpoints.model_plot(model_id, width=width, height=height))

    def confusion_plot(self, model_id: str, *, part: str = "test", width: int = 800, height: int = 600) -> bytes:
        """A classifier's confusion matrix on its test (or validation) rows, as PNG bytes."""
        return self._send(endpoints.confusion_plot(model_id, part=part, width=width, height=height))

    def export_model(self, model_id: str, format: str = "torchscript") -> bytes:
        """The model as a TorchScript archive or a torch.export program (``format``)."""
        return self._send(endpoints.export_model(model_id, format))

    def predict(
        self,
        model_id: str | None,
        inputs: list[Any],
        *,
        name: str | None = None,
        version: int | None = None,
        alias: str | None = None,
    ) -> PredictResponse:
        """Rows as lists or objects; name the model by id, or by ``name`` (its ``production``
        alias's version, else the newest; or ``version``, or ``alias``)."""
        return self._send(endpoints.predict(model_id, inputs, name=name, version=version, alias=alias))

    def predict_array(
        self,
        x: Any,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        output: str = "predictions",
        alias: str | None = None,
    ) -> np.ndarray:
        """A matrix in and an array out, both as ``.npy`` (the fast form for large batches)."""
        return self._send(
            endpoints.predict_array(x, model_id=model_id, name=name, version=version, output=output, alias=alias)
        )

    def predict_csv(
        self,
        file: FileArg,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        filename: str | None = None,
        alias: str | None = None,
    ) -> bytes:
        """A CSV with the model's feature columns in; the same CSV with prediction columns out."""
        call = endpoints.predict_csv(
            file, model_id=model_id, name=name, version=version, filename=filename, alias=alias
        )
        return self._send(call)

    def get_model_name(self, name: str) -> ModelName:
        """A model name's versions, aliases and alias history."""
        return self._send(endpoints.get_model_name(name))

    def set_alias(self, name: str, alias: str, version: int, *, note: str | None = None) -> Alias:
        """Point ``name@alias`` at ``version`` (``production``: what requests by name alone get)."""
        return self._send(endpoints.set_alias(name, alias, version, note=note))

    def delete_alias(self, name: str, alias: str, *, note: str | None = None) -> None:
        self._send(endpoints.delete_alias(name, alias, note=note))

    def list_predictions(self, model_id: str, *, limit: int = 100) -> list[PredictionLogEntry]:
        """The model's logged (sampled) predictions, newest first."""
        return self._send(endpoints.list_predictions(model_id, limit=limit))

    def model_drift(self, model_id: str) -> DriftReport:
        """Per feature, how far the logged requests moved from the training data."""
        return self._send(endpoints.model_drift(model_id))

    def shadow_agreement(self, name: str) -> ShadowAgreement:
        """How the name's ``shadow`` version agrees with the answers given, over logged requests."""
        return self._send(endpoints.shadow_agreement(name))

    # -- sweeps and comparison

    def create_sweep(
        self,
        sweep: Mapping[str, Any],
        *,
        file: FileArg | None = None,
        filename: str | None = None,
        delimiter: str | None = None,
        decimal: str | None = None,
        na_values: Sequence[str] | None = None,
    ) -> SweepDetail:
        return self._send(
            endpoints.create_sweep(
                sweep, file=file, filename=filename, delimiter=delimiter, decimal=decimal, na_values=na_values
            )
        )

    def list_sweeps(self, *, limit: int = 100) -> list[Sweep]:
        return self._send(endpoints.list_sweeps(limit=limit))

    def get_sweep(self, sweep_id: str) -> SweepDetail:
        return self._send(endpoints.get_sweep(sweep_id))

    def cancel_sweep(self, sweep_id: str) -> SweepDetail:
        return self._send(endpoints.cancel_sweep(sweep_id))

    def wait_sweep(self, sweep_id: str, *, timeout: float = 600.0, poll: float = 0.3) -> SweepDetail:
        """Poll until the sweep has ended and none of its trials is queued or running."""
        deadline = time.monotonic() + timeout
        while not sweep_done(sweep := self.get_sweep(sweep_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still {sweep.status} after {timeout}s")
            time.sleep(poll)
        return sweep

    def compare_sweep(self, sweep_id: str) -> Comparison:
        return self._send(endpoints.compare_sweep(sweep_id))

    def compare_models(self, model_ids: list[str]) -> Comparison:
        return self._send(endpoints.compare_models(model_ids))

    # -- evaluation

    def evaluate_model(self, model_id: str, dataset_id: str) -> Evaluation:
        return self._send(endpoints.evaluate_model(model_id, dataset_id))

    def list_evaluations(self, model_id: str) -> list[Evaluation]:
        return self._send(endpoints.list_evaluations(model_id))


class AsyncTrainserveClient:
    """As ``TrainserveClient``, each verb awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=auth_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncTrainserveClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, call: Call[T]) -> T:
        with call.opened(self.http) as request:
            response = await self.http.send(request)
        return call.read(response)

    async def upload_dataset(
        self,
        file: FileArg,
        filename: str | None = None,
        *,
        delimiter: str | None = None,
        decimal: str | None = None,
        na_values: Sequence[str] | None = None,
    ) -> Dataset:
        return await self._send(
            endpoints.upload_dataset(file, filename, delimiter=delimiter, decimal=decimal, na_values=na_values)
        )

    async def list_datasets(self) -> list[Dataset]:
        return await self._send(endpoints.list_datasets())

    async def get_dataset(self, dataset_id: str) -> Dataset:
        return await self._send(endpoints.get_dataset(dataset_id))

    async def delete_dataset(self, dataset_id: str) -> None:
        await self._send(endpoints.delete_dataset(dataset_id))

    async def train(
        self,
        spec: Mapping[str, Any],
        *,
        file: FileArg | None = None,
        filename: str | None = None,
        delimiter: str | None = None,
        decimal: str | None = None,
        na_values: Sequence[str] | None = None,
    ) -> Job:
        return await self._send(
            endpoints.train(
                spec, file=file, filename=filename, delimiter=delimiter, decimal=decimal, na_values=na_values
            )
        )

    async def get_job(self, job_id: str) -> JobDetail:
        return await self._send(endpoints.get_job(job_id))

    async def list_jobs(
        self, status: JobStatus | None = None, *, name: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Job]:
        return await self._send(endpoints.list_jobs(status, name=name, limit=limit, offset=offset))

    async def cancel_job(self, job_id: str) -> Job:
        return await self._send(endpoints.cancel_job(job_id))

    async def wait(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.2) -> JobDetail:
        deadline = _Deadline(job_id, timeout)
        while not deadline.reached(job := await self.get_job(job_id)):
            await asyncio.sleep(poll)
        return job

    async def events(self, job_id: str, *, last_event_id: int | None = None) -> AsyncIterator[JobEvent]:
        stream = EventStream(job_id, last_event_id)
        while True:
            call = stream.connect()
            try:
                response = await self.http.send(call.build(self.http), stream=True)
                try:
                    if response.is_error:
                        await response.aread()
                        call.read(response)
                    async for line in response.aiter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                            if is_last(event):
                                return
                finally:
                    await response.aclose()
            except httpx.TransportError:
                pass
            await asyncio.sleep(stream.broke_off())

    async def list_models(self, *, name: str | None = None, limit: int = 100, offset: int = 0) -> list[Model]:
        return await self._send(endpoints.list_models(name=name, limit=limit, offset=offset))

    async def get_model(self, model_id: str) -> ModelDetail:
        return await self._send(endpoints.get_model(model_id))

    async def download_weights(self, model_id: str) -> bytes:
        return await self._send(endpoints.download_weights(model_id))

    async def delete_model(self, model_id: str) -> None:
        await self._send(endpoints.delete_model(model_id))

    async def loss_plot(self, job_id: str, *, width: int = 800, height: int = 600) -> bytes:
        return await self._send(endpoints.loss_plot(job_id, width=width, height=height))

    async def model_plot(self, model_id: str, *, width: int = 800, height: int = 600) -> bytes:
        return await self._send(endpoints.model_plot(model_id, width=width, height=height))

    async def confusion_plot(self, model_id: str, *, part: str = "test", width: int = 800, height: int = 600) -> bytes:
        return await self._send(endpoints.confusion_plot(model_id, part=part, width=width, height=height))

    async def export_model(self, model_id: str, format: str = "torchscript") -> bytes:
        return await self._send(endpoints.export_model(model_id, format))

    async def predict(
        self,
        model_id: str | None,
        inputs: list[Any],
        *,
        name: str | None = None,
        version: int | None = None,
        alias: str | None = None,
    ) -> PredictResponse:
        return await self._send(endpoints.predict(model_id, inputs, name=name, version=version, alias=alias))

    async def predict_array(
        self,
        x: Any,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        output: str = "predictions",
        alias: str | None = None,
    ) -> np.ndarray:
        call = endpoints.predict_array(x, model_id=model_id, name=name, version=version, output=output, alias=alias)
        return await self._send(call)

    async def predict_csv(
        self,
        file: FileArg,
        *,
        model_id: str | None = None,
        name: str | None = None,
        version: int | None = None,
        filename: str | None = None,
        alias: str | None = None,
    ) -> bytes:
        call = endpoints.predict_csv(
            file, model_id=model_id, name=name, version=version, filename=filename, alias=alias
        )
        return await self._send(call)

    async def get_model_name(self, name: str) -> ModelName:
        return await self._send(endpoints.get_model_name(name))

    async def set_alias(self, name: str, alias: str, version: int, *, note: str | None = None) -> Alias:
        return await self._send(endpoints.set_alias(name, alias, version, note=note))

    async def delete_alias(self, name: str, alias: str, *, note: str | None = None) -> None:
        await self._send(endpoints.delete_alias(name, alias, note=note))

    async def list_predictions(self, model_id: str, *, limit: int = 100) -> list[PredictionLogEntry]:
        return await self._send(endpoints.list_predictions(model_id, limit=limit))

    async def model_drift(self, model_id: str) -> DriftReport:
        return await self._send(endpoints.model_drift(model_id))

    async def shadow_agreement(self, name: str) -> ShadowAgreement:
        return await self._send(endpoints.shadow_agreement(name))

    # -- sweeps and comparison

    async def create_sweep(
        self,
        sweep: Mapping[str, Any],
        *,
        file: FileArg | None = None,
        filename: str | None = None,
        delimiter: str | None = None,
        decimal: str | None = None,
        na_values: Sequence[str] | None = None,
    ) -> SweepDetail:
        return await self._send(
            endpoints.create_sweep(
                sweep, file=file, filename=filename, delimiter=delimiter, decimal=decimal, na_values=na_values
            )
        )

    async def list_sweeps(self, *, limit: int = 100) -> list[Sweep]:
        return await self._send(endpoints.list_sweeps(limit=limit))

    async def get_sweep(self, sweep_id: str) -> SweepDetail:
        return await self._send(endpoints.get_sweep(sweep_id))

    async def cancel_sweep(self, sweep_id: str) -> SweepDetail:
        return await self._send(endpoints.cancel_sweep(sweep_id))

    async def wait_sweep(self, sweep_id: str, *, timeout: float = 600.0, poll: float = 0.3) -> SweepDetail:
        """Poll until the sweep has ended and none of its trials is queued or running."""
        deadline = time.monotonic() + timeout
        while not sweep_done(sweep := await self.get_sweep(sweep_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still {sweep.status} after {timeout}s")
            await asyncio.sleep(poll)
        return sweep

    async def compare_sweep(self, sweep_id: str) -> Comparison:
        return await self._send(endpoints.compare_sweep(sweep_id))

    async def compare_models(self, model_ids: list[str]) -> Comparison:
        return await self._send(endpoints.compare_models(model_ids))

    # -- evaluation

    async def evaluate_model(self, model_id: str, dataset_id: str) -> Evaluation:
        return await self._send(endpoints.evaluate_model(model_id, dataset_id))

    async def list_evaluations(self, model_id: str) -> list[Evaluation]:
        return await self._send(endpoints.list_evaluations(model_id))


def sweep_done(sweep: SweepDetail) -> bool:
    """The sweep asks for no more trials and none of its trials is still queued or running."""
    return sweep.status != "running" and all(t.state not in ("queued", "running") for t in sweep.trials)
