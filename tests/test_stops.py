"""Stopping against real processes: SIGTERM drains a server (requests in flight answered, the
job handed back with its checkpoint), signals stop a standalone worker, a worker outlives
its serve process, and cancelling deletes checkpoints. (Crashes: tests/test_faults.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.backends import start_worker, stop_process, wait_for_log
from tests.conftest import Server
from tests.faults import FAST_LEASE, job_row, running_at_epoch, slow_spec, wait_for, worker_pid
from trainserve.api.schemas import Job, JobDetail
from trainserve.client import TrainserveClient
from trainserve.db import JobRecord


def assert_handed_back(server: Server, job_id: str) -> JobRecord:
    """A drained job's row: queued again, no attempt spent, no worker, its checkpoint kept and noted."""
    job = job_row(server, job_id)
    assert job.status == "queued"
    assert job.attempts == 0  # a preemption costs no attempt
    assert job.worker is None
    assert any("handed back at epoch" in note for note in job.notes), job.notes
    assert job.checkpoint_epoch is not None
    assert (server.store_dir / "checkpoints" / f"{job_id}.safetensors").exists()
    return job


def test_sigterm_answers_requests_in_flight_hands_the_job_back_and_a_restart_finishes_it(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty()
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id))
        running_at_epoch(ts, job.id, attempt=1)

    started = threading.Event()
    answers: list[httpx.Response] = []

    def slow_body() -> Iterator[bytes]:  # an upload still arriving when SIGTERM comes
        boundary = b"--b\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="m.csv"\r\n\r\n'
        for number, line in enumerate(moons[0].splitlines(keepends=True)):
            # Signal only once the request has been arriving for a while: a server that has
            # not yet read its headers (a busy machine) may rightly close the connection as idle.
            if number == 60:
                started.set()
            yield line
            time.sleep(0.005)
        yield b"\r\n--b--\r\n"

    def upload() -> None:
        headers = {"content-type": "multipart/form-data; boundary=b"}
        answers.append(httpx.post(f"{server.url}/datasets", content=slow_body(), headers=headers, timeout=60))

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert started.wait(30)
    server.process.send_signal(signal.SIGTERM)
    uploader.join(60)
    assert server.process.wait(60) == 0
    assert answers[0].status_code == 201, answers[0].text

    drained = assert_handed_back(server, job.id)

    again = faulty(server.data_dir)
    with TrainserveClient(again.url, timeout=30) as ts:
        final = ts.wait(job.id, timeout=120)
        assert final.status == "succeeded", final.error
        assert final.attempts == 1
        assert f"resumed from epoch {drained.checkpoint_epoch} on attempt 1" in final.notes
        assert len(ts.list_datasets()) == 2  # the upload that was in flight was kept


def drain_with_a_checkpoint(server: Server, dataset_id: str) -> Job:
    """A job running on ``server`` when SIGTERM stops it: handed back ``queued``, its
    checkpoint kept in the store for the attempt that resumes it."""
    with TrainserveClient(server.url, timeout=30) as ts:
        job = ts.train(slow_spec(dataset_id))
        running_at_epoch(ts, job.id, attempt=1)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert job_row(server, job.id).status == "queued"
    assert (server.store_dir / "checkpoints" / f"{job.id}.safetensors").exists()
    return job


