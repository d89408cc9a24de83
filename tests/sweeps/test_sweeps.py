"""Sweeps against the real server and worker: trials as jobs, pruning, reproducibility,
events, comparison, cancel, and refused requests that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client.test_cli import cli
from tests.conftest import REPO, Server, moons_spec
from trainserve.client import TrainserveClient
from trainserve.client.endpoints import ApiError


def moons_sweep(dataset_id: str | None, **overrides: Any) -> dict[str, Any]:
    """Four trials of the guide's moons MLP: lr 0.05 or 1e-5. Seed 2 draws them in the order
    good, bad, good, bad, so the median pruner (after one complete trial) stops both bad ones."""
    base = moons_spec(dataset_id, epochs=20, validation_split=0.25)
    sweep: dict[str, Any] = {
        "name": "moons-search",
        "base": base,
        "search": {"optimizer.lr": {"choice": [0.05, 0.00001]}},
        "sampler": "random",
        "trials": 4,
        "parallel": 2,
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "pruner": {"type": "median", "startup_trials": 1, "warmup_epochs": 2},
        "seed": 2,
    }
    sweep.update(overrides)
    return sweep


def events_until_end(server: Server, sweep_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with httpx.stream("GET", f"{server.url}/sweeps/{sweep_id}/events", timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "end":
                    break
    return events


def test_a_sweep_runs_its_trials_as_jobs_prunes_the_laggards_and_runs_again_the_same(
    server: Server, client: TrainserveClient, moons: tuple[bytes, int]
) -> None:
    data, _ = moons
    dataset = client.upload_dataset(data, "moons.csv")
    response = client.http.post("/sweeps", json=moons_sweep(dataset.id))
    assert response.status_code == 202, response.text
    sweep_id = response.json()["id"]
    assert response.headers["Location"] == f"/sweeps/{sweep_id}"
    assert len(response.json()["trials"]) == 2  # `parallel` trials queued at once

    # The dataset of a running sweep stays.
    assert client.http.delete(f"/datasets/{dataset.id}").status_code == 409

    events = events_until_end(server, sweep_id)
    assert events[0][0] == "status"
    assert {e["number"] for name, e in events if name == "trial"} == {0, 1, 2, 3}
    assert events[-1][0] == "end"
    assert events[-1][1]["status"] == "succeeded"

    sweep = client.get_sweep(sweep_id)
    assert [t.number for t in sweep.trials] == [0, 1, 2, 3]
    assert [t.params["optimizer.lr"] for t in sweep.trials] == [0.05, 0.00001, 0.05, 0.00001]
    assert [t.state for t in sweep.trials] == ["complete", "pruned", "complete", "pruned"]
    for trial in sweep.trials:
        assert trial.job_id is not None
        job = client.get_job(trial.job_id)
        assert (job.sweep_id, job.trial_number) == (sweep_id, trial.number)
        assert job.spec["optimizer"]["lr"] == trial.params["optimizer.lr"]
        if trial.state == "pruned":
            # Stopped early, at the epoch the sweep shows, saying why.
            assert job.status == "pruned"
            assert trial.pruned_at is not None
            assert trial.pruned_at < 20
            assert trial.epochs_run == trial.pruned_at == job.epoch
            assert trial.reason is not None
            assert "median" in trial.reason
            assert trial.model_id is None
        else:
            assert job.status == "succeeded"
            assert trial.epochs_run == 20
            model = client.get_model(trial.model_id or "")
            assert trial.value == model.metrics["val_loss"]
    assert sweep.best is not None
    assert sweep.best.value == min(t.value for t in sweep.trials if t.state == "complete" and t.value is not None)
    assert sweep.counts == {"complete": 2, "pruned": 2}
    assert sweep_id in [s.id for s in client.list_sweeps()]

    # Same seed, same data, on CPU: the same trials with the same results.
    again = client.wait_sweep(client.create_sweep(moons_sweep(dataset.id)).id, timeout=120)
    assert [(t.params, t.state, t.value, t.pruned_at) for t in again.trials] == [
        (t.params, t.state, t.value, t.pruned_at) for t in sweep.trials
    ]

    # Compare: only the field that differs, the metrics side by side, the curves.
    compared = client.compare_sweep(sweep_id)
    assert [m.id for m in compared.models] == [t.model_id for t in sweep.trials if t.model_id]
    assert compared.differences == {}  # both complete trials trained lr 0.05: nothing differs
    models = [t.model_id for t in sweep.trials + again.trials if t.model_id]
    other = client.train(moons_spec(dataset.id, epochs=3, batch_size=32))
    other_model = client.wait(other.id).model_id
    assert other_model is not None
    compared = client.compare_models([models[0], other_model])
    assert compared.differences == {"batch_size": [16, 32], "epochs": [20, 3], "validation_split": [0.25, 0.0]} | {
        "optimizer.lr": [0.05, 0.01]
    }
    assert set(compared.metrics) >= {"train_loss", "train_accuracy"}
    assert compared.metrics["val_loss"][1] is None
    assert [len(m.history) for m in compared.models] == [20, 3]
    with pytest.raises(ApiError) as unknown:
        client.compare_models([models[0], "0" * 32])
    assert unknown.value.status_code == 404


def test_cancel_a_sweep_and_refused_sweeps_leave_nothing_behind(
    client: TrainserveClient, moons: tuple[bytes, int]
) -> None:
    data, _ = moons
    dataset = client.upload_dataset(data, "moons.csv")
    sweeps_before, jobs_before = len(client.list_sweeps()), len(client.list_jobs(limit=1000))
    refused: list[tuple[dict[str, Any], list[str]]] = [
        ({"search": {"optimizer.nope": {"uniform": [0.1, 1]}}}, ["body", "search", "optimizer.nope"]),
        ({"search": {"optimizer.lr": {"log_uniform": [0, 1]}}}, ["body", "search", "optimizer.lr", "log_uniform"]),
        ({"search": {"optimizer.lr": {"choice": []}}}, ["body", "search", "optimizer.lr", "choice"]),
        ({"search": {"optimizer.lr": {"normal": [0, 1]}}}, ["body", "search", "optimizer.lr"]),
        ({"search": {"dataset_id": {"choice": ["a", "b"]}}}, ["body", "search", "dataset_id"]),
        ({"trials": 100_000}, ["body", "trials"]),
        ({"parallel": 1_000}, ["body", "parallel"]),
        ({"objective": {"metric": "val_r2"}}, ["body", "objective", "metric"]),
        ({"sampler": "grid", "trials": 3}, ["body", "trials"]),  # the grid has 2 points
        ({"sampler": "grid", "search": {"optimizer.lr": {"uniform": [0.1, 1]}}}, ["body", "sampler"]),
        # The last layer's width must match the 2 classes: 3 is one of the choices.
        ({"search": {"model.4.out_features": {"choice": [2, 3]}}}, ["body", "search", "model.4.out_features"]),
        ({"search": {"epochs": {"uniform": [1, 5]}}}, ["body", "search", "epochs"]),
        ({"base": {"model": []}}, ["body", "base", "model"]),
    ]
    for change, loc in refused:
        response = client.http.post("/sweeps", json=moons_sweep(dataset.id, **change))
        assert response.status_code == 422, (change, response.text)
        body = response.json()
        assert body["errors"][0]["loc"][: len(loc)] == loc, (change, body)
        assert body["detail"]
    objective = client.http.post(
        "/sweeps", json=moons_sweep(dataset.id, objective={"metric": "val_loss"}) | {"base": moons_spec(dataset.id)}
    )
    assert objective.status_code == 422
    assert "validation_split" in objective.json()["detail"]
    assert len(client.list_sweeps()) == sweeps_before
    assert len(client.list_jobs(limit=1000)) == jobs_before

    # A sweep sent with its file (multipart), then cancelled: no trial is left queued or running.
    request = moons_sweep(None, trials=50, parallel=1, pruner="none")
    request["base"]["epochs"] = 2000
    sweep = client.create_sweep(request, file=data, filename="moons.csv")
    assert sweep.status == "running"
    assert len(sweep.trials) == 1
    cancelled = client.cancel_sweep(sweep.id)
    assert cancelled.status == "cancelled"
    done = client.wait_sweep(sweep.id, timeout=60)
    assert len(done.trials) == 1
    assert done.trials[0].state == "cancelled"
    with pytest.raises(ApiError) as again:
        client.cancel_sweep(sweep.id)
    assert again.value.status_code == 409
    assert client.http.get("/sweeps/" + "0" * 32).status_code == 404


def test_the_cli_runs_a_sweep_with_a_progress_bar_and_prints_the_leaderboard(server: Server, tmp_path: Path) -> None:
    spec = moons_spec(epochs=3, validation_split=0.25, target="y")  # examples/moons.csv names its label y
    (tmp_path / "base.json").write_text(json.dumps(spec))
    (tmp_path / "search.json").write_text(json.dumps({"optimizer.lr": {"choice": [0.01, 0.05]}}))
    moons_csv = REPO / "examples" / "moons.csv"
    args: list[str | Path] = ["--spec", tmp_path / "base.json", "--search", tmp_path / "search.json", "--trials", "2"]
    result = cli("sweep", moons_csv, *args, "--sampler", "grid", "--name", "cli-sweep", "--follow", url=server.url)
    assert result.returncode == 0, result.stderr
    assert "2/2" in result.stderr  # the progress bar reached the last trial
    lines = result.stdout.splitlines()
    assert "succeeded: val_loss (minimize)" in lines[0]
    assert lines[1].split()[:4] == ["RANK", "TRIAL", "STATE", "VAL_LOSS"]
    assert sorted(line.split()[2] for line in lines[2:]) == ["complete", "complete"]
    assert {"optimizer.lr=0.01", "optimizer.lr=0.05"} <= set(" ".join(lines[2:]).split())
    listed = cli("sweeps", url=server.url)
    assert listed.returncode == 0, listed.stderr
    assert any("cli-sweep" in line and "2/2" in line for line in listed.stdout.splitlines())
