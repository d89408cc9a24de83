"""Schedulers, early stopping, clipping, Dropout and BatchNorm through a real server and worker."""

from __future__ import annotations

import pytest

from tests.conftest import Server, assert_spec_refused, moons_spec
from trainserve.client import TrainserveClient


@pytest.fixture(scope="module")
def dataset_id(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        return ts.upload_dataset(moons[0], "moons.csv").id


def test_a_job_with_every_training_feature_succeeds_and_says_how_it_ran(
    client: TrainserveClient, dataset_id: str
) -> None:
    spec = moons_spec(
        dataset_id,
        model=[
            {"type": "Linear", "out_features": 32},
            {"type": "BatchNorm1d"},
            "ReLU",
            {"type": "Dropout", "p": 0.1},
            {"type": "Linear", "out_features": 2},
        ],
        optimizer={"type": "SGD", "lr": 0.2, "momentum": 0.9},
        scheduler={"type": "ReduceLROnPlateau", "patience": 1},
        early_stopping={"patience": 2, "min_delta": 0.01},
        clip_grad_norm=1.0,
        validation_split=0.25,
        epochs=500,
    )
    job = client.wait(client.train(spec).id)
    assert job.status == "succeeded", job.error
    assert job.epoch < 500  # stopped early, on a validation plateau
    assert any(note.startswith("early stopping: stopped after epoch") for note in job.notes)
    assert any(note.startswith("training loop:") for note in job.notes)
    model = client.get_model(job.model_id or "")
    assert model.notes == job.notes
    assert model.spec["early_stopping"]["patience"] == 2
    assert model.metrics["val_accuracy"] > 0.8
    prediction = client.predict(model.id, [[0.0, 1.0]])  # one row through BatchNorm, in eval mode
    assert len(prediction.predictions) == 1


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"early_stopping": {"patience": 3}}, ["early_stopping"]),
        ({"scheduler": {"type": "CyclicLR"}}, ["body", "scheduler"]),
        ({"scheduler": {"type": "StepLR", "step_size": 0}}, ["body", "scheduler", "StepLR", "step_size"]),
        ({"clip_grad_norm": -1}, ["body", "clip_grad_norm"]),
        (
            {"model": [{"type": "BatchNorm1d"}, {"type": "Linear", "out_features": 2}], "batch_size": 1},
            ["batch_size"],
        ),
    ],
)
def test_bad_training_options_are_422_naming_the_field_and_create_no_job(
    client: TrainserveClient, dataset_id: str, change: dict[str, object], loc: list[object]
) -> None:
    assert_spec_refused(client, dataset_id, change, loc)
