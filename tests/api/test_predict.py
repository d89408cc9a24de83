"""POST /predict and the model resources, against a real server process."""

from __future__ import annotations

import hashlib
import math

import httpx
import pytest

from tests.conftest import Server, moons_spec
from trainserve.client import ApiError, TrainserveClient


@pytest.fixture(scope="module")
def model_id(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.wait(ts.train(moons_spec(dataset.id, epochs=60)).id)
        assert job.status == "succeeded", job.error
        return job.model_id or ""


def test_rows_as_lists_give_labels_and_probabilities(client: TrainserveClient, model_id: str) -> None:
    result = client.predict(model_id, [[0.0, 1.0], [1.0, -0.5], [2.0, 0.5]])
    assert result.model_id == model_id
    assert result.predictions == [0, 1, 1]
    assert result.classes == [0, 1]
    assert result.probabilities is not None
    for row, label in zip(result.probabilities, result.predictions, strict=True):
        assert math.isclose(sum(row), 1.0, rel_tol=1e-5)
        assert row.index(max(row)) == label


def test_rows_as_objects_match_rows_as_lists(client: TrainserveClient, model_id: str) -> None:
    as_lists = client.predict(model_id, [[0.3, 0.1]])
    as_objects = client.predict(model_id, [{"x1": 0.1, "x0": 0.3}])
    assert as_objects.predictions == as_lists.predictions
    assert as_objects.probabilities is not None
    assert as_lists.probabilities is not None
    assert as_objects.probabilities[0] == pytest.approx(as_lists.probabilities[0])


def test_models_are_listed_and_described(client: TrainserveClient, model_id: str) -> None:
    assert model_id in {m.id for m in client.list_models()}
    model = client.get_model(model_id)
    assert model.spec["loss"] == {"type": "CrossEntropyLoss", "label_smoothing": 0.0}


BAD_INPUTS = [
    pytest.param([[1.0, 2.0, 3.0]], "inputs[0] has 3 values", id="wrong-width"),
    pytest.param([[1.0, 2.0], [1.0]], "inputs[1] has 1 values", id="ragged"),
    pytest.param([[1.0, "a"]], "inputs[0][1]", id="string"),
    pytest.param([[1.0, None]], "inputs[0][1]", id="null"),
    pytest.param([], "empty", id="empty"),
    pytest.param([{"x0": 1.0, "x9": 2.0}], "unknown feature 'x9'", id="unknown-feature"),
    pytest.param([{"x0": 1.0}], "feature 'x1' is missing", id="missing-feature"),
    pytest.param([[1.0, 2.0], {"x0": 1.0, "x1": 2.0}], "inputs[1]", id="mixed-rows"),
]


@pytest.mark.parametrize(("inputs", "expected"), BAD_INPUTS)
def test_bad_inputs_are_422_naming_row_and_column(
    client: TrainserveClient, model_id: str, inputs: list[object], expected: str
) -> None:
    response = client.http.post("/predict", json={"model_id": model_id, "inputs": inputs})
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]


def test_nan_in_inputs_is_422(client: TrainserveClient, model_id: str) -> None:
    # Python's json (and so the server) reads the non-standard NaN literal: it must still be refused.
    body = f'{{"model_id": "{model_id}", "inputs": [[1.0, NaN]]}}'
    response = client.http.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "inputs[0][1]" in response.json()["detail"]


def test_unknown_model_is_404(client: TrainserveClient) -> None:
    with pytest.raises(ApiError) as error:
        client.predict("0" * 32, [[1.0, 2.0]])
    assert error.value.status_code == 404


def test_deleted_model_is_gone_from_api_cache_and_disk(
    client: TrainserveClient, server: Server, moons: tuple[bytes, int]
) -> None:
    dataset = client.upload_dataset(moons[0], "moons.csv")
    job = client.wait(client.train(moons_spec(dataset.id, epochs=2)).id)
    model_id = job.model_id or ""
    client.predict(model_id, [[0.0, 0.0]])  # now cached in the API process
    weights = server.store_dir / "weights" / f"{model_id}.safetensors"
    assert weights.exists()
    client.delete_model(model_id)
    assert not weights.exists()
    for call in (lambda: client.predict(model_id, [[0.0, 0.0]]), lambda: client.get_model(model_id)):
        with pytest.raises(ApiError) as error:
            call()
        assert error.value.status_code == 404


def test_other_methods_on_predict_get_the_routers_answer(server: Server) -> None:
    # POST /predict skips the router (api/routes/predict.py, PredictFastPath); the rest must not.
    response = httpx.get(server.url + "/predict")
    assert response.status_code == 405
    assert response.json()["type"] == "http_error"
    assert response.headers["allow"] == "POST"


def test_weights_that_no_longer_match_their_sha256_are_refused_not_sent(
    client: TrainserveClient, server: Server, moons: tuple[bytes, int]
) -> None:
    dataset = client.upload_dataset(moons[0], "moons.csv")
    model = client.get_model(client.wait(client.train(moons_spec(dataset.id, epochs=2)).id).model_id or "")
    path = server.store_dir / "weights" / f"{model.id}.safetensors"
    intact = path.read_bytes()
    sent = client.http.get(f"/models/{model.id}/weights")
    assert sent.status_code == 200
    assert sent.content == intact
    assert sent.headers["x-content-sha256"] == model.weights_sha256 == hashlib.sha256(sent.content).hexdigest()
    assert sent.headers["content-length"] == str(len(intact))

    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0xFF
    for damaged in (bytes(flipped), intact[: len(intact) // 2]):  # a changed byte; a file cut short
        path.write_bytes(damaged)
        refused = client.http.get(f"/models/{model.id}/weights")
        assert refused.status_code == 500
        assert refused.headers["content-type"] == "application/json"
        assert "content-disposition" not in refused.headers
        assert "x-content-sha256" not in refused.headers
        assert refused.json()["type"] == "integrity_error"
        assert model.id in refused.json()["detail"]
        assert "sha256" in refused.json()["detail"]
    # Refused the same way by /predict, which loads the same file.
    predicted = client.http.post("/predict", json={"model_id": model.id, "inputs": [[0.0, 0.0]]})
    assert predicted.status_code == 500
    assert predicted.json()["type"] == "integrity_error"

    path.write_bytes(intact)
    assert client.download_weights(model.id) == intact
