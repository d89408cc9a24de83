"""The guide's 2x30 Tanh make_moons experiment, through the API, against the guide's own loop."""

from __future__ import annotations

import pytest

from bench.guide import accuracy, train_moons
from tests.conftest import Server
from trainserve.client import TrainserveClient
from trainserve.examples import guide_moons_spec, make_moons, to_csv


# A minute of CPU training that checks the engine, not the database: the embedded backend suffices.
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_api_classifies_moons_at_least_as_well_as_the_guides_loop(client: TrainserveClient, server: Server) -> None:
    x, y = make_moons(200, noise=0.05, seed=0)
    guide_model, _ = train_moons(x, y, epochs=300)
    guide_accuracy = accuracy(guide_model, x, y)

    # The guide's algorithm exactly: raw inputs, per-sample SGD in the DataLoader's fixed order,
    # and torch.manual_seed(0) before the layers are built, as bench/guide.py does.
    spec = {**guide_moons_spec(), "shuffle": False}
    job = client.wait(client.train(spec, file=to_csv(x, y, target="y").encode(), filename="moons.csv").id)
    assert job.status == "succeeded", job.error
    model = client.get_model(job.model_id or "")
    assert model.metrics["train_accuracy"] >= guide_accuracy
    served = client.predict(model.id, x.tolist()).predictions
    assert sum(int(p == t) for p, t in zip(served, y.tolist(), strict=True)) / len(y) >= guide_accuracy
