"""Workers say which devices they have (the workers table), and a job for a device no live
worker has is refused at submit instead of failing on a worker (issue 12, point 4)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import Server, moons_spec
from trainserve.client import TrainserveClient
from trainserve.db import WorkerRecord, make_engine, make_session_factory, upgrade_to_head, utcnow
from trainserve.errors import Conflict
from trainserve.jobs.workers import WorkerPresence, check_device, list_workers

STALE_S = 15.0


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def check(sessions: sessionmaker[Session], device: str) -> str | None:
    with sessions() as session:
        return check_device(session, device, stale_s=STALE_S)


def test_a_device_no_live_worker_has_is_refused_naming_the_devices_they_have(
    sessions: sessionmaker[Session],
) -> None:
    # No worker seen yet: the job may wait for one, with a note saying so.
    note = check(sessions, "cuda")
    assert note is not None
    assert "no live worker has been seen" in note
    assert "'cuda'" in note

    cpu = WorkerPresence(sessions, "a:1", ["cpu"])
    cpu.announce()
    assert check(sessions, "auto") is None
    assert check(sessions, "cpu") is None
    with pytest.raises(Conflict) as refused:
        check(sessions, "cuda:0")
    assert "no live worker has device 'cuda:0'; the live workers have cpu" in refused.value.detail
    assert refused.value.errors[0]["loc"] == ["body", "device"]

    gpu = WorkerPresence(sessions, "b:2", ["cpu", "cuda:0", "cuda:1"])
    gpu.announce()
    assert check(sessions, "cuda") is None
    assert check(sessions, "cuda:1") is None
    with pytest.raises(Conflict) as refused:
        check(sessions, "cuda:2")
    assert "the live workers have cpu, cuda:0, cuda:1" in refused.value.detail

    # A worker whose heartbeat is old is not live; a beat makes it live again.
    with sessions.begin() as session:
        session.execute(update(WorkerRecord).values(heartbeat_at=utcnow() - timedelta(seconds=STALE_S + 1)))
    note = check(sessions, "cuda:0")
    assert note is not None
    assert "waits" in note
    gpu.beat()
    assert check(sessions, "cuda:0") is None

    gpu.leave()
    with sessions() as session:
        assert [worker.name for worker in list_workers(session)] == ["a:1"]
    cpu.beat()  # its row is there: renewed, not added twice
    cpu.leave()
    cpu.beat()  # its row is gone: announced again
    with sessions() as session:
        assert [(worker.name, worker.devices) for worker in list_workers(session)] == [("a:1", ["cpu"])]


def test_the_server_lists_its_workers_and_refuses_a_device_none_has(
    server: Server, client: TrainserveClient, moons: tuple[bytes, int]
) -> None:
    deadline = time.monotonic() + 60
    workers: list[dict[str, object]] = []
    while time.monotonic() < deadline and not any(w["live"] for w in workers):
        workers = httpx.get(f"{server.url}/workers").json()
        time.sleep(0.2)
    live = [w for w in workers if w["live"]]
    assert live, workers
    assert all("cpu" in w["devices"] for w in live)  # type: ignore[operator]
    have = sorted({d for w in live for d in w["devices"]})  # type: ignore[attr-defined]

    dataset = client.upload_dataset(moons[0], "moons.csv")
    jobs_before = [job.id for job in client.list_jobs(limit=1000)]
    answer = client.http.post("/train", json=moons_spec(dataset.id, epochs=1, device="cuda:99"))
    assert answer.status_code == 409, answer.text
    body = answer.json()
    assert f"no live worker has device 'cuda:99'; the live workers have {', '.join(have)}" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "device"]
    assert [job.id for job in client.list_jobs(limit=1000)] == jobs_before  # nothing left behind
