"""POST /predict beyond JSON rows: by name and version, .npy in and out, CSV in and out,
micro-batching, the model cache across processes; all against real server processes."""

from __future__ import annotations

import asyncio
import csv
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.client import ApiError, TrainserveClient
from trainserve.training import native
from trainserve.training import spec as S
from trainserve.training.network import TabularNet

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def named(server: Server, moons: tuple[bytes, int]) -> tuple[str, list[str]]:
    """Two versions of one named moons classifier: (name, [id of v1, id of v2])."""
    name = f"moons-{uuid.uuid4().hex[:8]}"
    with TrainserveClient(server.url, timeout=120) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        ids = []
        for epochs in (2, 40):  # v1 barely trained, v2 good: their answers differ
            job = ts.wait(ts.train(moons_spec(dataset.id, epochs=epochs, name=name)).id)
            assert job.status == "succeeded", job.error
            ids.append(job.model_id or "")
    return name, ids


@pytest.fixture(scope="module")
def model_id(named: tuple[str, list[str]]) -> str:
    return named[1][1]


def _npy(array: np.ndarray, *, pickled: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=pickled)  # pickled: a hostile body the server must refuse unread
    return buffer.getvalue()


ROWS = np.random.default_rng(0).uniform(-1.5, 2.5, size=(300, 2)).astype(np.float32)


# -- by name and version ---------------------------------------------------------------------


def test_name_answers_with_the_newest_version(client: TrainserveClient, named: tuple[str, list[str]]) -> None:
    name, (_v1, v2) = named
    by_name = client.predict(None, ROWS[:5].tolist(), name=name)
    assert (by_name.model_id, by_name.name, by_name.version) == (v2, name, 2)
    assert by_name.probabilities == client.predict(v2, ROWS[:5].tolist()).probabilities


def test_name_and_version_pick_that_version(client: TrainserveClient, named: tuple[str, list[str]]) -> None:
    name, (v1, _v2) = named
    first = client.predict(None, ROWS[:5].tolist(), name=name, version=1)
    assert (first.model_id, first.version) == (v1, 1)
    assert first.probabilities == client.predict(v1, ROWS[:5].tolist()).probabilities


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        pytest.param({"name": "no-such-model", "inputs": [[0, 0]]}, 404, "no model is named", id="unknown-name"),
        pytest.param({"name": "NAME", "version": 99, "inputs": [[0, 0]]}, 404, "has no version 99", id="no-version"),
        pytest.param({"model_id": "ID", "version": 1, "inputs": [[0, 0]]}, 422, "version goes with name", id="id+ver"),
        pytest.param({"model_id": "ID", "name": "NAME", "inputs": [[0, 0]]}, 422, "either model_id", id="both"),
        pytest.param({"inputs": [[0, 0]]}, 422, "either model_id", id="neither"),
        pytest.param({"name": "NAME", "version": 0, "inputs": [[0, 0]]}, 422, "positive integer", id="version-0"),
        pytest.param({"name": "NAME", "version": "1", "inputs": [[0, 0]]}, 422, "positive integer", id="version-str"),
        pytest.param({"model_id": "ID", "inputs": [[0, 0]], "extra": 1}, 422, "unknown field 'extra'", id="extra"),
        pytest.param({"model_id": "ID"}, 422, "inputs is required", id="no-inputs"),
        pytest.param({"model_id": 5, "inputs": [[0, 0]]}, 422, "model_id must be a string", id="id-not-str"),
        pytest.param([1, 2], 422, "must be a JSON object", id="not-object"),
    ],
)
def test_bad_model_selection_is_a_clear_error(
    client: TrainserveClient, named: tuple[str, list[str]], body: object, status: int, expected: str
) -> None:
    name, (_v1, v2) = named
    if isinstance(body, dict):
        body = {k: (name if v == "NAME" else v2 if v == "ID" else v) for k, v in body.items()}
    response = client.http.post("/predict", json=body)
    assert response.status_code == status, response.text
    assert expected in response.json()["detail"]


