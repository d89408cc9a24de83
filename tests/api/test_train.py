"""POST /train, GET /jobs, POST /jobs/{id}/cancel, against a real server and worker process."""

from __future__ import annotations

import io
import json
import time

import pytest
from safetensors.numpy import load as load_safetensors

from tests.conftest import Server, assert_spec_refused, moons_spec
from trainserve.client import TrainserveClient
from trainserve.storage.local import sha256_file


@pytest.fixture(scope="module")
def dataset_id(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        return ts.upload_dataset(moons[0], "moons.csv").id


def long_spec(dataset_id: str) -> dict[str, object]:
    """A job that runs for minutes unless cancelled."""
    return moons_spec(dataset_id, epochs=100_000, batch_size=1, optimizer="SGD")


def test_train_answers_202_queued_with_location(client: TrainserveClient, dataset_id: str) -> None:
    response = client.http.post("/train", json=moons_spec(dataset_id))
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued"
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert client.wait(job["id"]).status == "succeeded"


def test_job_runs_in_a_worker_process_and_saves_the_model(
    client: TrainserveClient, server: Server, dataset_id: str
) -> None:
    job = client.wait(client.train(moons_spec(dataset_id, validation_split=0.25)).id)
    assert job.status == "succeeded", job.error
    assert job.worker is not None
    assert int(job.worker.rsplit(":", 1)[1]) != server.process.pid  # not the API process
    assert job.epoch == job.epochs == 30
    assert job.device == "cpu"
    assert job.val_loss is not None
    assert job.val_metrics is not None
    assert "accuracy" in job.val_metrics
    assert len(job.history) == 30
    assert job.started_at is not None
    assert job.finished_at is not None
    assert job.finished_at >= job.started_at

    model = client.get_model(job.model_id or "")
    assert model.job_id == job.id
    assert model.dataset_id == dataset_id
    assert model.dataset_sha256 == client.get_dataset(dataset_id).sha256
    assert model.task == "classification"
    assert model.features == ["x0", "x1"]
    assert model.classes == [0, 1]
    assert model.n_parameters == 2 * 30 + 30 + 30 * 30 + 30 + 30 * 2 + 2
    assert model.metrics["train_accuracy"] > 0.95
    assert "val_accuracy" in model.metrics
    assert model.torch_version.startswith("2.")
    assert model.input_mean is not None
    assert len(model.input_mean) == 2

    weights_file = server.store_dir / "weights" / f"{model.id}.safetensors"
    assert sha256_file(weights_file) == model.weights_sha256
    downloaded = client.download_weights(model.id)
    assert downloaded == weights_file.read_bytes()
    tensors = load_safetensors(downloaded)
    assert tensors["net.0.weight"].shape == (30, 2)
    assert tensors["scaler.mean"].tolist() == pytest.approx(model.input_mean)


def test_standardize_off_saves_no_statistics(client: TrainserveClient, dataset_id: str) -> None:
    job = client.wait(client.train(moons_spec(dataset_id, standardize=False, epochs=2)).id)
    model = client.get_model(job.model_id or "")
    assert model.input_mean is None
    assert model.input_std is None


def test_same_seed_same_weights_bit_for_bit(client: TrainserveClient, dataset_id: str) -> None:
    spec = moons_spec(dataset_id, epochs=3, seed=7)
    first, second = (client.wait(client.train(spec).id) for _ in range(2))
    a = load_safetensors(client.download_weights(first.model_id or ""))
    b = load_safetensors(client.download_weights(second.model_id or ""))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    other = client.wait(client.train({**spec, "seed": 8}).id)
    c = load_safetensors(client.download_weights(other.model_id or ""))
    assert not (a["net.0.weight"] == c["net.0.weight"]).all()


def test_multipart_file_and_spec_in_one_request(client: TrainserveClient, moons: tuple[bytes, int]) -> None:
    spec = moons_spec(epochs=2)
    response = client.http.post("/train", data={"spec": json.dumps(spec)}, files={"file": ("moons.csv", moons[0])})
    assert response.status_code == 202, response.text
    job = client.wait(response.json()["id"])
    assert job.status == "succeeded", job.error
    assert client.get_dataset(job.dataset_id or "").n_rows == moons[1]


def test_string_labels_are_decoded_back(client: TrainserveClient) -> None:
    rows = "\n".join(f"{i % 7 / 7},{(i * 3) % 5 / 5},{'big' if i % 7 > 3 else 'small'}" for i in range(60))
    dataset = client.upload_dataset(f"a,b,size\n{rows}\n".encode(), "sizes.csv")
    spec = {
        "dataset_id": dataset.id,
        "model": [{"type": "Linear", "out_features": 2}],
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "Adam", "lr": 0.05},
        "epochs": 60,
    }
    job = client.wait(client.train(spec).id)
    assert job.status == "succeeded", job.error
    result = client.predict(job.model_id or "", [[6 / 7, 0.0], [0.0, 0.0]])
    assert result.predictions == ["big", "small"]
    assert result.classes == ["big", "small"]


