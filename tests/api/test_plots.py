"""GET /jobs/{id}/loss.png and GET /models/{id}/plot.png against a real server and worker."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.client import TrainserveClient
from trainserve.examples import make_moons, make_wave, to_csv


def decode(content: bytes) -> np.ndarray:
    """The PNG as an RGB array; fails unless the bytes are a complete PNG."""
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG"
    image.load()
    return np.asarray(image.convert("RGB"))


def share_of(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> float:
    """Fraction of pixels within ``tolerance`` of a colour."""
    return float((np.abs(pixels.astype(int) - rgb).max(axis=2) <= tolerance).mean())


@pytest.fixture(scope="module")
def moons_model(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.wait(ts.train(moons_spec(dataset.id, epochs=40, validation_split=0.2)).id)
        assert job.status == "succeeded", job.error
        assert job.model_id is not None
        return job.model_id


def train(ts: TrainserveClient, csv: str, **spec: object) -> str:
    dataset = ts.upload_dataset(csv.encode(), "data.csv")
    job = ts.wait(
        ts.train({"dataset_id": dataset.id, "epochs": 20, "optimizer": {"type": "Adam", "lr": 0.02}} | spec).id
    )
    assert job.status == "succeeded", job.error
    assert job.model_id is not None
    return job.model_id


def test_loss_plot_of_a_finished_job(client: TrainserveClient, moons_model: str) -> None:
    job_id = client.get_model(moons_model).job_id
    response = client.http.get(f"/jobs/{job_id}/loss.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    pixels = decode(response.content)
    assert pixels.shape == (600, 800, 3)
    # the train (tab:blue) and validation (tab:orange) curves are both drawn
    assert share_of(pixels, (31, 119, 180), 10) > 0.001
    assert share_of(pixels, (255, 127, 14), 10) > 0.001

    small = client.http.get(f"/jobs/{job_id}/loss.png", params={"width": 400, "height": 300})
    assert decode(small.content).shape == (300, 400, 3)


def test_plot_sizes_are_bounded(client: TrainserveClient, moons_model: str) -> None:
    job_id = client.get_model(moons_model).job_id
    for params in ({"width": 10_000}, {"height": 50}, {"width": "wide"}):
        response = client.http.get(f"/jobs/{job_id}/loss.png", params=params)
        assert response.status_code == 422
        assert response.json()["errors"][0]["loc"][0] == "query"
    assert client.http.get(f"/models/{moons_model}/plot.png", params={"width": 5000}).status_code == 422


def test_unknown_ids_are_404(client: TrainserveClient) -> None:
    for url in ("/jobs/nope/loss.png", f"/models/{'0' * 32}/plot.png"):
        response = client.http.get(url)
        assert response.status_code == 404
        assert response.json()["type"] == "not_found"


def test_classifier_on_two_features_shows_decision_regions(client: TrainserveClient, moons_model: str) -> None:
    response = client.http.get(f"/models/{moons_model}/plot.png")
    assert response.status_code == 200
    assert response.headers["x-plot-kind"] == "decision-regions"
    pixels = decode(response.content)
    assert pixels.shape == (600, 800, 3)
    # RdYlBu regions: a large blue area (class 0) and a large red one (class 1)
    assert share_of(pixels, (69, 117, 180), 50) > 0.05
    assert share_of(pixels, (215, 48, 39), 50) > 0.05
    large = client.http.get(f"/models/{moons_model}/plot.png", params={"width": 1600, "height": 1200})
    assert decode(large.content).shape == (1200, 1600, 3)


def test_concurrent_plots_all_render(client: TrainserveClient, moons_model: str) -> None:
    job_id = client.get_model(moons_model).job_id
    urls = [f"/models/{moons_model}/plot.png", f"/jobs/{job_id}/loss.png"] * 3
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(client.http.get, urls))
    assert [r.status_code for r in responses] == [200] * 6
    assert len({r.content for r in responses[::2]}) == 1  # the same model plot every time
    for response in responses:
        assert decode(response.content).shape == (600, 800, 3)


def test_regressor_on_one_feature_shows_data_and_fitted_curve(client: TrainserveClient) -> None:
    x, y = make_wave(200)
    model_id = train(
        client,
        to_csv(x, y, ["x"], "y"),
        model=[{"type": "Linear", "out_features": 16}, "Tanh", {"type": "Linear", "out_features": 1}],
        loss="MSELoss",
    )
    response = client.http.get(f"/models/{model_id}/plot.png")
    assert response.headers["x-plot-kind"] == "fitted-curve"
    pixels = decode(response.content)
    assert pixels.shape == (600, 800, 3)
    assert share_of(pixels, (255, 0, 0), 30) > 0.001  # the model's red curve
    assert share_of(pixels, (0, 0, 0), 90) > 0.005  # the black data points


def test_other_models_show_predicted_against_actual(client: TrainserveClient) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 3))
    y = x @ np.array([1.0, -2.0, 0.5])
    model_id = train(client, to_csv(x, y, target="y"), model=[{"type": "Linear", "out_features": 1}], loss="MSELoss")
    response = client.http.get(f"/models/{model_id}/plot.png")
    assert response.headers["x-plot-kind"] == "predicted-vs-actual"
    assert decode(response.content).shape == (600, 800, 3)

    labels = np.array(["a", "b", "c"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)]
    classifier = train(
        client, to_csv(x, labels, target="kind"), model=[{"type": "Linear", "out_features": 3}], loss="CrossEntropyLoss"
    )
    response = client.http.get(f"/models/{classifier}/plot.png")
    assert response.headers["x-plot-kind"] == "confusion-matrix"
    assert decode(response.content).shape == (600, 800, 3)


def test_three_classes_on_two_features_show_regions(client: TrainserveClient) -> None:
    x, _ = make_moons(150, noise=0.1)
    labels = np.digitize(x[:, 0], [0.0, 1.0])  # three vertical bands
    model_id = train(client, to_csv(x, labels), model=[{"type": "Linear", "out_features": 3}], loss="CrossEntropyLoss")
    response = client.http.get(f"/models/{model_id}/plot.png")
    assert response.headers["x-plot-kind"] == "decision-regions"
    assert decode(response.content).shape == (600, 800, 3)


def test_a_model_whose_dataset_was_deleted_has_no_plot(client: TrainserveClient) -> None:
    x, y = make_wave(60)
    model_id = train(
        client, to_csv(x, y, ["x"], "y"), model=[{"type": "Linear", "out_features": 1}], loss="MSELoss", epochs=2
    )
    client.delete_dataset(client.get_model(model_id).dataset_id or "")
    response = client.http.get(f"/models/{model_id}/plot.png")
    assert response.status_code == 409
    assert "deleted" in response.json()["detail"]
    assert client.http.get(f"/jobs/{client.get_model(model_id).job_id}/loss.png").status_code == 200


@pytest.fixture(scope="module")
def no_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(Path(tmp_path_factory.mktemp("no-worker")), workers=0)
    yield running
    stop_server(running)


def test_a_job_with_no_epoch_yet_is_409(no_worker: Server, moons: tuple[bytes, int]) -> None:
    with TrainserveClient(no_worker.url) as ts:
        job = ts.train(moons_spec(), file=moons[0], filename="moons.csv")
        response = ts.http.get(f"/jobs/{job.id}/loss.png")
        assert response.status_code == 409
        assert response.json()["type"] == "conflict"
        assert "no finished epoch" in response.json()["detail"]


def test_a_running_job_has_a_growing_loss_plot(client: TrainserveClient, moons: tuple[bytes, int]) -> None:
    job = client.train(moons_spec(epochs=100_000, batch_size=8), file=moons[0], filename="moons.csv")
    try:
        deadline = time.monotonic() + 60
        while (response := client.http.get(f"/jobs/{job.id}/loss.png")).status_code == 409:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-cache"
        assert decode(response.content).shape == (600, 800, 3)
        assert client.get_job(job.id).status == "running"
        assert len(client.get_job(job.id).history) >= 1
    finally:
        client.cancel_job(job.id)
    assert client.wait(job.id).status == "cancelled"


def test_a_model_plot_is_drawn_once_and_revalidates_by_etag(
    server: Server, client: TrainserveClient, moons_model: str
) -> None:
    first = client.http.get(f"/models/{moons_model}/plot.png", params={"width": 300, "height": 200})
    assert first.status_code == 200
    assert "immutable" in first.headers["cache-control"]
    etag = first.headers["etag"]
    again = client.http.get(f"/models/{moons_model}/plot.png", params={"width": 300, "height": 200})
    # The very bytes, from the cache: a redraw would be a new PNG (matplotlib stamps none,
    # but the cache's file is what answers; see serving/plot_cache.py).
    assert (again.content, again.headers["etag"], again.headers["x-plot-kind"]) == (
        first.content,
        etag,
        "decision-regions",
    )
    unchanged = client.http.get(
        f"/models/{moons_model}/plot.png", params={"width": 300, "height": 200}, headers={"If-None-Match": etag}
    )
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    other_size = client.http.get(
        f"/models/{moons_model}/plot.png", params={"width": 320, "height": 200}, headers={"If-None-Match": etag}
    )
    assert other_size.status_code == 200
    assert other_size.headers["etag"] != etag
    assert decode(other_size.content).shape == (200, 320, 3)
