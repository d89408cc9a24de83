"""Named models: each successful job under a spec's ``name`` adds version 1, 2, ... (real server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event

import trainserve
from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.api.app import create_app
from trainserve.client import TrainserveClient
from trainserve.config import Settings
from trainserve.examples import make_wave, to_csv


@pytest.fixture(scope="module")
def dataset_id(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        return ts.upload_dataset(moons[0], "moons.csv").id


def quick(dataset_id: str, **overrides: object) -> dict[str, object]:
    return moons_spec(dataset_id, epochs=3, **overrides)


def test_successive_jobs_under_a_name_make_versions(client: TrainserveClient, dataset_id: str) -> None:
    ids = []
    for _ in range(3):
        job = client.wait(client.train(quick(dataset_id, name="moons-v")).id)
        assert job.status == "succeeded", job.error
        assert job.name == "moons-v"
        ids.append(job.model_id)
    versions = client.list_models(name="moons-v")
    assert [m.version for m in versions] == [3, 2, 1]  # newest version first
    assert [m.id for m in versions] == ids[::-1]
    assert all(m.name == "moons-v" for m in versions)
    assert [j.model_id for j in client.list_jobs(name="moons-v")] == ids[::-1]

    other = client.wait(client.train(quick(dataset_id, name="other.model_1")).id)
    assert client.get_model(other.model_id or "").version == 1


def test_a_failed_or_cancelled_job_takes_no_version(client: TrainserveClient, dataset_id: str) -> None:
    long = client.train(moons_spec(dataset_id, name="gaps", epochs=100_000, batch_size=1))
    client.cancel_job(long.id)
    assert client.wait(long.id).status == "cancelled"
    x, y = make_wave(100)
    wave = client.upload_dataset(to_csv(x, y, target="y").encode(), "wave.csv")
    diverging = {"dataset_id": wave.id, "name": "gaps", "model": [{"type": "Linear", "out_features": 1}]}
    diverging |= {"loss": "MSELoss", "optimizer": {"type": "SGD", "lr": 1e10}, "epochs": 5}
    assert client.wait(client.train(diverging).id).status == "failed"
    done = client.wait(client.train(quick(dataset_id, name="gaps")).id)
    assert done.status == "succeeded"
    assert [m.version for m in client.list_models(name="gaps")] == [1]


def test_unnamed_models_have_no_version(client: TrainserveClient, dataset_id: str) -> None:
    job = client.wait(client.train(quick(dataset_id)).id)
    model = client.get_model(job.model_id or "")
    assert (model.name, model.version, job.name) == (None, None, None)


def test_metadata_says_which_data_spec_and_code_made_the_model(client: TrainserveClient, dataset_id: str) -> None:
    import torch

    spec = quick(dataset_id, name="lineage", seed=7)
    job = client.wait(client.train(spec).id)
    model = client.get_model(job.model_id or "")
    dataset = client.get_dataset(dataset_id)
    assert (model.job_id, model.dataset_id, model.dataset_sha256) == (job.id, dataset.id, dataset.sha256)
    assert model.spec["name"] == "lineage"
    assert model.spec["seed"] == 7
    assert model.spec["dataset_id"] == dataset_id
    assert model.spec["model"] == job.spec["model"]
    assert model.code_version == f"trainserve {trainserve.__version__}"
    assert model.torch_version == torch.__version__


@pytest.mark.parametrize(
    "name",
    ["", "-starts-with-dash", "../etc/passwd", "has space", "slash/inside", "x" * 65, "naïve", 7],
)
def test_bad_names_are_refused_and_leave_nothing(client: TrainserveClient, dataset_id: str, name: object) -> None:
    before = len(client.list_jobs(limit=1000))
    response = client.http.post("/train", json=quick(dataset_id, name=name))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["errors"][0]["loc"] == ["body", "name"]
    assert "name" in body["detail"]
    assert len(client.list_jobs(limit=1000)) == before


def test_name_filters_are_validated(client: TrainserveClient) -> None:
    assert client.http.get("/models", params={"name": "../x"}).status_code == 422
    assert client.http.get("/jobs", params={"name": "a b"}).status_code == 422
    assert client.list_models(name="never-used") == []


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(Path(tmp_path_factory.mktemp("two-workers")), workers=2)
    deadline = time.monotonic() + 60  # the API answers before its workers have set up
    while running.log().count("Huey consumer started") < 2:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.1)
    yield running
    stop_server(running)


def test_workers_finishing_together_never_share_a_version(two_workers: Server, moons: tuple[bytes, int]) -> None:
    with TrainserveClient(two_workers.url) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        with ThreadPoolExecutor(4) as pool:
            # Each job long enough (eager, ~1 s) that an idle worker's next poll comes before
            # the other has run them all: the native loop ends a quick job in milliseconds.
            race = moons_spec(dataset.id, name="race", epochs=40, batch_size=1, loop="eager")
            submitted = list(pool.map(lambda _: ts.train(race).id, range(4)))
        finished = [ts.wait(job_id) for job_id in submitted]
        assert all(job.status == "succeeded" for job in finished), [job.error for job in finished]
        assert len({job.worker for job in finished}) == 2  # both workers took part
        versions = ts.list_models(name="race")
        assert sorted(m.version or 0 for m in versions) == [1, 2, 3, 4]
        assert {m.id for m in versions} == {job.model_id for job in finished}


def test_a_cached_prediction_by_name_or_alias_runs_no_sql(
    server: Server, client: TrainserveClient, dataset_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structural, not timed: an API process over the server's own database and store, in
    this process so that every statement its engine runs is counted."""
    job = client.wait(client.train(moons_spec(dataset_id, name="nosql", epochs=1)).id)
    assert job.status == "succeeded", job.error
    client.set_alias("nosql", "production", 1)
    for variable, value in {"TRAINSERVE_DATA_DIR": str(server.data_dir), **server.env}.items():
        monkeypatch.setenv(variable, value)
    # The log off: its thread writes SQL of its own, off the request's path.
    monkeypatch.setenv("TRAINSERVE_PREDICTION_LOG_SAMPLE", "0")
    monkeypatch.setenv("TRAINSERVE_MODEL_CACHE_REVALIDATE_S", "3600")
    app = create_app(Settings())
    statements: list[str] = []
    event.listen(app.state.runtime.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    selectors = [{"name": "nosql"}, {"name": "nosql", "alias": "production"}, {"name": "nosql", "version": 1}]

    # No lifespan: the server ran the migrations, and the process-wide settings it makes
    # (gc.freeze, malloc thresholds) would outlive this test here.
    async def predict_all() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as http:
            for selector in selectors:  # the first of each resolves the name and loads the model
                assert (await http.post("/predict", json={**selector, "inputs": [[0.1, 0.2]]})).status_code == 200
            assert statements, "the listener saw no SQL while the cache was cold: it counts nothing"
            statements.clear()
            for selector in selectors * 3:
                answer = await http.post("/predict", json={**selector, "inputs": [[0.1, 0.2]]})
                assert answer.headers["X-Model-Version"] == "1"

    try:
        asyncio.run(predict_all())
    finally:
        app.state.runtime.engine.dispose()
    assert statements == []
