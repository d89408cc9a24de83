"""One API node and stand-alone workers sharing a queue (Redis, or Postgres) and a Postgres
database, all real processes and real servers on loopback, as on separate machines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backends import (
    REDIS_URL,
    postgres_database,
    queue_url_for,
    redis_queue_name,
    start_worker,
    stop_process,
    unique_name,
    wait_for_log,
)
from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.api.schemas import JobDetail
from trainserve.client import TrainserveClient
from trainserve.config import Settings
from trainserve.jobs.queue import build_queue

JOBS = 20


@dataclass
class Cluster:
    api: Server
    env: dict[str, str]
    store_dir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def add_worker(self, folder: Path, *args: str) -> subprocess.Popen[bytes]:
        worker = start_worker(folder, self.env, args=args)
        self.workers.append(worker)
        self.logs.append(folder / "worker.log")
        wait_for_log(folder / "worker.log", "Huey consumer started", worker)
        return worker


@pytest.fixture(params=["redis", "postgres"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """An API-only node (``serve --workers 0``) on a fresh Postgres database, with the queue
    on Redis or on that Postgres; workers are added by the test. The store is a folder all
    nodes share (a network mount, on separate machines)."""
    with ExitStack() as resources:
        database_url = resources.enter_context(postgres_database())
        if request.param == "redis":
            queue_url, queue_name = REDIS_URL, resources.enter_context(redis_queue_name())
        else:
            queue_url, queue_name = queue_url_for(database_url), unique_name("trainserve_test")
        store_dir = tmp_path / "shared-store"
        env = {
            "TRAINSERVE_DATABASE_URL": database_url,
            "TRAINSERVE_QUEUE_URL": queue_url,
            "TRAINSERVE_QUEUE_NAME": queue_name,
            "TRAINSERVE_STORE_DIR": str(store_dir),
            # Short leases, frequent checkpoints: a killed worker's job moves on in seconds.
            "TRAINSERVE_LEASE_SECONDS": "2",
            "TRAINSERVE_RESCUE_INTERVAL_SECONDS": "0.3",
            "TRAINSERVE_CHECKPOINT_SECONDS": "0.3",
        }
        api = start_server(tmp_path / "api", workers=0, env=env)
        resources.callback(stop_server, api)
        running = Cluster(api, env, store_dir)
        yield running
        for worker in running.workers:
            stop_process(worker)


def test_two_workers_run_twenty_jobs_each_exactly_once(
    cluster: Cluster, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    first = cluster.add_worker(tmp_path / "gpu-box-1")
    second = cluster.add_worker(tmp_path / "gpu-box-2")
    with TrainserveClient(cluster.api.url, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job_ids = [ts.train(moons_spec(dataset.id, epochs=3, seed=i)).id for i in range(JOBS)]
        # Each job is on the queue a second time, as after a re-enqueue by recovery: both
        # workers see it, and the claim in the database lets exactly one of them run it.
        fields: dict[str, Any] = {k.removeprefix("TRAINSERVE_").lower(): v for k, v in cluster.env.items()}
        duplicates = build_queue(Settings(**fields))
        try:
            for job_id in job_ids:
                duplicates.enqueue(job_id)
        finally:
            duplicates.close()
        jobs = [ts.wait(job_id, timeout=300) for job_id in job_ids]
        models = ts.list_models()

    assert [job.status for job in jobs] == ["succeeded"] * JOBS, [job.error for job in jobs]
    assert [job.attempts for job in jobs] == [1] * JOBS
    assert len({job.model_id for job in jobs}) == JOBS
    assert Counter(model.job_id for model in models) == Counter(job_ids)  # one model per job, no more
    assert sorted(model.id for model in models) == sorted(job.model_id or "" for job in jobs)
    stored = sorted(path.stem for path in (cluster.store_dir / "weights").glob("*.safetensors"))
    assert stored == sorted(model.id for model in models)  # no weights of a second run left behind
    by_worker = Counter(job.worker.rsplit(":", 1)[1] for job in jobs if job.worker)
    assert set(by_worker) == {str(first.pid), str(second.pid)}, by_worker  # both took jobs
    # The duplicate entries are seen and skipped, not run. The workers may still be taking
    # the last of them off the queue after every job has ended: wait for them.
    deadline = time.monotonic() + 60
    while (skipped := sum(log.read_text().count("is not queued any more") for log in cluster.logs)) < JOBS:
        assert time.monotonic() < deadline, f"only {skipped} of {JOBS} duplicate entries were skipped"
        time.sleep(0.2)
    assert skipped == JOBS


def test_a_worker_killed_mid_job_has_its_job_finished_by_the_other(
    cluster: Cluster, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    pids = {cluster.add_worker(tmp_path / "gpu-box-1").pid, cluster.add_worker(tmp_path / "gpu-box-2").pid}
    with TrainserveClient(cluster.api.url, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        # A few seconds of per-sample SGD in the eager loop (the native loop would end the
        # job before the kill): long enough to be killed mid-way.
        job = ts.train(moons_spec(dataset.id, epochs=40, batch_size=1, optimizer="SGD", seed=3, loop="eager"))
        deadline = time.monotonic() + 120
        while not ((running := ts.get_job(job.id)).status == "running" and (running.checkpoint_epoch or 0) >= 2):
            assert running.status in ("queued", "running"), running.error
            assert time.monotonic() < deadline, "the job never got to a checkpoint"
            time.sleep(0.05)
        victim = worker_pid(running)
        os.kill(victim, signal.SIGKILL)  # no drain, no hand-back: the machine is gone
        final = ts.wait(job.id, timeout=180)
        models = [model for model in ts.list_models() if model.job_id == job.id]

    assert final.status == "succeeded", final.error
    assert final.attempts == 2
    assert worker_pid(final) == (pids - {victim}).pop()  # the other worker finished it
    assert any(note.startswith("resumed from epoch") for note in final.notes), final.notes
    assert [model.id for model in models] == [final.model_id]
    assert list((cluster.store_dir / "checkpoints").glob("*")) == []


def worker_pid(job: JobDetail) -> int:
    assert job.worker is not None
    return int(job.worker.rsplit(":", 1)[1])


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
def test_worker_device_flag_decides_where_auto_specs_train(
    cluster: Cluster, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    # No GPU here: "--device cpu" must win over "auto", and an unknown device is refused by the CLI.
    refused = subprocess.run(
        [sys.executable, "-m", "trainserve", "worker", "--device", "tpu:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "not a device" in refused.stderr
    # On a CPU machine "auto" is the CPU anyway, so "--device cpu" alone would pass with the
    # flag ignored. A device this machine lacks shows the flag is applied: the auto spec is
    # sent there, and the job fails naming it (no machine that runs this test has 64 GPUs).
    impossible = cluster.add_worker(tmp_path / "wrong-box", "--device", "cuda:63")
    with TrainserveClient(cluster.api.url, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        failed = ts.wait(ts.train(moons_spec(dataset.id, epochs=1)).id, timeout=120)
        assert failed.status == "failed"
        assert "device 'cuda:63' was asked for" in (failed.error or "")
        impossible.terminate()
        assert impossible.wait(60) == 0
        cluster.add_worker(tmp_path / "cpu-box", "--device", "cpu")
        job = ts.wait(ts.train(moons_spec(dataset.id, epochs=1)).id, timeout=120)
    assert job.status == "succeeded", job.error
    assert job.device == "cpu"
    assert job.spec["device"] == "auto"  # the job keeps the spec as it was sent
    assert failed.spec["device"] == "auto"


@pytest.mark.parametrize("cluster", ["postgres"], indirect=True)
def test_api_only_node_queues_and_a_later_worker_runs(
    cluster: Cluster, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    with TrainserveClient(cluster.api.url, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(moons_spec(dataset.id, epochs=1))
        time.sleep(1.0)
        assert ts.get_job(job.id).status == "queued"  # serve --workers 0 trains nothing itself
        cluster.add_worker(tmp_path / "late-box")
        assert ts.wait(job.id, timeout=120).status == "succeeded"
