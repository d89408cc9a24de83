"""GET /models/{id}/export: archives that torch loads and that answer as /predict does."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import Server, moons_spec
from trainserve.client import TrainserveClient
from trainserve.examples import make_wave, to_csv


@pytest.fixture(scope="module")
def moons_model(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        spec = moons_spec(name="exported", epochs=10, validation_split=0.2)
        spec["model"] = [*spec["model"][:-1], {"type": "BatchNorm1d"}, {"type": "Dropout", "p": 0.2}, spec["model"][-1]]
        job = ts.wait(ts.train(spec, file=moons[0], filename="moons.csv").id)
        assert job.status == "succeeded", job.error
        return job.model_id or ""


ROWS = [[-1.0, 0.0], [0.0, 1.0], [0.0, 0.5], [1.0, -0.5], [2.0, 0.5], [0.3, 0.2], [1.7, -0.1]]


Loader = Callable[[bytes], tuple[torch.nn.Module, dict[str, Any]]]


def load_torchscript(content: bytes) -> tuple[torch.nn.Module, dict[str, Any]]:
    extra = {"trainserve.json": ""}
    with pytest.warns(DeprecationWarning, match="torch.jit.load"):  # TorchScript is deprecated in torch 2.x
        module = torch.jit.load(io.BytesIO(content), _extra_files=extra)
    return module, json.loads(extra["trainserve.json"])


def load_program(content: bytes) -> tuple[torch.nn.Module, dict[str, Any]]:
    extra = {"trainserve.json": ""}
    program = torch.export.load(io.BytesIO(content), extra_files=extra)
    return program.module(), json.loads(extra["trainserve.json"])


@pytest.mark.parametrize(
    ("fmt", "load", "suffix"),
    [("torchscript", load_torchscript, ".torchscript.pt"), ("torch.export", load_program, ".pt2")],
)
def test_exported_classifier_answers_as_predict(
    client: TrainserveClient, moons_model: str, fmt: str, load: Loader, suffix: str
) -> None:
    response = client.http.get(f"/models/{moons_model}/export", params={"format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == f'attachment; filename="{moons_model}{suffix}"'
    module, metadata = load(response.content)
    assert metadata["model_id"] == moons_model
    assert metadata["name"] == "exported"
    assert metadata["features"] == ["x0", "x1"]
    assert metadata["classes"] == [0, 1]
    assert metadata["outputs"] == "probabilities"
    with torch.inference_mode():
        probabilities = module(torch.tensor(ROWS, dtype=torch.float32)).numpy()
        single = module(torch.tensor(ROWS[:1], dtype=torch.float32)).numpy()  # any batch size
    expected = client.predict(moons_model, ROWS)
    assert expected.probabilities is not None
    np.testing.assert_allclose(probabilities, expected.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single, expected.probabilities[:1], rtol=1e-5, atol=1e-6)
    assert [metadata["classes"][k] for k in probabilities.argmax(axis=1)] == expected.predictions
    # the same archive again, from the cache
    assert client.export_model(moons_model, fmt) == response.content


def test_exported_regressor_answers_as_predict(client: TrainserveClient) -> None:
    x, y = make_wave(120)
    spec = {
        "target": "y",
        "model": [{"type": "Linear", "out_features": 8}, "Tanh", {"type": "Linear", "out_features": 1}],
    }
    spec |= {"loss": "MSELoss", "epochs": 5, "optimizer": "Adam"}
    job = client.wait(client.train(spec, file=to_csv(x, y, ["x"], "y").encode()).id)
    assert job.status == "succeeded", job.error
    rows = [[0.0], [3.3], [12.5], [20.0]]
    expected = client.predict(job.model_id or "", rows).predictions
    for load, fmt in ((load_torchscript, "torchscript"), (load_program, "torch.export")):
        module, metadata = load(client.export_model(job.model_id or "", fmt))
        assert metadata["outputs"] == "values"
        assert metadata["targets"] == ["y"]
        with torch.inference_mode():
            values = module(torch.tensor(rows, dtype=torch.float32)).numpy()
        assert values.shape == (4, 1)
        np.testing.assert_allclose(values[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_exported_binary_classifier_answers_as_predict(client: TrainserveClient, moons: tuple[bytes, int]) -> None:
    spec = moons_spec(epochs=5, loss="BCEWithLogitsLoss")
    spec["model"] = [{"type": "Linear", "out_features": 8}, "ReLU", {"type": "Linear", "out_features": 1}]
    job = client.wait(client.train(spec, file=moons[0], filename="moons.csv").id)
    assert job.status == "succeeded", job.error
    expected = client.predict(job.model_id or "", ROWS)
    for load, fmt in ((load_torchscript, "torchscript"), (load_program, "torch.export")):
        module, metadata = load(client.export_model(job.model_id or "", fmt))
        assert metadata["task"] == "binary"
        with torch.inference_mode():
            probabilities = module(torch.tensor(ROWS, dtype=torch.float32)).numpy()
        np.testing.assert_allclose(probabilities, expected.probabilities, rtol=1e-5, atol=1e-6)


def test_export_refuses_unknown_formats_and_models(client: TrainserveClient, moons_model: str) -> None:
    response = client.http.get(f"/models/{moons_model}/export", params={"format": "pickle"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", "format"]
    missing = client.http.get(f"/models/{'f' * 32}/export")
    assert missing.status_code == 404
    assert missing.json()["type"] == "not_found"
