"""The bad-input catalogue: every case is sent to a real server (API + worker) and must get
a 4xx JSON error whose detail names the problem, and leave nothing behind: no dataset, job
or model row, no file in the store (datasets/, weights/, tmp/).

The server runs with small limits so that the size cases stay cheap.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.client import TrainserveClient

UPLOAD_LIMIT = 128 * 1024
PREDICT_ROWS = 50
LIMITS = {
    "TRAINSERVE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    "TRAINSERVE_MAX_BODY_BYTES": str(256 * 1024),
    "TRAINSERVE_MAX_PREDICT_ROWS": str(PREDICT_ROWS),
    "TRAINSERVE_MAX_EPOCHS": "1000",
    "TRAINSERVE_MAX_PARAMETERS": "1000000",
    "TRAINSERVE_MAX_LAYER_WIDTH": "4096",
    "TRAINSERVE_MAX_TRAIN_MEMORY_BYTES": str(64 * 1024 * 1024),
}


@dataclass
class World:
    server: Server
    http: httpx.Client
    dataset_id: str  # the guide's moons: x0, x1, label
    text_dataset_id: str  # a, color (text), label
    model_id: str
    deleted_model_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, moons: tuple[bytes, int]) -> Iterator[World]:
    server = start_server(tmp_path_factory.mktemp("bad-input"), env=LIMITS)
    try:
        with TrainserveClient(server.url, timeout=60) as ts, httpx.Client(base_url=server.url, timeout=60) as http:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            text = ts.upload_dataset(b"a,color,label\n1,red,0\n2,blue,1\n3,red,0\n4,blue,1\n", "colors.csv")
            kept = ts.wait(ts.train(moons_spec(dataset.id, epochs=3)).id)
            gone = ts.wait(ts.train(moons_spec(dataset.id, epochs=1)).id)
            assert kept.status == gone.status == "succeeded", (kept.error, gone.error)
            ts.delete_model(gone.model_id or "")
            yield World(server, http, dataset.id, text.id, kept.model_id or "", gone.model_id or "")
    finally:
        stop_server(server)


def _snapshot(world: World) -> dict[str, Any]:
    def ids(path: str) -> list[str]:
        return sorted(item["id"] for item in world.http.get(path, params={"limit": 1000}).json())

    return {
        "datasets": ids("/datasets"),
        "jobs": ids("/jobs"),
        "models": ids("/models"),
        "files": {folder: world.server.files(folder) for folder in ("datasets", "weights", "tmp")},
    }


@dataclass(frozen=True)
class Case:
    """One bad request: what is sent, the status expected, and words the detail must hold."""

    status: int
    expected: str
    request: Callable[[World], dict[str, Any]]


def upload(payload: bytes, filename: str = "bad.csv", **form: str) -> Callable[[World], dict[str, Any]]:
    return lambda _w: {"method": "POST", "url": "/datasets", "files": {"file": (filename, payload)}, "data": form}


def raw_upload(payload: bytes, **query: str) -> Callable[[World], dict[str, Any]]:
    """The file as the body itself (as the Python client sends it), options in the query."""
    return lambda _w: {
        "method": "POST",
        "url": "/datasets",
        "content": payload,
        "params": {"filename": "bad.csv", **query},
        "headers": {"content-type": "text/csv"},
    }


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def spec(**change: Any) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"method": "POST", "url": "/train", "json": {**moons_spec(w.dataset_id, epochs=3), **change}}


def raw_train(body: bytes) -> Callable[[World], dict[str, Any]]:
    return lambda _w: {
        "method": "POST",
        "url": "/train",
        "content": body,
        "headers": {"content-type": "application/json"},
    }


def predict(inputs: Any, **extra: Any) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"method": "POST", "url": "/predict", "json": {"model_id": w.model_id, "inputs": inputs, **extra}}


def raw_predict(body: str) -> Callable[[World], dict[str, Any]]:
    return lambda w: {
        "method": "POST",
        "url": "/predict",
        "content": body.replace("MODEL", w.model_id).encode(),
        "headers": {"content-type": "application/json"},
    }


LINEAR_2 = [{"type": "Linear", "out_features": 2}]

UPLOADS = {
    "empty file": Case(422, "the file is empty", upload(b"")),
    "blank lines only": Case(422, "the file is empty", upload(b"\n\n\r\n")),
    "header only": Case(422, "has a header but no data rows", upload(b"a,b,label\n")),
    "ragged row, short": Case(422, "row 2 has 2 fields, the header has 3", upload(b"a,b,label\n1,2,0\n3,4\n")),
    "ragged row, long": Case(422, "row 1 has 4 fields, the header has 3", upload(b"a,b,label\n1,2,0,9\n")),
    "inf": Case(422, "row 2, column 'b'", upload(b"a,b,label\n1,2,0\n1,-inf,1\n")),
    "number beyond float64": Case(422, "row 1, column 'b': value inf", upload(b"a,b,label\n1,1e999,0\n")),
    "tab file read with a comma": Case(
        422, "holds tab ('\\t'): set the form field 'delimiter'", upload(b"x1\tx2\tl\n1\t2\t0\n", delimiter=",")
    ),
    "semicolon file, one row short": Case(
        422, "row 2 has 2 fields, the header has 3 (split on the semicolon", upload(b"a;b;l\n1;2;0\n3;4\n5;6;1\n")
    ),
    "delimiter of two characters": Case(422, "form field 'delimiter'", upload(b"a,b\n1,2\n", delimiter="::")),
    "decimal that is no separator": Case(422, "form field 'decimal'", upload(b"a;b\n1;2\n", decimal="x")),
    "decimal comma with a comma delimiter": Case(422, "'decimal'", upload(b"a,b\n1,2\n", delimiter=",", decimal=",")),
    "na_values not a list of strings": Case(422, "form field 'na_values'", upload(b"a\n1\n", na_values="[1, 2]")),
    "na_values not JSON": Case(422, "not a JSON list of strings", upload(b"a\n1\n", na_values="NA,?")),
    "CSV option on a Parquet file": Case(
        422, "applies to CSV files only", upload(b"PAR1 not really", "t.parquet", delimiter=";")
    ),
    "Parquet that is not": Case(422, "not a readable Parquet file", upload(b"PAR1 not really", "t.parquet")),
    "duplicate header names": Case(422, "'a' appears twice", upload(b"a,a,label\n1,2,0\n")),
    "duplicate after trimming": Case(422, "'a' appears twice", upload(b"a, a ,label\n1,2,0\n")),
    "empty header name": Case(422, "column 2 has an empty name", upload(b"a,,label\n1,2,0\n")),
    "blank header name": Case(422, "column 2 has an empty name", upload(b"a,  ,label\n1,2,0\n")),
    "too many columns": Case(422, "the limit is 10000", upload(",".join(f"c{i}" for i in range(10_001)).encode())),
    "non-UTF-8 cell": Case(422, "line 2 is not UTF-8 text", upload(b"a,b,label\n1,2,\xff\xfe\n")),
    "Latin-1 header": Case(422, "line 1 is not UTF-8 text", upload(b"caf\xe9,b\n1,2\n")),
    "UTF-16 file": Case(
        422, "line 1 holds a NUL byte: the file is binary, not UTF-8", upload("a,b\n1,2\n".encode("utf-16"))
    ),
    "binary garbage": Case(422, "line 2 is not UTF-8 text", upload(bytes(range(1, 256)) * 8)),
    "NUL bytes": Case(422, "line 2 holds a NUL byte", upload(b"a,b\n1,\x00\n")),
    "zip that is no .npz": Case(422, "not a readable .npz", upload(b"PK\x03\x04garbage")),
    ".npz name, CSV inside": Case(422, "named .npz but is not a zip", upload(b"a,b\n1,2\n", "t.npz")),
    ".npz without y": Case(422, "no array named 'y'", upload(npz(X=np.zeros((3, 2))), "t.npz")),
    ".npz with pickled objects": Case(
        422, "cannot be read", upload(npz(X=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3)), "t.npz")
    ),
    ".npz with inf": Case(422, "column 'x1'", upload(npz(X=np.array([[0.0, np.inf]]), y=np.zeros(1)), "t.npz")),
    ".npz X of 3 dimensions": Case(422, "X must be 2-D", upload(npz(X=np.zeros((2, 2, 2)), y=np.zeros(2)), "t.npz")),
    ".npz rows disagree": Case(
        422, "X has 3 rows but y has 2", upload(npz(X=np.zeros((3, 1)), y=np.zeros(2)), "t.npz")
    ),
    "file over the size limit": Case(413, f"limit of {UPLOAD_LIMIT} bytes", upload(b"a,b\n" + b"1,2\n" * UPLOAD_LIMIT)),
    "not multipart": Case(415, "multipart/form-data", lambda _w: {"method": "POST", "url": "/datasets", "data": {}}),
    "a JSON body": Case(
        415, "or the table itself as text/csv", lambda _w: {"method": "POST", "url": "/datasets", "json": {}}
    ),
    "raw body over the size limit": Case(
        413, f"limit of {UPLOAD_LIMIT} bytes", raw_upload(b"a,b\n" + b"1,2\n" * UPLOAD_LIMIT)
    ),
    "raw body with an unknown query parameter": Case(
        422, "unexpected query parameter 'delimeter'", raw_upload(b"a;b\n1;2\n", delimeter=";")
    ),
    "raw body with a bad delimiter": Case(
        422, "query parameter 'delimiter': 'ab' is not a delimiter", raw_upload(b"a,b\n1,2\n", delimiter="ab")
    ),
    "raw body with a ragged row": Case(422, "row 2 has 3 fields, the header has 2", raw_upload(b"a,b\n1,2\n1,2,3\n")),
    "no file field": Case(
        422,
        "needs a 'file' field",
        lambda _w: {
            "method": "POST",
            "url": "/datasets",
            "content": b"--x--\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
    ),
    "file field sent as text": Case(
        422,
        "form field 'file' must be a file",
        lambda _w: {"method": "POST", "url": "/datasets", "files": {"file": (None, "x")}},
    ),
    "unknown form field": Case(
        422,
        "unexpected form field 'data'",
        lambda _w: {"method": "POST", "url": "/datasets", "files": {"data": ("x.csv", b"a,b\n1,2\n")}},
    ),
    "two files": Case(
        422,
        "'file' appears twice",
        lambda _w: {"method": "POST", "url": "/datasets", "files": [("file", ("a.csv", b"a\n1\n"))] * 2},
    ),
    "truncated multipart body": Case(
        422,
        "ends inside the file",
        lambda _w: {
            "method": "POST",
            "url": "/datasets",
            "content": b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\na,b\n1,2\n',
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
    ),
}

SPECS = {
    "unknown layer": Case(422, "model.0", spec(model=[{"type": "Conv2d"}])),
    "code as a layer name": Case(422, "model.0", spec(model=[{"type": "__import__('os').system('id')"}])),
    "code as a loss": Case(422, "loss", spec(loss="eval('1+1')")),
    "dotted path as an optimizer": Case(422, "optimizer", spec(optimizer={"type": "torch.optim.SGD"})),
    "code as a target": Case(
        422, "target column \"__import__('os')\" is not in the dataset", spec(target="__import__('os')")
    ),
    "code as a feature": Case(422, "features column 'x0; import os' is not", spec(features=["x0; import os"])),
    "shell in the device": Case(422, "device", spec(device="cuda:0; rm -rf /")),
    "code as an argument": Case(
        422, "negative_slope", spec(model=[{"type": "LeakyReLU", "negative_slope": "__import__('os')"}, *LINEAR_2])
    ),
    "input width given though inferred": Case(
        422,
        "in_features is inferred from the data",
        spec(model=[{"type": "Linear", "in_features": 2, "out_features": 2}]),
    ),
    "dunder keyword": Case(422, "__class__", spec(model=[{"type": "Linear", "out_features": 2, "__class__": "x"}])),
    "unknown keyword": Case(422, "optimizer.SGD.foo", spec(optimizer={"type": "SGD", "lr": 0.1, "foo": 1})),
    "string for a number": Case(422, "epochs: Input should be a valid integer", spec(epochs="10")),
    "boolean for a number": Case(422, "epochs: Input should be a valid integer", spec(epochs=True)),
    "string for a boolean": Case(422, "shuffle: Input should be a valid boolean", spec(shuffle="yes")),
    "string for a learning rate": Case(422, "optimizer.SGD.lr", spec(optimizer={"type": "SGD", "lr": "fast"})),
    "fractional batch size": Case(422, "batch_size", spec(batch_size=1.5)),
    "negative width": Case(422, "out_features", spec(model=[{"type": "Linear", "out_features": -3}])),
    "zero width": Case(422, "out_features", spec(model=[{"type": "Linear", "out_features": 0}])),
    "zero epochs": Case(422, "epochs", spec(epochs=0)),
    "zero batch size": Case(422, "batch_size", spec(batch_size=0)),
    "negative learning rate": Case(422, "optimizer.SGD.lr", spec(optimizer={"type": "SGD", "lr": -1})),
    "empty model": Case(422, "model", spec(model=[])),
    "absurd epochs": Case(422, "epochs is 1000000000, the limit is 1000", spec(epochs=10**9)),
    "absurd width": Case(
        422,
        "out_features is 1000000, the limit is 4096",
        spec(model=[{"type": "Linear", "out_features": 10**6}, *LINEAR_2]),
    ),
    "too many parameters": Case(
        422,
        "parameters, the limit is 1,000,000",
        spec(model=[{"type": "Linear", "out_features": 4096}, {"type": "Linear", "out_features": 4096}, *LINEAR_2]),
    ),
    "too much estimated memory": Case(
        422,
        "training would need about",
        spec(model=[{"type": "Linear", "out_features": 4096}, *["Tanh"] * 30, *LINEAR_2], batch_size=200),
    ),
    "no dataset": Case(422, "dataset_id is required", spec(dataset_id=None)),
    "unknown dataset": Case(404, "does not exist", spec(dataset_id="f" * 32)),
    "path as a dataset id": Case(404, "does not exist", spec(dataset_id="../../etc/passwd")),
    "missing target column": Case(422, "target column 'nope' is not in the dataset", spec(target="nope")),
    "missing feature column": Case(422, "features column 'ghost' is not", spec(features=["x0", "ghost"])),
    # A text feature is a category now (training.features); asking 'number' of it names the rows.
    "number asked of a text column": Case(
        422,
        "columns.color: type 'number' but rows 1, 2, 3, 4 hold text",
        lambda w: {
            "method": "POST",
            "url": "/train",
            "json": {**moons_spec(w.text_dataset_id), "model": LINEAR_2, "columns": {"color": {"type": "number"}}},
        },
    ),
    "target listed twice": Case(422, "target 'label' is listed twice", spec(target=["label", "label"])),
    "target also a feature": Case(422, "'label' is both a feature and the target", spec(features=["x0", "label"])),
    "unknown column in columns": Case(
        422, "columns: 'ghost' is not in the dataset", spec(columns={"ghost": {"type": "ignore"}})
    ),
    "fill_value of the wrong type": Case(
        422,
        "fill_value must be a number",
        spec(columns={"x0": {"missing": "constant", "fill_value": "zero"}}),
    ),
    "split leaving one training row": Case(422, "leaves 1 training row(s) of 200", spec(validation_split=0.999)),
    "a batch larger than the training rows": Case(
        422,
        "validation_split leaves 100 training row(s) of 200, fewer than one batch (batch_size 150): "
        "set batch_size to at most 100",
        spec(validation_split=0.5, batch_size=150),
    ),
    "split and validation_split": Case(
        422, "either validation_split or split", spec(validation_split=0.2, split={"validation": 0.2})
    ),
    "class weights of the wrong length": Case(
        422, "loss.weight has 3 values", spec(loss={"type": "CrossEntropyLoss", "weight": [1, 2, 3]})
    ),
    "output width vs labels": Case(
        422, "output width is 3, the data needs 2 classes", spec(model=[{"type": "Linear", "out_features": 3}])
    ),
    "regression on text labels": Case(
        422,
        "needs a numeric target",
        lambda w: {
            "method": "POST",
            "url": "/train",
            "json": {**moons_spec(w.text_dataset_id), "target": "color", "features": ["a"], "loss": "MSELoss"},
        },
    ),
    "not JSON": Case(422, "body", raw_train(b"{not json")),
    "a JSON list": Case(422, "body", raw_train(b"[1, 2]")),
    "empty body": Case(422, "body", raw_train(b"")),
    "unsupported content type": Case(
        415,
        "unsupported content type 'text/plain'",
        lambda _w: {"method": "POST", "url": "/train", "content": b"x", "headers": {"content-type": "text/plain"}},
    ),
    "multipart spec that is not JSON": Case(
        422,
        "spec",
        lambda _w: {
            "method": "POST",
            "url": "/train",
            "files": {"file": ("m.csv", b"a,b\n1,0\n2,1\n")},
            "data": {"spec": "{"},
        },
    ),
    "multipart spec that does not fit the file": Case(
        422,
        "output width is 5",
        lambda _w: {
            "method": "POST",
            "url": "/train",
            "files": {"file": ("m.csv", b"a,label\n1,0\n2,1\n")},
            "data": {"spec": json.dumps({**moons_spec(), "model": [{"type": "Linear", "out_features": 5}]})},
        },
    ),
    "multipart with a bad file": Case(
        422,
        "row 1, column 'a'",
        lambda _w: {
            "method": "POST",
            "url": "/train",
            "files": {"file": ("m.csv", b"a,label\ninf,0\n")},
            "data": {"spec": json.dumps(moons_spec())},
        },
    ),
    "multipart with a bad delimiter field": Case(
        422,
        "form field 'delimiter'",
        lambda _w: {
            "method": "POST",
            "url": "/train",
            "files": {"file": ("m.csv", b"a;label\n1;0\n2;1\n")},
            "data": {"spec": json.dumps(moons_spec()), "delimiter": "ab"},
        },
    ),
    "multipart with file and dataset_id": Case(
        422,
        "either a file or a dataset_id",
        lambda w: {
            "method": "POST",
            "url": "/train",
            "files": {"file": ("m.csv", b"a,label\n1,0\n2,1\n")},
            "data": {"spec": json.dumps(moons_spec(w.dataset_id))},
        },
    ),
}

PREDICTIONS = {
    "wrong width": Case(422, "inputs[0] has 3 values, the model takes 2", predict([[1.0, 2.0, 3.0]])),
    "ragged rows": Case(422, "inputs[1] has 1 values", predict([[1.0, 2.0], [1.0]])),
    "unknown feature name": Case(422, "unknown feature 'x9'", predict([{"x0": 1.0, "x9": 2.0}])),
    "missing feature name": Case(422, "feature 'x1' is missing", predict([{"x0": 1.0}])),
    "a string": Case(422, "inputs[0][1]: 'a' is not a number", predict([[1.0, "a"]])),
    "a numeric string": Case(422, "inputs[0][1]: '2' is not a number", predict([[1.0, "2"]])),
    "a boolean": Case(422, "inputs[0][1]: True is not a number", predict([[1.0, True]])),
    "a null": Case(422, "inputs[0][1]: None is not a number", predict([[1.0, None]])),
    "NaN": Case(422, "inputs[0][1]", raw_predict('{"model_id": "MODEL", "inputs": [[1.0, NaN]]}')),
    "Infinity": Case(422, "inputs[0][0]", raw_predict('{"model_id": "MODEL", "inputs": [[-Infinity, 1.0]]}')),
    "number beyond float64": Case(422, "inputs[0][0]", raw_predict('{"model_id": "MODEL", "inputs": [[1e999, 1]]}')),
    "number beyond float32": Case(422, "inputs[0][1]: 1e+300 is out of float32 range", predict([[1.0, 1e300]])),
    "1e308": Case(422, "out of float32 range", predict([[1e308, 1.0]])),
    "rows mixing lists and objects": Case(422, "inputs[1]", predict([[1.0, 2.0], {"x0": 1.0, "x1": 2.0}])),
    "a row that is a string": Case(422, "inputs[0]", predict(["1,2"])),
    "rows nested too deep": Case(422, "inputs[0]", predict([[[1.0, 2.0]]])),
    "empty": Case(422, "inputs is empty", predict([])),
    "inputs not a list": Case(422, "inputs", predict({"x0": 1.0})),
    "no model_id": Case(
        422, "model_id", lambda _w: {"method": "POST", "url": "/predict", "json": {"inputs": [[1, 2]]}}
    ),
    "unknown field": Case(422, "unknown field 'temperature'", predict([[1.0, 2.0]], temperature=2)),
    "too many rows": Case(
        413,
        f"{PREDICT_ROWS + 1} rows in one request, the limit is {PREDICT_ROWS}",
        predict([[0.0, 1.0]] * (PREDICT_ROWS + 1)),
    ),
    "unknown model": Case(
        404,
        "does not exist",
        lambda _w: {"method": "POST", "url": "/predict", "json": {"model_id": "0" * 32, "inputs": [[1, 2]]}},
    ),
    "deleted model": Case(
        404,
        "does not exist",
        lambda w: {"method": "POST", "url": "/predict", "json": {"model_id": w.deleted_model_id, "inputs": [[1, 2]]}},
    ),
    "not JSON": Case(422, "body", raw_predict("{nope")),
}

CATALOGUE = {
    **{f"upload: {name}": case for name, case in UPLOADS.items()},
    **{f"spec: {name}": case for name, case in SPECS.items()},
    **{f"predict: {name}": case for name, case in PREDICTIONS.items()},
}


# Each category's request with its bad part fixed: the twin every case departs from.
GOOD = {
    "upload": Case(201, "", upload(b"a,b,label\n1,2,0\n3,4,1\n")),
    "spec": Case(202, "", spec()),
    "predict": Case(200, "", predict([[1.0, 2.0], [0.5, -0.5]])),
}


def test_the_catalogue_s_requests_are_accepted_once_the_bad_part_is_fixed(world: World) -> None:
    """The catalogue proves something only if the server tells bad from good: a server that
    refused every request with a long enough message would pass it. So each category's
    good twin must be accepted, and no case's expected words may appear in its answer."""
    created: dict[str, str] = {}
    for category, good in GOOD.items():
        response = world.http.request(**good.request(world))
        assert response.status_code == good.status, (category, response.text)
        if category in ("upload", "spec"):
            created[category] = response.json()["id"]
        for name, case in CATALOGUE.items():
            # A phrase, not a bare field name (which a good answer holds too: it echoes the spec).
            if name.startswith(f"{category}: ") and " " in case.expected:
                assert case.expected not in response.text, (name, response.text)
    # What the good twins made must not outlive this test: the catalogue's cases compare the
    # server before and after each request, and a job still training here would end during one.
    with TrainserveClient(world.server.url, timeout=60) as ts:
        job = ts.wait(created["spec"])
        if job.model_id is not None:
            ts.delete_model(job.model_id)
        ts.delete_dataset(created["upload"])


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_a_4xx_json_error_naming_the_problem_and_leaves_nothing(world: World, name: str) -> None:
    case = CATALOGUE[name]
    before = _snapshot(world)
    response = world.http.request(**case.request(world))
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"type", "detail", "errors"}
    assert case.expected in body["detail"] or case.expected in json.dumps(body["errors"]), body
    assert _snapshot(world) == before
