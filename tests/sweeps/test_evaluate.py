"""POST /models/{id}/evaluate on a real server: the stored metrics are the metrics of what
/predict answers for the same rows; the plots draw; bad datasets are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import moons_spec
from trainserve.client import TrainserveClient
from trainserve.datasets.tables import Table
from trainserve.examples import make_moons, make_wave, to_csv
from trainserve.serving import evaluation
from trainserve.serving.predictor import Predictor
from trainserve.training import metrics
from trainserve.training.network import TabularNet
from trainserve.training.spec import TrainSpec


def png_size(content: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(content)) as image:
        return image.size


def test_evaluate_a_classifier_and_a_regressor_store_and_draw_their_metrics(client: TrainserveClient) -> None:
    x, y = make_moons(200, noise=0.05, seed=0)
    trained = client.upload_dataset(to_csv(x, y).encode(), "moons.csv")
    job = client.wait(client.train(moons_spec(trained.id, epochs=5)).id)
    assert job.model_id is not None
    x_new, y_new = make_moons(150, noise=0.2, seed=7)
    held_out = client.upload_dataset(to_csv(x_new, y_new).encode(), "moons-new.csv")

    response = client.http.post(f"/models/{job.model_id}/evaluate", json={"dataset_id": held_out.id})
    assert response.status_code == 201, response.text
    stored = response.json()
    assert stored["n_rows"] == 150
    # The same numbers as the report of /predict's answers for those rows.
    answer = client.predict(job.model_id, x_new.tolist())
    assert answer.probabilities is not None
    expected = metrics.classification_report(y_new, np.asarray(answer.probabilities), answer.classes or [])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "expected_calibration_error"):
        assert stored["metrics"][key] == pytest.approx(expected[key], rel=1e-5), key
    assert stored["metrics"]["confusion_matrix"] == expected["confusion_matrix"]
    assert set(stored["metrics"]["per_class"]) == {"0", "1"}
    listed = client.http.get(f"/models/{job.model_id}/evaluations").json()
    assert [e["id"] for e in listed] == [stored["id"]]
    for kind in ("confusion", "roc", "calibration"):
        plot = client.http.get(f"/models/{job.model_id}/evaluations/{stored['id']}/{kind}.png?width=400&height=300")
        assert plot.status_code == 200, kind
        assert png_size(plot.content) == (400, 300)
    assert client.http.get(f"/models/{job.model_id}/evaluations/{stored['id']}/residuals.png").status_code == 409

    # A regressor: MAE, RMSE, R², the residuals' summary and their plot.
    wx, wy = make_wave(120, seed=0)
    wave = client.upload_dataset(to_csv(wx, wy, ["x"], "y").encode(), "wave.csv")
    # The guide's tanh regressor (examples/tanh.json): its generated code is likely compiled already.
    spec = {"model": [{"type": "Linear", "out_features": 10}, "Tanh", {"type": "Linear", "out_features": 1}]}
    regressor = client.wait(client.train({"dataset_id": wave.id, "loss": "MSELoss", "epochs": 3, **spec}).id)
    assert regressor.model_id is not None
    scored = client.http.post(f"/models/{regressor.model_id}/evaluate", json={"dataset_id": wave.id}).json()
    assert set(scored["metrics"]) >= {"mae", "rmse", "r2", "residuals"}
    assert scored["metrics"]["rmse"] >= scored["metrics"]["mae"] > 0
    residuals = client.http.get(f"/models/{regressor.model_id}/evaluations/{scored['id']}/residuals.png")
    assert residuals.status_code == 200

    # Refused: a table without the model's columns, labels the model never saw, unknown ids.
    before = len(client.http.get(f"/models/{job.model_id}/evaluations").json())
    refused = client.http.post(f"/models/{job.model_id}/evaluate", json={"dataset_id": wave.id})
    assert refused.status_code == 422
    assert "x0" in refused.json()["detail"]
    relabelled = client.upload_dataset(to_csv(x_new, np.where(y_new == 1, 5, 0)).encode(), "moons-5.csv")
    unseen = client.http.post(f"/models/{job.model_id}/evaluate", json={"dataset_id": relabelled.id})
    assert unseen.status_code == 422
    assert unseen.json()["detail"].startswith("row ")
    assert client.http.post(f"/models/{job.model_id}/evaluate", json={"dataset_id": "0" * 32}).status_code == 404
    assert client.http.post(f"/models/{'0' * 32}/evaluate", json={"dataset_id": wave.id}).status_code == 404
    assert len(client.http.get(f"/models/{job.model_id}/evaluations").json()) == before


def test_evaluation_reads_the_table_in_chunks_and_gets_the_same_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TrainSpec.model_validate(moons_spec("d" * 32))
    predictor = Predictor("m", ["x0", "x1"], ["label"], "classification", [0, 1], TabularNet(spec.model, 2).eval())
    x, y = make_moons(101, noise=0.1, seed=3)
    table = Table(["x0", "x1", "label"], [x[:, 0].copy(), x[:, 1].copy(), y.astype(np.int64)])
    whole, _ = evaluation.evaluate(predictor, table)
    monkeypatch.setattr(evaluation, "CHUNK_ROWS", 10)
    chunked, curves = evaluation.evaluate(predictor, table)
    # Chunks of 10 rows take the row-wise generated forward pass, the whole table torch's
    # kernels (as /predict does): the same numbers but for float32 rounding.
    assert chunked["confusion_matrix"] == whole["confusion_matrix"]
    for key in ("accuracy", "macro_f1", "roc_auc", "log_loss", "expected_calibration_error"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5), key
    assert sum(b["count"] for b in curves["calibration"]) == 101