def test_regression_with_validation_metrics(client: TrainserveClient) -> None:
    rows = "\n".join(f"{x / 10},{2 * x / 10 + 1}" for x in range(100))
    dataset = client.upload_dataset(f"x,y\n{rows}\n".encode(), "line.csv")
    spec = {
        "dataset_id": dataset.id,
        "model": [{"type": "Linear", "out_features": 1}],
        "loss": "MSELoss",
        "optimizer": {"type": "Adam", "lr": 0.1},
        "epochs": 150,
        "validation_split": 0.2,
    }
    job = client.wait(client.train(spec).id)
    assert job.status == "succeeded", job.error
    assert job.val_metrics is not None
    assert set(job.val_metrics) == {"mse", "mae", "r2"}
    model = client.get_model(job.model_id or "")
    assert model.metrics["val_r2"] > 0.99
    assert client.predict(model.id, [[5.0]]).predictions[0] == pytest.approx(11.0, abs=0.2)


BAD_SPECS = [
    pytest.param({"model": [{"type": "Conv2d"}]}, ["body", "model", 0], id="unknown-layer"),
    pytest.param({"model": [{"type": "__import__('os').system('id')"}]}, ["body", "model", 0], id="code-as-name"),
    pytest.param({"loss": "NotALoss"}, ["body", "loss"], id="unknown-loss"),
    pytest.param(
        {"optimizer": {"type": "SGD", "lr": 0.1, "foo": 1}}, ["body", "optimizer", "SGD", "foo"], id="unknown-kwarg"
    ),
    pytest.param({"optimizer": {"type": "SGD", "lr": "fast"}}, ["body", "optimizer", "SGD", "lr"], id="wrong-type"),
    pytest.param(
        {"model": [{"type": "Linear", "out_features": -3}]},
        ["body", "model", 0, "Linear", "out_features"],
        id="negative-width",
    ),
    pytest.param({"epochs": 0}, ["body", "epochs"], id="zero-epochs"),
    pytest.param(
        {"model": [{"type": "Linear", "out_features": 3}]}, ["model", 0, "out_features"], id="width-vs-labels"
    ),
    pytest.param({"target": "nope"}, ["target"], id="missing-target"),
    pytest.param({"features": ["x0", "ghost"]}, ["features"], id="missing-feature"),
    pytest.param(
        {
            "loss": "MSELoss",
            "model": [{"type": "Linear", "out_features": 1}],
            "target": "x1",
            "features": ["x0"],
            "epochs": 10**9,
        },
        ["epochs"],
        id="absurd-epochs",
    ),
    pytest.param(
        {"model": [{"type": "Linear", "out_features": 10**6}, {"type": "Linear", "out_features": 2}]},
        ["model", 0, "out_features"],
        id="absurd-width",
    ),
]


