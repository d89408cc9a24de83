"""GET /jobs/{id}/events (Server-Sent Events) against a real server and worker, and its client."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from tests.conftest import Server, moons_spec
from trainserve.api.schemas import JobEvent
from trainserve.client import ApiError, AsyncTrainserveClient, TrainserveClient
from trainserve.jobs.events import JobEventTracker, Snapshot, parse_last_event_id


@pytest.fixture(scope="module")
def dataset_id(server: Server, moons: tuple[bytes, int]) -> str:
    with TrainserveClient(server.url) as ts:
        return ts.upload_dataset(moons[0], "moons.csv").id


def check_whole_run(events: list[JobEvent], epochs: int) -> None:
    names = [e.event for e in events]
    assert names[0] == "status"
    assert names[-2:] == ["status", "end"]
    epoch_events = [e for e in events if e.event == "epoch"]
    assert [e.data["epoch"] for e in epoch_events] == list(range(1, epochs + 1))  # every epoch, in order
    for event in epoch_events:
        assert event.id == event.data["epoch"]
        assert event.data["epochs"] == epochs
        assert math.isfinite(event.data["train_loss"])
        assert math.isfinite(event.data["val_loss"])
    assert "accuracy" in epoch_events[-1].data["val_metrics"]
    statuses = [e.data["status"] for e in events if e.event == "status"]
    assert statuses[-1] == "succeeded"
    assert set(statuses) <= {"queued", "running", "succeeded"}
    ids = [e.id for e in events]
    assert ids == sorted(ids)  # ids never go back: each is the last epoch sent
    end = events[-1]
    assert end.data["status"] == "succeeded"
    assert end.data["epoch"] == epochs


def test_a_run_streams_status_every_epoch_and_end(client: TrainserveClient, dataset_id: str) -> None:
    job = client.train(moons_spec(dataset_id, epochs=12, batch_size=16, validation_split=0.2))
    events = list(client.events(job.id))
    check_whole_run(events, 12)
    final = client.get_job(job.id)
    assert events[-1].data["model_id"] == final.model_id
    assert events[-2].data["model_id"] == final.model_id
    # the losses streamed are the ones the job recorded
    assert [[e.data["epoch"], e.data["train_loss"], e.data["val_loss"]] for e in events if e.event == "epoch"] == [
        pytest.approx(row) for row in final.history
    ]


def test_the_wire_format_is_server_sent_events(server: Server, client: TrainserveClient, dataset_id: str) -> None:
    job = client.wait(client.train(moons_spec(dataset_id, epochs=3)).id)
    with httpx.stream("GET", f"{server.url}/jobs/{job.id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        body = response.read().decode()
    assert body.startswith("retry: 1000\n\n")
    blocks = [block.split("\n") for block in body.strip().split("\n\n")[1:]]
    assert [block[0] for block in blocks] == ["event: epoch"] * 3 + ["event: status", "event: end"]
    assert all(block[1].startswith("id: ") and block[2].startswith("data: {") for block in blocks)


def test_last_event_id_resumes_after_that_epoch(client: TrainserveClient, dataset_id: str) -> None:
    job = client.wait(client.train(moons_spec(dataset_id, epochs=12, validation_split=0.2)).id)
    events = list(client.events(job.id, last_event_id=9))
    assert [e.data["epoch"] for e in events if e.event == "epoch"] == [10, 11, 12]
    assert [e.event for e in events][-2:] == ["status", "end"]
    # a header that is not an epoch number streams from the start
    raw = client.http.get(f"/jobs/{job.id}/events", headers={"Last-Event-ID": "garbage"})
    assert raw.text.count("event: epoch") == 12


def test_a_cancelled_run_ends_its_stream(client: TrainserveClient, dataset_id: str) -> None:
    job = client.train(moons_spec(dataset_id, epochs=100_000, batch_size=2))
    seen: list[JobEvent] = []
    cancelled = False
    for event in client.events(job.id):
        seen.append(event)
        # Progress events are coalesced on a busy machine: epoch 2 itself may never be sent.
        if event.event == "epoch" and event.data["epoch"] >= 2 and not cancelled:
            client.cancel_job(job.id)
            cancelled = True
    assert seen[-1].event == "end"
    assert seen[-1].data["status"] == "cancelled"
    assert seen[-1].data["model_id"] is None
    assert seen[-1].data["error"]
    assert any(e.event == "status" and e.data["status"] == "running" for e in seen)


def test_unknown_job_is_a_json_404(client: TrainserveClient) -> None:
    response = client.http.get("/jobs/nope/events")
    assert response.status_code == 404
    assert response.json()["type"] == "not_found"
    with pytest.raises(ApiError) as raised:
        list(client.events("nope"))
    assert raised.value.status_code == 404


def test_async_client_iterates_events(server: Server, dataset_id: str) -> None:
    async def run() -> list[JobEvent]:
        async with AsyncTrainserveClient(server.url) as ts:
            job = await ts.train(moons_spec(dataset_id, epochs=15, validation_split=0.2))
            return [event async for event in ts.events(job.id)]

    check_whole_run(asyncio.run(run()), 15)


# -- the tracker, on snapshots (no server) ------------------------------------------------------


def snap(status: str, history: list[list[float]], epochs: int = 100) -> Snapshot:
    epoch = int(history[-1][0]) if history else 0
    return Snapshot(status, epoch, epochs, "m" if status == "succeeded" else None, None, None, history)


def test_tracker_sends_each_epoch_once_and_sampled_histories_in_order() -> None:
    tracker = JobEventTracker()
    assert [e.name for e in tracker.events(snap("queued", []))] == ["status"]
    assert tracker.events(snap("queued", [])) == []  # nothing new, nothing sent
    first = tracker.events(snap("running", [[1, 0.9, None], [2, 0.8, None]]))
    assert [(e.name, e.id) for e in first] == [("status", 0), ("epoch", 1), ("epoch", 2)]
    # a long run's thinned history: only the points after the last one sent
    later = tracker.events(snap("running", [[1, 0.9, None], [50, 0.5, None], [99, 0.4, None]]))
    assert [e.data["epoch"] for e in later] == [50, 99]
    done = tracker.events(snap("succeeded", [[1, 0.9, None], [50, 0.5, None], [99, 0.4, None], [100, 0.3, None]]))
    assert [(e.name, e.id) for e in done] == [("epoch", 100), ("status", 100), ("end", 100)]
    assert done[-1].data["model_id"] == "m"


@pytest.mark.parametrize(("header", "epoch"), [(None, 0), ("7", 7), (" 12 ", 12), ("-3", 0), ("x", 0), ("9" * 40, 0)])
def test_last_event_id_parsing(header: str | None, epoch: int) -> None:
    assert parse_last_event_id(header) == epoch