def test_body_that_is_not_json_is_422(client: TrainserveClient) -> None:
    response = client.http.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["detail"]


def test_unsupported_content_type_is_422(client: TrainserveClient, model_id: str) -> None:
    response = client.http.post(f"/predict?model_id={model_id}", content=b"x", headers={"content-type": "text/xml"})
    assert response.status_code == 422
    assert "unsupported content type 'text/xml'" in response.json()["detail"]


# -- .npy ------------------------------------------------------------------------------------


def test_npy_body_answers_like_json(client: TrainserveClient, model_id: str) -> None:
    as_json = client.predict(model_id, ROWS.tolist())
    response = client.http.post(
        "/predict", params={"model_id": model_id}, content=_npy(ROWS), headers={"content-type": NPY}
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == as_json.predictions
    assert response.json()["probabilities"] == as_json.probabilities


def test_npy_in_and_out_through_the_client(client: TrainserveClient, model_id: str, named: tuple[str, list]) -> None:
    as_json = client.predict(model_id, ROWS.tolist())
    labels = client.predict_array(ROWS, model_id=model_id)
    assert labels.dtype == np.int64
    assert labels.tolist() == as_json.predictions
    probabilities = client.predict_array(ROWS.astype(np.float64), name=named[0], output="probabilities")
    assert probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities, np.asarray(as_json.probabilities, dtype=np.float32))


def test_npy_single_row_and_fortran_order(client: TrainserveClient, model_id: str) -> None:
    expected = client.predict(model_id, ROWS[:3].tolist()).predictions
    assert client.predict_array(ROWS[0], model_id=model_id).tolist() == expected[:1]
    assert client.predict_array(np.asfortranarray(ROWS[:3]), model_id=model_id).tolist() == expected


def _bad_npy_bodies() -> Iterator[object]:
    good = _npy(ROWS[:4])
    yield pytest.param(
        _npy(np.array([[1.0, "a"]], dtype=object), pickled=True), "'|O' is not supported", id="object-dtype-pickle"
    )
    yield pytest.param(_npy(ROWS[:4, :1]), "does not fit the model", id="wrong-width")
    yield pytest.param(_npy(np.zeros((2, 2, 2), np.float32)), "does not fit the model", id="3-d")
    yield pytest.param(_npy(np.zeros((0, 2), np.float32)), "empty", id="empty")
    yield pytest.param(good[:-4], "bytes, its header", id="truncated")
    yield pytest.param(good + b"\0" * 8, "bytes, its header", id="trailing-bytes")
    yield pytest.param(b"PK\x03\x04" + good[4:], "not a valid .npy", id="bad-magic")
    yield pytest.param(good[:12], "not a valid .npy", id="cut-header")
    yield pytest.param(_npy(np.array([[1.0, np.nan]], np.float32)), "row 1, column 1", id="nan")
    yield pytest.param(_npy(np.array([[1e300, 0.0]])), "row 1, column 0", id="beyond-float32")
    yield pytest.param(_npy(np.array([[True, False]])), "dtype '|b1' is not supported", id="bool")
    yield pytest.param(_npy(np.array([["1", "2"]])), "is not supported", id="unicode")
    structured = np.zeros(2, dtype=[("a", "<f4"), ("b", "<f4")])
    yield pytest.param(_npy(structured), "is not supported", id="structured")


@pytest.mark.parametrize(("body", "expected"), list(_bad_npy_bodies()))
def test_bad_npy_is_422_naming_the_problem(client: TrainserveClient, model_id: str, body: bytes, expected: str) -> None:
    response = client.http.post("/predict", params={"model_id": model_id}, content=body, headers={"content-type": NPY})
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]


def test_npy_needs_the_model_in_the_query(client: TrainserveClient) -> None:
    response = client.http.post("/predict", content=_npy(ROWS[:2]), headers={"content-type": NPY})
    assert response.status_code == 422
    assert "either model_id" in response.json()["detail"]
    bad = client.http.post("/predict?model_id=x&bogus=1", content=_npy(ROWS[:2]), headers={"content-type": NPY})
    assert bad.status_code == 422
    assert "unknown query parameter 'bogus'" in bad.json()["detail"]