@pytest.mark.parametrize(("change", "loc"), BAD_SPECS)
def test_bad_spec_is_rejected_at_submit_and_creates_no_job(
    client: TrainserveClient, dataset_id: str, change: dict[str, object], loc: list[object]
) -> None:
    assert_spec_refused(client, dataset_id, change, loc)


def test_missing_dataset_is_422_or_404_and_creates_no_job(client: TrainserveClient) -> None:
    before = len(client.list_jobs())
    assert client.http.post("/train", json=moons_spec()).status_code == 422
    assert client.http.post("/train", json=moons_spec("f" * 32)).status_code == 404
    assert (
        client.http.post("/train", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert len(client.list_jobs()) == before


def test_rejected_multipart_train_leaves_no_dataset(
    client: TrainserveClient, server: Server, moons: tuple[bytes, int]
) -> None:
    before_rows, before_files = len(client.list_datasets()), server.files("datasets")
    bad = moons_spec(model=[{"type": "Linear", "out_features": 5}])
    response = client.http.post("/train", data={"spec": json.dumps(bad)}, files={"file": ("m.csv", moons[0])})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["model", 0, "out_features"]
    assert len(client.list_datasets()) == before_rows
    assert server.files("datasets") == before_files


def test_cancel_queued_at_once_and_running_within_two_seconds(client: TrainserveClient, dataset_id: str) -> None:
    running = client.train(long_spec(dataset_id))
    queued = client.train(long_spec(dataset_id))  # one worker: this one waits behind the first
    deadline = time.monotonic() + 30
    while client.get_job(running.id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.cancel_job(queued.id).status == "cancelled"

    progressed = client.get_job(running.id)
    deadline = time.monotonic() + 10
    while progressed.epoch == 0:  # progress is visible while the job runs
        assert time.monotonic() < deadline
        time.sleep(0.1)
        progressed = client.get_job(running.id)
    assert progressed.train_loss is not None

    asked = time.monotonic()
    assert client.cancel_job(running.id).cancel_requested
    final = client.wait(running.id, timeout=10, poll=0.05)
    assert final.status == "cancelled"
    assert time.monotonic() - asked < 2.5
    assert final.model_id is None
    again = client.http.post(f"/jobs/{running.id}/cancel")
    assert again.status_code == 409
    assert again.json()["type"] == "conflict"


def test_list_jobs_filters_by_status(client: TrainserveClient, dataset_id: str) -> None:
    job = client.wait(client.train(moons_spec(dataset_id, epochs=1)).id)
    assert job.id in {j.id for j in client.list_jobs(status="succeeded")}
    assert job.id not in {j.id for j in client.list_jobs(status="failed")}
    assert client.http.get("/jobs", params={"status": "bogus"}).status_code == 422


def test_dataset_in_use_cannot_be_deleted(client: TrainserveClient, moons: tuple[bytes, int]) -> None:
    dataset = client.upload_dataset(moons[0], "moons.csv")
    job = client.train(long_spec(dataset.id))
    response = client.http.delete(f"/datasets/{dataset.id}")
    assert response.status_code == 409
    client.cancel_job(job.id)
    client.wait(job.id, timeout=10)
    assert client.http.delete(f"/datasets/{dataset.id}").status_code == 204


def test_npz_regression_two_targets(client: TrainserveClient) -> None:
    import numpy as np

    x = np.linspace(-1, 1, 80).reshape(-1, 1)
    buffer = io.BytesIO()
    np.savez(buffer, X=x, y=np.hstack([2 * x, -x]))
    dataset = client.upload_dataset(buffer.getvalue(), "two.npz")
    spec = {
        "dataset_id": dataset.id,
        "target": ["y0", "y1"],
        "model": [{"type": "Linear", "out_features": 2}],
        "loss": "MSELoss",
        "optimizer": {"type": "Adam", "lr": 0.1},
        "epochs": 100,
    }
    job = client.wait(client.train(spec).id)
    assert job.status == "succeeded", job.error
    prediction = client.predict(job.model_id or "", [[0.5]]).predictions[0]
    assert prediction == pytest.approx([1.0, -0.5], abs=0.1)
