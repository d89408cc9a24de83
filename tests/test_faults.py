"""Crashes and restarts against real processes: kill -9 of a worker or of the whole server,
a damaged checkpoint, a stolen lease, the per-job time limit, files damaged at rest.
(Signals and cancellation: tests/test_stops.py; the shared tools: tests/faults.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
from safetensors.numpy import load as load_safetensors
from sqlalchemy import update

from tests.conftest import Server, moons_spec
from tests.faults import power_cut, running_at_epoch, slow_spec, wait_for, worker_pid
from trainserve.api.schemas import JobDetail
from trainserve.client import TrainserveClient
from trainserve.db import JobRecord, make_engine, make_session_factory, utcnow
from trainserve.storage.base import new_id


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
