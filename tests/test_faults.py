"""Crashes and restarts against real processes: kill -9 of a worker or of the whole server,
a stolen lease, SIGTERM drain, the per-job time limit.

Leases are short here (2 s, renewed every 0.67 s, rescued every 0.3 s) so that a dead
worker's job comes back within seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load as load_safetensors
from sqlalchemy import update

from tests.backends import start_worker, stop_process, wait_for_log
from tests.conftest import Server, moons_spec, start_server
from trainserve.api.schemas import JobDetail
from trainserve.client import TrainserveClient
from trainserve.db import JobRecord, make_engine, make_session_factory, utcnow
from trainserve.storage.base import new_id

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


def tensors_sha256(weights: bytes) -> str:
    """sha256 over a safetensors file's tensors (its metadata names the model and job)."""
    tensors = load_safetensors(weights)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].tobytes())
    return digest.hexdigest()


def test_killed_worker_job_resumes_from_its_checkpoint_and_ends_as_if_never_killed(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty(TRAINSERVE_CHECKPOINT_SECONDS="0.3")
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id))
        first = running_at_epoch(ts, job.id, attempt=1, epoch=5)
        assert first.lease_expires_at is not None
        assert first.heartbeat_at is not None

        def has_checkpoint() -> JobDetail | None:
            current = ts.get_job(job.id)
            return current if (current.checkpoint_epoch or 0) >= 3 else None

        checkpointed = wait_for(has_checkpoint, what="a checkpoint after epoch 3")
        os.kill(worker_pid(checkpointed), signal.SIGKILL)

        final = ts.wait(job.id, timeout=120)
        assert final.status == "succeeded", final.error
        assert final.attempts == 2
        assert worker_pid(final) != worker_pid(first)  # the supervisor's new worker finished it
        assert any("stopped renewing its lease" in note for note in final.notes), final.notes
        resumed = [note for note in final.notes if note.startswith("resumed from epoch")]
        assert resumed, final.notes
        assert int(resumed[0].split()[3]) >= 3  # it did not start over
        assert resumed[0].endswith("on attempt 2")
        assert final.lease_expires_at is None
        assert server.files("checkpoints") == []  # gone with the job's end

        uninterrupted = ts.wait(ts.train(slow_spec(dataset.id)).id, timeout=120)
        assert uninterrupted.attempts == 1
        assert tensors_sha256(ts.download_weights(final.model_id or "")) == tensors_sha256(
            ts.download_weights(uninterrupted.model_id or "")
        )
        assert len(server.files("weights")) == 2


def test_damaged_checkpoint_is_not_resumed_from_and_the_job_starts_over_saying_so(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty(TRAINSERVE_CHECKPOINT_SECONDS="0.3")
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id))
        checkpoint = server.store_dir / "checkpoints" / f"{job.id}.safetensors"

        def has_checkpoint() -> JobDetail | None:
            current = ts.get_job(job.id)
            return current if (current.checkpoint_epoch or 0) >= 2 and checkpoint.exists() else None

        os.kill(worker_pid(wait_for(has_checkpoint, what="a checkpoint after epoch 2")), signal.SIGKILL)
        # Its tensors end the file: a changed byte there still parses, and only the sha256 tells.
        data = bytearray(checkpoint.read_bytes())
        data[-1] ^= 0xFF
        checkpoint.write_bytes(bytes(data))

        final = ts.wait(job.id, timeout=120)
        assert final.status == "succeeded", final.error
        assert final.attempts == 2
        assert f"the checkpoint of job {job.id} does not match its recorded sha256; started over" in final.notes
        assert not [note for note in final.notes if note.startswith("resumed from epoch")], final.notes
        assert server.files("checkpoints") == []