def test_probabilities_of_a_regression_is_422(client: TrainserveClient, server: Server) -> None:
    x = np.linspace(0, 1, 50)
    table = "x,y\n" + "".join(f"{a},{2 * a}\n" for a in x)
    dataset = client.upload_dataset(table.encode(), "line.csv")
    job = client.wait(
        client.train(
            {"dataset_id": dataset.id, "model": [{"type": "Linear", "out_features": 1}], "loss": "MSELoss", "epochs": 2}
        ).id
    )
    values = client.predict_array(np.array([[0.5]]), model_id=job.model_id)
    assert values.dtype == np.float32
    assert values.shape == (1,)
    with pytest.raises(ApiError) as error:
        client.predict_array(np.array([[0.5]]), model_id=job.model_id, output="probabilities")
    assert error.value.status_code == 422


# -- CSV -------------------------------------------------------------------------------------


def _table(rows: np.ndarray) -> bytes:
    # Extra columns (an id and a text note) and the features in another order than trained.
    lines = ["id,x1,note,x0"] + [f"r{i},{b!r},note {i},{a!r}" for i, (a, b) in enumerate(rows.tolist())]
    return ("\n".join(lines) + "\n").encode()


def test_csv_upload_answers_the_same_csv_with_predictions(client: TrainserveClient, model_id: str) -> None:
    expected = client.predict(model_id, ROWS[:20].tolist())
    answer = client.predict_csv(_table(ROWS[:20]), model_id=model_id, filename="rows.csv")
    records = list(csv.reader(io.StringIO(answer.decode())))
    assert records[0] == ["id", "x1", "note", "x0", "predicted_label", "probability_0", "probability_1"]
    sent = list(csv.reader(io.StringIO(_table(ROWS[:20]).decode())))
    assert [row[:4] for row in records[1:]] == sent[1:]
    assert [int(row[4]) for row in records[1:]] == expected.predictions
    assert expected.probabilities is not None
    for row, probabilities in zip(records[1:], expected.probabilities, strict=True):
        assert [np.float32(v) for v in row[5:]] == [np.float32(p) for p in probabilities]


def test_a_semicolon_csv_with_decimal_commas_predicts_as_the_comma_one(client: TrainserveClient, model_id: str) -> None:
    # What a European spreadsheet exports: read as an upload would read it, not as one column.
    table = _table(ROWS[:20]).decode()
    european = table.replace(",", ";").replace(".", ",").encode()
    plain = list(csv.reader(io.StringIO(client.predict_csv(table.encode(), model_id=model_id).decode())))
    sniffed = list(csv.reader(io.StringIO(client.predict_csv(european, model_id=model_id).decode())))
    assert len(sniffed) == 21
    assert [row[4:] for row in sniffed] == [row[4:] for row in plain]


def test_csv_body_with_name_in_the_query(client: TrainserveClient, named: tuple[str, list[str]]) -> None:
    name, (v1, _v2) = named
    response = client.http.post(
        "/predict", params={"name": name, "version": 1}, content=_table(ROWS[:5]), headers={"content-type": "text/csv"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["x-model-id"] == v1
    predicted = [int(row[4]) for row in list(csv.reader(io.StringIO(response.text)))[1:]]
    assert predicted == client.predict(v1, ROWS[:5].tolist()).predictions


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param(b"x0,other\n1,2\n", "no column 'x1'", id="missing-feature"),
        pytest.param(b"x0,x1\n1,2\n3,abc\n", "row 2, column 'x1': 'abc' is not a number", id="not-a-number"),
        pytest.param(b"x0,x1\n1,2\n3\n", "row 2 has 1 fields", id="ragged"),
        pytest.param(b"x0,x1\n1,nan\n", "row 1, column 'x1'", id="nan"),
        pytest.param(b"x0,x1\n", "no data rows", id="header-only"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"x0,x1\n\xff\xfe,1\n", "not UTF-8", id="not-utf8"),
    ],
)
def test_bad_csv_is_422_naming_row_and_column(
    client: TrainserveClient, model_id: str, table: bytes, expected: str
) -> None:
    with pytest.raises(ApiError) as error:
        client.predict_csv(table, model_id=model_id, filename="bad.csv")
    assert error.value.status_code == 422
    assert expected in error.value.body["detail"]