@contextlib.contextmanager
def standalone_worker(server: Server, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``trainserve worker`` on its own, beside an API-only ``server``: it shares the
    server's SQLite database and queue (its data dir), as a worker on a GPU box shares
    Postgres. Its output goes to ``worker.log`` there."""
    worker = start_worker(server.data_dir, {**FAST_LEASE, "TRAINSERVE_TRAIN_THREADS": "1", **env})
    try:
        wait_for_log(server.data_dir / "worker.log", "Huey consumer started", worker)
        yield worker
    finally:
        stop_process(worker)


@pytest.mark.parametrize(
    "stop_signal", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_standalone_worker_stopped_by_a_signal_hands_its_job_back_and_exits_0_without_waiting_for_it(
    faulty: Callable[..., Server], moons: tuple[bytes, int], stop_signal: signal.Signals
) -> None:
    server = faulty(workers=0)
    with TrainserveClient(server.url, timeout=30) as ts, standalone_worker(server) as worker:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id, epochs=100_000))  # hours: the worker must not wait for its end
        running_at_epoch(ts, job.id, attempt=1)
        worker.send_signal(stop_signal)
        assert worker.wait(30) == 0

    assert_handed_back(server, job.id)


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie not reaped yet counts: it runs no code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_worker_whose_serve_process_died_hands_its_job_back_and_exits(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty(workers=1)
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id, epochs=100_000))  # hours: the worker must not wait for its end
        pid = worker_pid(running_at_epoch(ts, job.id, attempt=1))
    server.process.kill()  # the serve process alone: its worker is left without a parent
    server.process.wait()
    deadline = time.monotonic() + 60
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid), "the orphaned worker is still running"
    handed_back = job_row(server, job.id)
    assert handed_back.status == "queued"
    assert any("handed back at epoch" in note for note in handed_back.notes), handed_back.notes
    assert (server.store_dir / "checkpoints" / f"{job.id}.safetensors").exists()


def test_the_same_signal_twice_stops_a_worker_at_once_leaving_its_job_to_the_rescuer(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    # The job looks at the drain flag only every 10 minutes here: the first SIGINT cannot
    # hand it back during this test, so the worker waits for it until asked again. A long
    # lease keeps the rescuer off the job until the test has read it.
    server = faulty(workers=0, TRAINSERVE_LEASE_SECONDS="60")
    with (
        TrainserveClient(server.url, timeout=30) as ts,
        standalone_worker(server, TRAINSERVE_PROGRESS_INTERVAL_S="600", TRAINSERVE_LEASE_SECONDS="60") as worker,
    ):
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id, epochs=100_000))

        def running() -> JobDetail | None:
            current = ts.get_job(job.id)
            return current if current.status == "running" else None

        wait_for(running, what="the job to run")
        worker.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(3)  # draining: waits for the running job
        worker.send_signal(signal.SIGINT)
        assert worker.wait(30) == 128 + signal.SIGINT  # the shell's code for "ended by SIGINT"

    left = job_row(server, job.id)
    assert left.status == "running"  # not handed back: its lease runs out, then the rescuer re-queues it
    assert left.attempts == 1
    assert not any("handed back" in note for note in left.notes), left.notes


def test_cancelling_a_queued_job_that_has_a_checkpoint_deletes_the_checkpoint(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty()
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
    job = drain_with_a_checkpoint(server, dataset.id)

    again = faulty(server.data_dir, workers=0)  # no worker: the job stays queued
    with TrainserveClient(again.url, timeout=30) as ts:
        assert ts.get_job(job.id).status == "queued"
        cancelled = ts.cancel_job(job.id)
        assert cancelled.status == "cancelled"
        assert again.files("checkpoints") == []  # deleted once the cancel committed, before the answer


def test_a_job_the_rescuer_fails_or_cancels_has_its_checkpoint_deleted(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty(TRAINSERVE_MAX_ATTEMPTS="1", TRAINSERVE_CHECKPOINT_SECONDS="0.3")

    def checkpoint_of(job_id: str) -> Path:
        return server.store_dir / "checkpoints" / f"{job_id}.safetensors"

    def checkpointed(ts: TrainserveClient, job_id: str) -> JobDetail:
        def check() -> JobDetail | None:
            current = ts.get_job(job_id)
            assert current.status in ("queued", "running"), (current.status, current.error)
            saved = current.status == "running" and current.checkpoint_epoch is not None
            return current if saved and checkpoint_of(job_id).exists() else None

        return wait_for(check, what=f"a checkpoint of job {job_id}")

    def checkpoint_deleted(job_id: str) -> None:
        # The rescuer deletes it just after the commit that ends the job, so maybe a moment
        # after the job reads as ended.
        deadline = time.monotonic() + 10
        while checkpoint_of(job_id).exists():
            assert time.monotonic() < deadline, f"the checkpoint of job {job_id} outlived the job"
            time.sleep(0.05)

    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")

        # Its worker dies, and the job has no attempt left: failed.
        failing = ts.train(slow_spec(dataset.id, epochs=100_000))
        os.kill(worker_pid(checkpointed(ts, failing.id)), signal.SIGKILL)
        failed = ts.wait(failing.id, timeout=60)
        assert failed.status == "failed"
        assert failed.error is not None
        assert "lease expired" in failed.error
        checkpoint_deleted(failing.id)

        # Its worker stalls (SIGSTOP) before it sees the cancel: cancelled by the rescuer.
        stalling = ts.train(slow_spec(dataset.id, epochs=100_000))
        stalled_pid = worker_pid(checkpointed(ts, stalling.id))
        os.kill(stalled_pid, signal.SIGSTOP)
        try:
            assert ts.cancel_job(stalling.id).status == "running"  # asked to stop; nobody hears it
            cancelled = ts.wait(stalling.id, timeout=60)
            assert cancelled.status == "cancelled"
            assert cancelled.error == "cancelled; its worker stopped before it could finish"
            checkpoint_deleted(stalling.id)
        finally:
            os.kill(stalled_pid, signal.SIGKILL)
        assert server.files("checkpoints") == []
