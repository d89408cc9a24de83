"""The client's table of endpoints: each one reached through both clients against a real
server, and the rules that keep the clients thin (one route per endpoint, spelled once; no
``type: ignore``; the sync and async verbs take the same arguments as the table)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import csv
import hashlib
import inspect
import io
import os
import re
import socket
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import Server, moons_spec
from trainserve.api.schemas import Dataset, Job, JobDetail, JobEvent, Model, PredictResponse, SweepDetail
from trainserve.client import AsyncTrainserveClient, TrainserveClient, endpoints
from trainserve.client.endpoints import ApiError, Endpoint
from trainserve.jobs.status import JobStatus

CLIENT_PACKAGE = Path(endpoints.__file__).parent
TABLE: dict[str, Endpoint[Any, Any]] = {
    value.name: value for value in vars(endpoints).values() if isinstance(value, Endpoint)
}
Client = TrainserveClient | AsyncTrainserveClient


def test_the_table_lists_the_routes_the_clients_use() -> None:
    routes = {(e.route.method, e.route.path) for e in TABLE.values()}
    assert len(TABLE) == 34
    assert ("GET", "/models/{model_id}/confusion.png") in routes
    assert ("GET", "/jobs/{job_id}/events") in routes
    assert ("POST", "/predict") in routes
    assert sum(e.route.path == "/predict" for e in TABLE.values()) == 3  # JSON, .npy and CSV


# -- static rules ---------------------------------------------------------------------------------


def _client_sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(CLIENT_PACKAGE.glob("*.py"))}


def test_no_type_ignore_in_the_client_package() -> None:
    sources = _client_sources()
    assert CLIENT_PACKAGE / "http.py" in sources
    for path, text in sources.items():
        assert "type: ignore" not in text, path.name


def test_each_route_is_spelled_once_and_only_in_the_table() -> None:
    """A path appears in the client only as a ``Route(method, path)`` in endpoints.py, and no
    method + path pair twice; the clients and the CLI name endpoints, never URLs."""
    spelled: list[tuple[str, str]] = []
    for path, text in _client_sources().items():
        tree = ast.parse(text)
        in_routes: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Route":
                assert path.name == "endpoints.py", f"a Route outside the table, in {path.name}"
                method, template = (arg.value for arg in node.args if isinstance(arg, ast.Constant))
                spelled.append((method, template))
                in_routes.update(id(arg) for arg in node.args)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_routes:
                assert not re.match(r"/(datasets|train|jobs|models|predict)\b", node.value), (path.name, node.value)
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                assert not str(node.values[0].value).startswith("/"), (path.name, ast.unparse(node))
    assert len(spelled) == len(set(spelled)), sorted(spelled)
    assert set(spelled) == {(e.route.method, e.route.path) for e in TABLE.values()}


def _parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_both_clients_offer_each_endpoint_with_the_tables_arguments(name: str) -> None:
    build = TABLE[name].build
    sync_verb = getattr(TrainserveClient, name)
    async_verb = getattr(AsyncTrainserveClient, name)
    assert _parameters(sync_verb) == _parameters(build)
    assert _parameters(async_verb) == _parameters(build)
    assert inspect.iscoroutinefunction(async_verb) or inspect.isasyncgenfunction(async_verb)
    assert not inspect.iscoroutinefunction(sync_verb)


def test_the_clients_offer_the_same_verbs() -> None:
    def verbs(cls: type) -> set[str]:
        return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}

    assert verbs(TrainserveClient) - {"close"} == verbs(AsyncTrainserveClient) - {"aclose"}
    assert verbs(TrainserveClient) - {"close", "wait", "wait_sweep"} == set(TABLE)


def test_a_call_is_the_request_the_server_expects() -> None:
    call = endpoints.get_job("../../etc")
    assert (call.method, call.url) == ("GET", "/jobs/..%2F..%2Fetc")  # one path segment, whatever the id
    with httpx.Client(base_url="http://127.0.0.1:1", headers=endpoints.auth_headers("k")) as http:
        request = endpoints.events("j", last_event_id=7).build(http)
    assert str(request.url) == "http://127.0.0.1:1/jobs/j/events"
    assert request.headers["Last-Event-ID"] == "7"
    assert request.headers["Authorization"] == "Bearer k"


def test_a_file_on_disk_is_sent_as_it_is_read_with_its_length(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_bytes(b"x,y\n" + b"1,2\n" * 1000)
    call = endpoints.upload_dataset(table)
    sync, not_sync = httpx.Client(base_url="http://127.0.0.1:1"), httpx.AsyncClient(base_url="http://127.0.0.1:1")
    for http in (sync, not_sync):
        with call.opened(http) as request:
            assert request.headers["Content-Length"] == str(table.stat().st_size)  # not chunked
            assert "Transfer-Encoding" not in request.headers
            assert not isinstance(request.stream, httpx.ByteStream)  # not read into memory
    with pytest.raises(TypeError, match=r"Call\.opened"):  # a file must not be left open
        call.build(sync)
    sync.close()
    asyncio.run(not_sync.aclose())
    with pytest.raises(FileNotFoundError):  # before anything is sent
        endpoints.upload_dataset(tmp_path / "missing.csv")


def test_a_pipe_is_read_whole_and_sent_with_its_length(tmp_path: Path) -> None:
    # `trainserve upload <(zcat t.csv.gz)`: a pipe has no size for Content-Length, so it is
    # read whole first, as every file once was (a regular file is streamed, above).
    pipe = tmp_path / "t.csv"
    os.mkfifo(pipe)
    table = b"x,y\n" + b"1,2\n" * 1000
    writer = threading.Thread(target=pipe.write_bytes, args=(table,))
    writer.start()
    call = endpoints.upload_dataset(pipe)
    writer.join()
    with httpx.Client(base_url="http://127.0.0.1:1") as http, call.opened(http) as request:
        assert request.headers["Content-Length"] == str(len(table))
        assert request.read() == table


ROWS_PER_PART, PARTS = 35_000, 20


def big_table(path: Path) -> bytes:
    """A numeric CSV of about 20 MB (PARTS x ROWS_PER_PART rows) written to ``path``; its sha256."""
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for part in [b"a,b,c,label\n"] + [
            "".join(
                f"{a:.6f},{b:.6f},{c:.6f},{int(a > 0)}\n" for a, b, c in rng.normal(size=(ROWS_PER_PART, 3))
            ).encode()
            for _ in range(PARTS)
        ]:
            out.write(part)
            digest.update(part)
    return digest.digest()


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # the client's memory, not the database
def test_a_large_file_uploads_from_disk_in_bounded_memory_through_both_clients(server: Server, tmp_path: Path) -> None:
    table = tmp_path / "large.csv"
    sha256 = big_table(table).hex()
    size = table.stat().st_size
    assert size > 20 * 1024 * 1024
    n_rows = PARTS * ROWS_PER_PART

    async def upload_async() -> Dataset:
        async with AsyncTrainserveClient(server.url, timeout=120) as client:
            return await client.upload_dataset(table)

    with TrainserveClient(server.url, timeout=120) as client:
        uploads = {"sync": lambda: client.upload_dataset(table), "async": lambda: asyncio.run(upload_async())}
        for kind, upload in uploads.items():
            tracemalloc.start()
            try:
                dataset = upload()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # The stored table is the file's bytes, all of them ...
            assert (dataset.sha256, dataset.n_rows, dataset.filename) == (sha256, n_rows, "large.csv"), kind
            assert [c.name for c in dataset.columns] == ["a", "b", "c", "label"]
            # ... and the client never held more than a few chunks of them.
            assert peak < size / 8, f"{kind}: {peak:,} bytes at peak for a {size:,}-byte file"
            client.delete_dataset(dataset.id)


# -- every endpoint, through both clients, against the real server ---------------------------------


class Driver:
    """Calls a client's verbs by name, awaiting the async client's, and records which verbs
    ran and which routes the server saw, so that one flow covers both clients."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.verbs: set[str] = set()
        self.sent: list[tuple[str, str]] = []

    def record(self, request: httpx.Request) -> None:
        self.sent.append((request.method, request.url.path))

    async def __call__(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        self.verbs.add(verb)
        result = getattr(self.client, verb)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def events(self, job_id: str) -> list[JobEvent]:
        self.verbs.add("events")
        if isinstance(self.client, AsyncTrainserveClient):
            return [event async for event in self.client.events(job_id)]
        return list(self.client.events(job_id))


_LR = {"optimizer.lr": {"choice": [0.01, 0.02]}}


async def _every_endpoint(ts: Driver, moons: bytes) -> None:
    dataset = await ts("upload_dataset", moons, "moons.csv")
    assert isinstance(dataset, Dataset)
    assert dataset.n_rows == 200
    assert dataset.id in [d.id for d in await ts("list_datasets")]
    assert (await ts("get_dataset", dataset.id)).sha256 == dataset.sha256
    # how to read it: the server would sniff ';' and the decimal comma, but not '?' as missing
    european = b"x;label\n1,5;a\n?;b\n2,25;a\n"
    read = await ts("upload_dataset", european, "eu.csv", delimiter=";", decimal=",", na_values=["?"])
    assert [(c.name, c.kind, c.missing) for c in read.columns] == [("x", "number", 1), ("label", "category", 0)]
    assert read.columns[0].profile is not None
    assert read.columns[0].profile.max == 2.25
    await ts("delete_dataset", read.id)

    job = await ts("train", moons_spec(dataset.id, epochs=3, name="endpoints"))
    assert isinstance(job, Job)
    done = await ts("wait", job.id)
    assert isinstance(done, JobDetail)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert (await ts("get_job", job.id)).history
    assert job.id in [j.id for j in await ts("list_jobs", JobStatus.SUCCEEDED, name="endpoints")]
    events = await ts.events(job.id)
    assert [e.event for e in events][-1] == "end"
    assert events[-1].data["model_id"] == done.model_id

    # the spec beside its file (the form), then cancelled before it can end on its own
    # (as a pipe-separated file, read as the form field says)
    piped = moons.replace(b",", b"|")
    long_job = await ts("train", moons_spec(epochs=5000), file=piped, filename="moons.txt", delimiter="|")
    cancelled = await ts("cancel_job", long_job.id)
    assert cancelled.status in (JobStatus.CANCELLED, JobStatus.RUNNING)
    assert (await ts("wait", long_job.id, timeout=60)).status == JobStatus.CANCELLED
    # paging: one job per page, newest first
    newest, before = await ts("list_jobs", limit=1), await ts("list_jobs", limit=1, offset=1)
    assert [newest[0].id, before[0].id] == [long_job.id, job.id]

    model_id = done.model_id
    model = await ts("get_model", model_id)
    assert isinstance(model, Model)
    assert model_id in [m.id for m in await ts("list_models", name="endpoints")]
    assert await ts("list_models", name="endpoints", limit=1, offset=1) == []  # one version: one page
    assert len(await ts("download_weights", model_id)) == model.weights_bytes
    for png in (await ts("loss_plot", job.id, width=320, height=240), await ts("model_plot", model_id)):
        assert png.startswith(b"\x89PNG")
    assert (await ts("export_model", model_id)).startswith(b"PK")  # a TorchScript zip archive
    with pytest.raises(ApiError) as no_test_rows:  # trained without a test split: nothing to plot
        await ts("confusion_plot", model_id)
    assert no_test_rows.value.status_code == 409

    rows = [[0.0, 0.5], [1.0, -0.5]]
    answer = await ts("predict", model_id, rows)
    assert isinstance(answer, PredictResponse)
    by_name = await ts("predict", None, rows, name="endpoints", version=model.version)
    assert by_name.predictions == answer.predictions
    array = await ts("predict_array", np.array(rows), model_id=model_id)
    assert isinstance(array, np.ndarray)
    assert array.tolist() == answer.predictions
    table = await ts("predict_csv", b"x0,x1\n0.0,0.5\n1.0,-0.5\n", name="endpoints")
    records = list(csv.reader(io.StringIO(table.decode())))
    assert records[0] == ["x0", "x1", "predicted_label", "probability_0", "probability_1"]
    assert [int(r[2]) for r in records[1:]] == answer.predictions

    # aliases: set, read, predict through, refuse the delete of the version it holds, remove
    alias = await ts("set_alias", "endpoints", "production", model.version, note="first")
    assert alias.version == model.version
    named = await ts("get_model_name", "endpoints")
    assert named.serving_version == model.version
    assert [e.note for e in named.history][:1] == ["first"]
    via_alias = await ts("predict", None, rows, name="endpoints", alias="production")
    assert via_alias.predictions == answer.predictions
    with pytest.raises(ApiError) as held:
        await ts("delete_model", model_id)
    assert held.value.status_code == 409
    await ts("set_alias", "endpoints", "shadow", model.version)
    assert (await ts("shadow_agreement", "endpoints")).shadow_version == model.version
    await ts("delete_alias", "endpoints", "shadow")
    await ts("delete_alias", "endpoints", "production", note="done")
    assert isinstance(await ts("list_predictions", model_id, limit=5), list)
    assert [f.feature for f in (await ts("model_drift", model_id)).features] == ["x0", "x1"]

    # a one-trial sweep, compared with the job above; a second sweep cancelled
    sweep = await ts("create_sweep", {"base": moons_spec(dataset.id, epochs=2), "search": _LR, "trials": 1})
    assert isinstance(sweep, SweepDetail)
    swept = await ts("wait_sweep", sweep.id, timeout=120)
    assert swept.status == "succeeded"
    assert sweep.id in [s.id for s in await ts("list_sweeps")]
    assert (await ts("get_sweep", sweep.id)).trials[0].model_id == swept.trials[0].model_id
    assert len((await ts("compare_sweep", sweep.id)).models) == 1
    compared = await ts("compare_models", [model_id, swept.trials[0].model_id])
    assert set(compared.differences) >= {"optimizer.lr", "epochs"}
    endless = await ts("create_sweep", {"base": moons_spec(dataset.id, epochs=5000), "search": _LR, "trials": 3})
    assert (await ts("cancel_sweep", endless.id)).status == "cancelled"
    assert [t.state for t in (await ts("wait_sweep", endless.id, timeout=60)).trials] == ["cancelled"]

    scored = await ts("evaluate_model", model_id, dataset.id)
    assert scored.metrics["accuracy"] == pytest.approx(model.metrics["train_accuracy"])
    assert [e.id for e in await ts("list_evaluations", model_id)] == [scored.id]

    await ts("delete_model", model_id)
    with pytest.raises(ApiError) as gone:
        await ts("get_model", model_id)
    assert gone.value.status_code == 404
    await ts("delete_dataset", dataset.id)
    with pytest.raises(ApiError) as deleted:
        await ts("get_dataset", dataset.id)
    assert deleted.value.status_code == 404


def _check_coverage(ts: Driver) -> None:
    assert set(TABLE) <= ts.verbs
    for endpoint in TABLE.values():
        pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(endpoint.route.path))
        assert any(method == endpoint.route.method and re.fullmatch(pattern, path) for method, path in ts.sent), (
            f"{endpoint} was never sent"
        )


