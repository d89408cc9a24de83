"""POST/GET/DELETE /datasets against a real server process."""

from __future__ import annotations

import hashlib
import io

import httpx
import numpy as np
import pytest

from tests.conftest import Server, moons_spec
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


def test_real_table_uploads_with_its_profile_and_a_safe_name(client: TrainserveClient, server: Server) -> None:
    # What Excel writes in much of Europe: semicolons, decimal commas, blanks, NA, text columns.
    rows = [f"{i};{i % 7},{i % 10};{'' if i % 3 == 0 else 'NA' if i % 3 == 1 else 'Biscoe'};yes" for i in range(30)]
    data = ("\ufeffrow_id;bill length;island;rare\n" + "\n".join(rows) + "\n").encode()
    response = client.http.post("/datasets", files={"file": ("..\\..\\../../pen guins.csv", data)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["filename"] == "pen guins.csv"
    columns = {c["name"]: c for c in body["columns"]}
    assert list(columns) == ["row_id", "bill length", "island", "rare"]
    bill = columns["bill length"]
    assert (bill["dtype"], bill["kind"], bill["missing"]) == ("float64", "number", 0)
    assert (bill["profile"]["min"], bill["profile"]["max"]) == (0, 6.7)
    island = columns["island"]
    assert (island["dtype"], island["kind"], island["missing"], island["classes"]) == (
        "string",
        "category",
        20,
        ["Biscoe"],
    )
    assert island["profile"]["top"] == [{"value": "Biscoe", "count": 10}]
    assert any("missing in most rows (20 of 30)" in w for w in island["profile"]["warnings"])
    assert any("constant" in w for w in columns["rare"]["profile"]["warnings"])
    assert client.http.get(f"/datasets/{body['id']}").json() == body

    # The form overrides the guesses: read as commas, the file is one implausible column.
    refused = client.http.post("/datasets", files={"file": ("t.csv", data)}, data={"delimiter": "comma"})
    assert refused.status_code == 422
    assert "set the form field 'delimiter'" in refused.json()["detail"]
    custom = client.http.post("/datasets", files={"file": ("t.csv", data)}, data={"na_values": '["NA", "Biscoe"]'})
    assert {c["name"]: c["missing"] for c in custom.json()["columns"]}["island"] == 30

    schema = client.http.get("/openapi.json").json()["components"]["schemas"]
    assert "warnings" in schema["ColumnProfile"]["properties"]


def test_the_same_bytes_twice_share_one_stored_table(client: TrainserveClient, server: Server) -> None:
    data = b"x,y,label\n" + b"".join(b"%d,%d,%d\n" % (i, i * i % 11, i % 2) for i in range(40))
    first = client.upload_dataset(data, "a.csv")
    second = client.upload_dataset(data, "b.csv")
    assert first.id != second.id
    assert second.filename == "b.csv"
    files = server.store_dir / "datasets"
    one, two = files / f"{first.id}.npz", files / f"{second.id}.npz"
    assert one.stat().st_ino == two.stat().st_ino  # one table on disk, two names
    client.delete_dataset(first.id)
    assert not one.exists()
    assert client.get_dataset(second.id).n_rows == 40
    job = client.wait(client.train(moons_spec(second.id, epochs=1, features=["x", "y"])).id)
    assert job.status == "succeeded", job.error
    client.delete_dataset(second.id)
    assert not two.exists()


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
    pytest.param(b"a,b,label\n1,2,0\n1,inf,1\n", "row 2, column 'b'", id="inf"),
    pytest.param(
        b"a|b|label\n1|2|0\n1|2\n1|3|1\n", "row 2 has 2 fields, the header has 3 (split on the pipe", id="pipe"
    ),
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