def test_csv_form_needs_a_file(client: TrainserveClient, model_id: str) -> None:
    response = client.http.post("/predict", data={"model_id": model_id}, files={"other": ("a.csv", b"x0,x1\n1,2\n")})
    assert response.status_code == 422
    assert "'file' field" in response.json()["detail"]


# -- large JSON, micro-batching, cache -------------------------------------------------------


def test_large_json_matches_npy(client: TrainserveClient, model_id: str) -> None:
    rows = np.random.default_rng(1).normal(size=(5000, 2)).astype(np.float32)  # a body parsed off the event loop
    assert client.predict(model_id, rows.tolist()).predictions == client.predict_array(rows, model_id=model_id).tolist()


async def _concurrently(url: str, model_id: str, rows: np.ndarray) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(rows))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        return await asyncio.gather(
            *(http.post("/predict", json={"model_id": model_id, "inputs": [row]}) for row in rows.tolist())
        )


def test_concurrent_single_rows_are_batched_and_answered_right(client: TrainserveClient, model_id: str) -> None:
    rows = ROWS[:48]
    alone = client.predict(model_id, rows.tolist())  # one request: one forward pass over all rows
    batch_sizes: list[int] = []
    for _ in range(5):  # concurrency on a shared machine is not guaranteed; a few rounds make it so
        responses = asyncio.run(_concurrently(client.http.base_url.__str__().rstrip("/"), model_id, rows))
        for i, response in enumerate(responses):
            assert response.status_code == 200, response.text
            body = response.json()
            # To the last bit: a batched pass computes each row on its own (trainserve.training.native).
            assert body["predictions"] == [alone.predictions[i]]
            assert alone.probabilities is not None
            assert body["probabilities"] == [alone.probabilities[i]]
            batch_sizes.append(int(response.headers["x-batch-rows"]))
        if max(batch_sizes) > 1:
            break
    assert max(batch_sizes) > 1, "no two concurrent requests ever shared a forward pass"