def test_every_endpoint_through_the_sync_client(server: Server, moons: tuple[bytes, int]) -> None:
    with TrainserveClient(server.url) as client:
        ts = Driver(client)
        client.http.event_hooks["request"].append(ts.record)
        asyncio.run(_every_endpoint(ts, moons[0]))
    _check_coverage(ts)


def test_every_endpoint_through_the_async_client(server: Server, moons: tuple[bytes, int]) -> None:
    async def run() -> Driver:
        async with AsyncTrainserveClient(server.url) as client:
            ts = Driver(client)

            async def record(request: httpx.Request) -> None:
                ts.record(request)

            client.http.event_hooks["request"].append(record)
            await _every_endpoint(ts, moons[0])
            return ts

    _check_coverage(asyncio.run(run()))


# -- events() across a dropped connection -----------------------------------------------------------


class CuttingProxy:
    """A TCP proxy in front of the real server that cuts the first event stream right after
    it forwarded an epoch event, as a load balancer's idle timeout or a network blip would."""

    def __init__(self, upstream: str) -> None:
        host, port = httpx.URL(upstream).host, httpx.URL(upstream).port
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.streams: list[bytes] = []  # the request head of each event stream opened
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(downstream,), daemon=True).start()

    def _serve(self, downstream: socket.socket) -> None:
        with downstream, socket.create_connection(self.upstream) as upstream:
            head = downstream.recv(65536)
            upstream.sendall(head)
            is_stream = b"/events " in head.split(b"\r\n", 1)[0]
            if is_stream:
                self.streams.append(head)
            cut_this = is_stream and not self.cut.is_set()
            threading.Thread(target=self._pipe, args=(downstream, upstream), daemon=True).start()
            while chunk := upstream.recv(65536):
                downstream.sendall(chunk)
                if cut_this and b"event: epoch" in chunk:
                    self.cut.set()
                    downstream.shutdown(socket.SHUT_RDWR)
                    return

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                target.sendall(chunk)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_events_resume_after_the_connection_breaks_off(server: Server, moons: tuple[bytes, int], kind: str) -> None:
    with TrainserveClient(server.url) as direct:
        dataset = direct.upload_dataset(moons[0], "moons.csv")
        job = direct.train(moons_spec(dataset.id, epochs=300))  # long enough to cut mid-run
    proxy = CuttingProxy(server.url)
    try:
        if kind == "sync":
            with TrainserveClient(proxy.url) as client:
                events = list(client.events(job.id))
        else:

            async def run() -> list[JobEvent]:
                async with AsyncTrainserveClient(proxy.url) as client:
                    return [event async for event in client.events(job.id)]

            events = asyncio.run(run())
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert len(proxy.streams) >= 2
    assert b"last-event-id: " in proxy.streams[1].lower()  # the second asks for what came after
    epochs = [e.data["epoch"] for e in events if e.event == "epoch"]
    assert epochs == list(range(1, 301))  # each epoch once, in order, across the two streams
    assert events[-1].event == "end"
    assert events[-1].data["status"] == JobStatus.SUCCEEDED