def test_power_cut_mid_job_and_mid_upload_then_restart_finishes_the_job_and_keeps_no_partial_upload(
    faulty: Callable[..., Server], moons: tuple[bytes, int], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"  # where the server's multipart parser may spill a body
    spool.mkdir()
    server = faulty(TMPDIR=str(spool))
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id))
        running_at_epoch(ts, job.id, attempt=1)

    boundary = "trainserveboundary"
    sent = threading.Event()

    def body() -> Iterator[bytes]:  # a large upload, cut off by the crash
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n'.encode()
        yield b"x0,x1,label\n"
        row = b"0.25,0.5,1\n" * 50_000  # ~0.5 MB a chunk
        for i in range(10_000):
            yield row
            if i == 8:
                sent.set()
            time.sleep(0.01)

    def upload() -> None:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{server.url}/datasets", content=body(), headers=headers, timeout=60)

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    assert sent.wait(60)
    power_cut(server)
    uploader.join(30)

    again = faulty(server.data_dir, TMPDIR=str(spool), TRAINSERVE_ORPHAN_GRACE_SECONDS="0")
    with TrainserveClient(again.url, timeout=30) as ts:
        assert [d.id for d in ts.list_datasets()] == [dataset.id]  # no row for the cut upload
        assert again.files("datasets") == [again.store_dir / "datasets" / f"{dataset.id}.npz"]
        assert again.files("tmp") == []
        assert [p for p in spool.iterdir() if not p.name.startswith("torchinductor")] == []  # its compile cache

        final = ts.wait(job.id, timeout=120)
        assert final.status == "succeeded", final.error
        assert final.attempts == 2
        assert ts.get_dataset(dataset.id).sha256 == dataset.sha256
        assert len(ts.list_models()) == 1


def test_job_that_keeps_losing_its_worker_fails_after_max_attempts(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty(TRAINSERVE_MAX_ATTEMPTS="2")
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id, epochs=100_000))
        for attempt in (1, 2):
            os.kill(worker_pid(running_at_epoch(ts, job.id, attempt=attempt, epoch=1)), signal.SIGKILL)
        final = ts.wait(job.id, timeout=60)
        assert final.status == "failed"
        assert final.attempts == 2
        assert final.error is not None
        assert "lease expired" in final.error
        assert "TRAINSERVE_MAX_ATTEMPTS" in final.error
        assert final.model_id is None