@pytest.fixture(scope="module")
def second_api(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Another API process on the same database and store, batching off, re-checking its
    cache every 0.2 s: a scaled-out replica."""
    env = {
        # The first server's database and queue: SQLite files in its folder, or its Postgres.
        "TRAINSERVE_DATABASE_URL": f"sqlite:///{server.data_dir / 'trainserve.db'}",
        "TRAINSERVE_QUEUE_URL": f"sqlite:///{server.data_dir / 'trainserve-queue.db'}",
        **server.env,
        "TRAINSERVE_STORE_DIR": str(server.store_dir),
        "TRAINSERVE_PREDICT_BATCHING": "false",
        "TRAINSERVE_MODEL_CACHE_REVALIDATE_S": "0.2",
    }
    replica = start_server(tmp_path_factory.mktemp("replica"), workers=0, env=env)
    yield replica
    stop_server(replica)


def test_unbatched_replica_answers_the_same(client: TrainserveClient, second_api: Server, model_id: str) -> None:
    batched = asyncio.run(_concurrently(str(client.http.base_url).rstrip("/"), model_id, ROWS[:16]))
    unbatched = asyncio.run(_concurrently(second_api.url, model_id, ROWS[:16]))
    for a, b in zip(batched, unbatched, strict=True):
        assert a.json()["predictions"] == b.json()["predictions"]
        assert a.json()["probabilities"] == b.json()["probabilities"]  # batching changes no answer
        assert "x-batch-rows" not in b.headers


def test_model_deleted_elsewhere_stops_answering(
    client: TrainserveClient, second_api: Server, moons: tuple[bytes, int]
) -> None:
    dataset = client.upload_dataset(moons[0], "moons.csv")
    model_id = client.wait(client.train(moons_spec(dataset.id, epochs=1)).id).model_id or ""
    with TrainserveClient(second_api.url) as replica:
        replica.predict(model_id, [[0.0, 0.0]])  # cached in the replica now
        client.delete_model(model_id)  # through the first API process
        deadline = time.monotonic() + 60  # generous: the replica re-checks every 0.2 s
        body = {"model_id": model_id, "inputs": [[0.0, 0.0]]}
        while (status := replica.http.post("/predict", json=body).status_code) == 200:
            assert time.monotonic() < deadline, "the replica kept answering for a deleted model"
            time.sleep(0.1)
        assert status == 404


def test_predict_needs_the_api_key(tmp_path: Path) -> None:
    key = "p" * 24
    guarded = start_server(tmp_path / "guarded", workers=0, env={"TRAINSERVE_API_KEY": key})
    try:
        body = {"model_id": "0" * 32, "inputs": [[0.0, 0.0]]}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.post(guarded.url + "/predict", json=body, headers=headers)
            assert response.status_code == 401
            assert response.json()["type"] == "unauthorized"
        authorised = httpx.post(guarded.url + "/predict", json=body, headers={"Authorization": f"Bearer {key}"})
        assert authorised.status_code == 404  # past the key check: no such model
    finally:
        stop_server(guarded)


def test_the_worker_compiles_the_rowwise_pass_and_the_api_serves_through_it(
    tmp_path: Path, moons: tuple[bytes, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "native-cache"  # empty: nothing compiled by other tests
    layers = [{"type": "Linear", "out_features": 7}, {"type": "Softplus"}, {"type": "Linear", "out_features": 2}]
    server = start_server(tmp_path / "node", env={"TRAINSERVE_NATIVE_CACHE_DIR": str(cache)})
    monkeypatch.setenv("TRAINSERVE_NATIVE_CACHE_DIR", str(cache))  # this process reads the same cache
    try:
        with TrainserveClient(server.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            job = ts.wait(ts.train(moons_spec(dataset.id, model=layers, epochs=2)).id)
            assert job.status == "succeeded", job.error
            model_id = job.model_id or ""
            spec = S.TrainSpec.model_validate(moons_spec(dataset.id, model=layers))
            # Its name: what this process would compile for the same model (a hash of the source).
            library = native.cached_library(native.generate_forward(spec.model, 2, "classification"))
            digest = library.with_name(library.name + ".sha256")
            deadline = time.monotonic() + 60  # compiled beside the save, in the background
            while not digest.exists():
                assert time.monotonic() < deadline, "the worker did not compile the row-wise pass"
                time.sleep(0.1)
            compiled_at = library.stat().st_mtime_ns
            rows = np.array([[0.5, -0.2], [-1.0, 0.5], [2.0, 0.3], [0.0, 1.0]], dtype=np.float32)
            served = ts.predict_array(rows, model_id=model_id, output="probabilities")
            # The API process (the serve process itself; workers are its children) has the
            # worker's library mapped, loaded from the cache and not compiled again...
            assert str(library) in Path(f"/proc/{server.process.pid}/maps").read_text()
            assert library.stat().st_mtime_ns == compiled_at
            # ...and answers with that pass's bits, on the weights the worker stored.
            module = TabularNet(spec.model, 2)
            module.load_state_dict(load_file(server.store_dir / "weights" / f"{model_id}.safetensors"))
            expected = native.RowwiseForward(module.eval(), spec.model, 2, "classification")(rows)
            assert served.dtype == np.float32
            assert np.array_equal(served, expected)
            assert ts.predict(model_id, rows.tolist()).predictions == expected.argmax(axis=1).tolist()
    finally:
        stop_server(server)
