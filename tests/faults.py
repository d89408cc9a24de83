"""What the crash and stop tests share: servers with short leases (2 s, renewed every 0.67 s,
rescued every 0.3 s, so that a dead worker's job comes back within seconds), a job slow
enough to be caught mid-way, and the ways to wait for it and to cut the power.

A pytest plugin (``pytest_plugins`` in tests/conftest.py), so its fixture needs no import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, moons_spec, start_server
from trainserve.api.schemas import JobDetail
from trainserve.client import TrainserveClient
from trainserve.db import JobRecord, make_engine, make_session_factory

FAST_LEASE = {
    "TRAINSERVE_LEASE_SECONDS": "2",
    "TRAINSERVE_RESCUE_INTERVAL_SECONDS": "0.3",
}


def slow_spec(dataset_id: str, epochs: int = 100, **overrides: object) -> dict[str, object]:
    """A job that runs a few seconds (200 steps an epoch), long enough to be killed mid-way:
    100 epochs take about 3 s on an idle 2-core machine (30 ended in a second, sometimes
    before a test could catch the epoch it waits for).

    The eager loop keeps that duration alike on every machine; the generated native loop,
    20x faster where it applies, would end the job before the kill (its resume is tested
    in tests/training/test_native.py)."""
    return moons_spec(dataset_id, epochs=epochs, batch_size=1, optimizer="SGD", seed=3, loop="eager", **overrides)


def wait_for(check: Callable[[], JobDetail | None], *, timeout: float = 60, what: str = "") -> JobDetail:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_at_epoch(ts: TrainserveClient, job_id: str, *, attempt: int, epoch: int = 3) -> JobDetail:
    """Wait until the job's ``attempt``-th claim is running and past ``epoch``."""

    def check() -> JobDetail | None:
        job = ts.get_job(job_id)
        assert job.status in ("queued", "running"), (job.status, job.error)
        return job if job.status == "running" and job.attempts == attempt and job.epoch >= epoch else None

    return wait_for(check, what=f"attempt {attempt} of job {job_id} to pass epoch {epoch}")


def worker_pid(job: JobDetail) -> int:
    assert job.worker is not None
    return int(job.worker.rsplit(":", 1)[1])


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on a data dir; every one started is stopped at the end."""
    started: list[Server] = []

    def start(data_dir: Path | None = None, *, workers: int = 1, **env: str) -> Server:
        server = start_server(data_dir or tmp_path / "data", workers=workers, env={**FAST_LEASE, **env})
        started.append(server)
        return server

    yield start
    for server in started:  # the data is thrown away: no need for a graceful stop
        power_cut(server)


def power_cut(server: Server) -> None:
    """kill -9 the server's whole process group: API, workers, everything."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


def job_row(server: Server, job_id: str) -> JobRecord:
    sessions = make_session_factory(make_engine(f"sqlite:///{server.data_dir / 'trainserve.db'}"))
    with sessions() as session:
        row: JobRecord | None = session.get(JobRecord, job_id)
        assert row is not None
        return row