def test_worker_whose_lease_was_taken_stops_and_writes_nothing(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty()
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(slow_spec(dataset.id, epochs=100_000))
        running_at_epoch(ts, job.id, attempt=1)

        # What a rescuer and a second worker would do while the first one is stuck: give
        # the job to another worker (a new attempt with its own lease) in the shared database.
        sessions = make_session_factory(make_engine(f"sqlite:///{server.data_dir / 'trainserve.db'}"))
        with sessions.begin() as session:
            session.execute(
                update(JobRecord)
                .where(JobRecord.id == job.id)
                .values(
                    worker="elsewhere:1",
                    attempts=JobRecord.attempts + 1,
                    lease_expires_at=utcnow() + timedelta(hours=1),
                    updated_at=utcnow(),
                )
            )
        stolen = ts.get_job(job.id)

        # The old worker notices within a renewal (lease/3) and stops training: with one
        # worker, the next job can only run once it has.
        quick = ts.wait(ts.train(moons_spec(dataset.id, epochs=1)).id, timeout=60)
        assert quick.status == "succeeded", quick.error
        time.sleep(1.0)  # more than a renewal interval: any late write would show now

        after = ts.get_job(job.id)
        assert after.model_dump() == stolen.model_dump()  # not one field written by the old worker
        assert len(server.files("weights")) == 1  # only the quick job's model
        assert "after losing the lease" in server.log()


def test_job_over_its_time_limit_fails_naming_the_limit(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty(TRAINSERVE_MAX_JOB_SECONDS="2")
    with TrainserveClient(server.url, timeout=30) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        too_long = ts.http.post("/train", json=slow_spec(dataset.id, max_seconds=3))
        assert too_long.status_code == 422
        assert too_long.json()["errors"][0]["loc"] == ["max_seconds"]
        assert "TRAINSERVE_MAX_JOB_SECONDS" in too_long.json()["detail"]

        by_server = ts.train(slow_spec(dataset.id, epochs=100_000))
        by_spec = ts.train(slow_spec(dataset.id, epochs=100_000, max_seconds=0.5))
        ended = ts.wait(by_server.id, timeout=60)
        assert ended.status == "failed"
        assert ended.error == "the job trained longer than its limit of 2 seconds (TRAINSERVE_MAX_JOB_SECONDS)"
        ended = ts.wait(by_spec.id, timeout=60)
        assert ended.status == "failed"
        assert ended.error is not None
        assert "limit of 0.5 seconds (the spec's max_seconds" in ended.error
        assert ended.model_id is None
        assert server.files("weights") == []


def test_a_crash_keeps_models_and_datasets_byte_for_byte_sweeps_old_debris_and_names_corruption(
    faulty: Callable[..., Server], moons: tuple[bytes, int]
) -> None:
    server = faulty()
    rows = [[0.0, 0.5], [1.0, -0.5], [-1.0, 1.0]]
    with TrainserveClient(server.url) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        used, spare = (ts.wait(ts.train(moons_spec(dataset.id, epochs=3, seed=s)).id).model_id or "" for s in (1, 2))
        before = ts.predict(used, rows)
        weights = {m: ts.download_weights(m) for m in (used, spare)}
        table = (server.store_dir / "datasets" / f"{dataset.id}.npz").read_bytes()
    power_cut(server)

    # What a crash on this node or another can leave behind, written two hours ago, and
    # files another node may be writing right now.
    store = server.store_dir
    two_hours_ago = time.time() - 7200
    debris = [
        store / "tmp" / f"{new_id()}.safetensors.part",  # a weights write cut short
        store / "tmp" / f"{new_id()}.upload.part",  # an upload cut short
        store / "weights" / f"{new_id()}.safetensors",  # weights whose model row never committed
        store / "datasets" / f"{new_id()}.npz",  # a table whose dataset row never committed
        store / "checkpoints" / f"{new_id()}.safetensors",  # a checkpoint of no live job
    ]
    young = [store / "tmp" / f"{new_id()}.upload.part", store / "weights" / f"{new_id()}.safetensors"]
    for path in debris + young:
        path.write_bytes(b"partial")
    owned = [store / "weights" / f"{m}.safetensors" for m in (used, spare)] + [store / "datasets" / f"{dataset.id}.npz"]
    for path in debris + owned:
        os.utime(path, (two_hours_ago, two_hours_ago))

    again = faulty(server.data_dir)  # default grace: one hour
    assert not [p for p in debris if p.exists()]
    assert all(p.exists() for p in young)
    assert all(p.exists() for p in owned)
    assert "orphan file(s)" in again.log()
    with TrainserveClient(again.url) as ts:
        assert ts.predict(used, rows) == before
        assert {m: ts.download_weights(m) for m in (used, spare)} == weights
        assert (again.store_dir / "datasets" / f"{dataset.id}.npz").read_bytes() == table
        assert ts.get_dataset(dataset.id).sha256 == dataset.sha256

        corrupt(again.store_dir / "weights" / f"{spare}.safetensors")
        response = ts.http.post("/predict", json={"model_id": spare, "inputs": rows})
        assert response.status_code == 500
        assert response.json()["type"] == "integrity_error"
        assert spare in response.json()["detail"]
        assert "sha256" in response.json()["detail"]

        corrupt(again.store_dir / "datasets" / f"{dataset.id}.npz")
        job = ts.wait(ts.train(moons_spec(dataset.id, epochs=1)).id)
        assert job.status == "failed"
        assert job.error is not None
        assert dataset.id in job.error
        assert "sha256" in job.error


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def job_row(server: Server, job_id: str) -> JobRecord:
    sessions = make_session_factory(make_engine(f"sqlite:///{server.data_dir / 'trainserve.db'}"))
    with sessions() as session:
        row = session.get(JobRecord, job_id)
        assert row is not None
        return row


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

    drained = job_row(server, job.id)
    assert drained.status == "queued"
    assert drained.attempts == 0  # a preemption costs no attempt
    assert drained.worker is None
    assert any("handed back at epoch" in note for note in drained.notes), drained.notes
    assert drained.checkpoint_epoch is not None
    assert (server.store_dir / "checkpoints" / f"{job.id}.safetensors").exists()

    again = faulty(server.data_dir)
    with TrainserveClient(again.url, timeout=30) as ts:
        final = ts.wait(job.id, timeout=120)
        assert final.status == "succeeded", final.error
        assert final.attempts == 1
        assert f"resumed from epoch {drained.checkpoint_epoch} on attempt 1" in final.notes
        assert len(ts.list_datasets()) == 2  # the upload that was in flight was kept


def drain_with_a_checkpoint(server: Server, dataset_id: str) -> JobDetail:
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

    handed_back = job_row(server, job.id)
    assert handed_back.status == "queued"
    assert handed_back.attempts == 0  # a preemption costs no attempt
    assert handed_back.worker is None
    assert any("handed back at epoch" in note for note in handed_back.notes), handed_back.notes
    assert handed_back.checkpoint_epoch is not None
    assert (server.store_dir / "checkpoints" / f"{job.id}.safetensors").exists()


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
