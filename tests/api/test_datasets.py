"""POST/GET/DELETE /datasets against a real server process."""

from __future__ import annotations

import hashlib
import io

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from trainserve.client import ApiError, TrainserveClient


def test_csv_upload_reports_rows_columns_dtypes_and_sha256(client: TrainserveClient, moons: tuple[bytes, int]) -> None:
    data, n_rows = moons
    response = client.http.post("/datasets", files={"file": ("moons.csv", data)})
    assert response.status_code == 201
    body = response.json()
    assert response.headers["location"] == f"/datasets/{body['id']}"
    assert body["n_rows"] == n_rows
    assert body["format"] == "csv"
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert [(c["name"], c["dtype"]) for c in body["columns"]] == [
        ("x0", "float64"),
        ("x1", "float64"),
        ("label", "int64"),
    ]
    assert body["columns"][2]["classes"] == [0, 1]


def test_string_labels_are_a_text_column_with_classes(client: TrainserveClient) -> None:
    dataset = client.upload_dataset(b"a,b,kind\n1,2,cat\n3,4,dog\n5,6,cat\n", "pets.csv")
    kind = dataset.columns[2]
    assert (kind.dtype, kind.classes) == ("string", ["cat", "dog"])


def test_npz_upload(client: TrainserveClient) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, X=np.arange(12, dtype=np.float32).reshape(6, 2), y=np.array([0, 1, 0, 1, 1, 0]))
    dataset = client.upload_dataset(buffer.getvalue(), "table.npz")
    assert dataset.format == "npz"
    assert dataset.n_rows == 6
    assert [c.name for c in dataset.columns] == ["x0", "x1", "y"]


def test_get_list_and_delete(client: TrainserveClient, server: Server, moons: tuple[bytes, int]) -> None:
    dataset = client.upload_dataset(moons[0], "moons.csv")
    assert client.get_dataset(dataset.id) == dataset
    assert dataset.id in {d.id for d in client.list_datasets()}
    stored = server.store_dir / "datasets" / f"{dataset.id}.npz"
    assert stored.exists()
    client.delete_dataset(dataset.id)
    with pytest.raises(ApiError) as missing:
        client.get_dataset(dataset.id)
    assert missing.value.status_code == 404
    assert missing.value.body["type"] == "not_found"
    assert not stored.exists()


BAD_UPLOADS = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"a,b,label\n", "no data rows", id="header-only"),
    pytest.param(b"a,b,label\n1,2,0\n3,4\n", "row 2 has 2 fields", id="ragged"),
    pytest.param(b"a,b,label\n1,nan,0\n", "row 1, column 'b'", id="nan"),
    pytest.param(b"a,b,label\n1,2,0\n1,inf,1\n", "row 2, column 'b'", id="inf"),
    pytest.param(b"a,b,label\n1,2,0\n1,x,1\n", "row 2, column 'b'", id="text-in-numbers"),
    pytest.param(b"a,a,label\n1,2,0\n", "appears twice", id="duplicate-header"),
    pytest.param(b"a,,label\n1,2,0\n", "empty name", id="empty-header"),
    pytest.param(b"a,b,label\n1,2,\xff\xfe\n", "not UTF-8", id="non-utf8"),
    pytest.param(b"PK\x03\x04garbage", "not a readable .npz", id="garbage-zip"),
]


@pytest.mark.parametrize(("payload", "expected"), BAD_UPLOADS)
def test_bad_upload_is_422_naming_the_problem_and_leaves_nothing(
    client: TrainserveClient, server: Server, payload: bytes, expected: str
) -> None:
    before_rows = {d.id for d in client.list_datasets()}
    before_files = server.files("datasets")
    response = client.http.post("/datasets", files={"file": ("bad.csv", payload)})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "invalid_input"
    assert expected in body["detail"]
    assert {d.id for d in client.list_datasets()} == before_rows
    assert server.files("datasets") == before_files
    assert server.files("tmp") == []


def test_upload_without_file_field_is_4xx_naming_what_is_wrong(client: TrainserveClient) -> None:
    form = client.http.post("/datasets", data={"other": "x"})  # urlencoded, not multipart
    assert form.status_code == 415
    assert "multipart/form-data" in form.json()["detail"]
    stranger = client.http.post("/datasets", files={"other": (None, "x")})
    assert stranger.status_code == 422
    assert stranger.json()["errors"][0]["loc"] == ["body", "other"]
    empty = client.http.post(
        "/datasets", content=b"--x--\r\n", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert empty.status_code == 422
    assert empty.json()["errors"][0]["loc"] == ["body", "file"]


def test_unknown_dataset_is_404_json(server: Server) -> None:
    response = httpx.get(f"{server.url}/datasets/0123456789abcdef0123456789abcdef")
    assert response.status_code == 404
    assert response.json()["type"] == "not_found"


def test_path_like_ids_are_never_used_as_paths(server: Server) -> None:
    for evil in ("..%2F..%2Fetc%2Fpasswd", "..", "%2e%2e"):
        response = httpx.delete(f"{server.url}/datasets/{evil}")
        assert response.status_code in (404, 405), response.text
