"""A job whose queue entry is gone while its row still says ``queued`` (a worker died between
taking the entry and claiming the job, or the queue lost data): the rescuer of any process
enqueues it again, once. The entry is deleted from the real queue storage behind Huey's
back: the SQLite queue file, Redis, Postgres."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from tests.backends import (
    REDIS_URL,
    postgres_database,
    queue_url_for,
    redis_queue_name,
    start_worker,
    stop_process,
    unique_name,
)
from tests.conftest import moons_spec, start_server, stop_server
from trainserve.client import TrainserveClient
from trainserve.config import Settings
from trainserve.jobs.queue import build_queue

GRACE_SECONDS = 1.0
RESCUE_INTERVAL_SECONDS = 0.3


@dataclass
class Queue:
    kind: str  # "sqlite", "redis" or "postgres"
    url: str
    name: str

    def waiting(self) -> Counter[str]:
        """The job ids of the entries on the queue, as Huey reads them."""
        reader = build_queue(Settings(queue_url=self.url, queue_name=self.name))
        try:
            return Counter(task.args[0] for task in reader.huey.pending())
        finally:
            reader.close()

    def lose(self, job_id: str) -> None:
        """Delete the job's entries from the storage itself, as a crash or data loss would."""
        needle = job_id.encode()  # an entry is a pickled message: the id is in it as is
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as db, db:
                rows = db.execute("SELECT id, data FROM task WHERE queue = ?", (self.name,)).fetchall()
                db.executemany("DELETE FROM task WHERE id = ?", [(i,) for i, data in rows if needle in data])
        elif self.kind == "redis":
            client = redis.Redis.from_url(REDIS_URL)
            key = f"huey.redis.{self.name}"
            for entry in client.lrange(key, 0, -1):
                if needle in entry:
                    client.lrem(key, 0, entry)
            client.close()
        else:
            with psycopg.connect(self.url, autocommit=True) as db:
                db.execute(
                    "DELETE FROM huey_task WHERE queue = %s AND position(%s::bytea IN data) > 0", (self.name, needle)
                )


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict[str, str], Queue]]:
    """The settings an API node and a stand-alone worker share, and their queue."""
    with ExitStack() as resources:
        shared = tmp_path / "shared"
        shared.mkdir()
        if request.param == "sqlite":
            database_url = f"sqlite:///{shared / 'trainserve.db'}"
            queue = Queue("sqlite", f"sqlite:///{shared / 'trainserve-queue.db'}", unique_name("trainserve_test"))
        else:
            database_url = resources.enter_context(postgres_database())
            if request.param == "redis":
                queue = Queue("redis", REDIS_URL, resources.enter_context(redis_queue_name()))
            else:
                queue = Queue("postgres", queue_url_for(database_url), unique_name("trainserve_test"))
        env = {
            "TRAINSERVE_DATABASE_URL": database_url,
            "TRAINSERVE_QUEUE_URL": queue.url,
            "TRAINSERVE_QUEUE_NAME": queue.name,
            "TRAINSERVE_STORE_DIR": str(shared / "models_store"),
            "TRAINSERVE_RESCUE_INTERVAL_SECONDS": str(RESCUE_INTERVAL_SECONDS),
            "TRAINSERVE_LOST_ENTRY_GRACE_SECONDS": str(GRACE_SECONDS),
        }
        yield env, queue


def wait_until_waiting(queue: Queue, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while job_id not in queue.waiting():
        assert time.monotonic() < deadline, f"job {job_id} was not enqueued again"
        time.sleep(0.1)


def test_a_queued_job_whose_entry_was_lost_is_enqueued_again_once_and_runs_and_others_are_left_alone(
    backends: tuple[dict[str, str], Queue], tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    env, queue = backends
    api = start_server(tmp_path / "api", workers=0, env=env)  # no worker yet: nothing takes an entry
    try:
        with TrainserveClient(api.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            lost = ts.train(moons_spec(dataset.id, epochs=3, seed=1))
            kept = ts.train(moons_spec(dataset.id, epochs=3, seed=2))
            assert queue.waiting() == Counter({lost.id: 1, kept.id: 1})

            queue.lose(lost.id)
            assert queue.waiting() == Counter({kept.id: 1})
            wait_until_waiting(queue, lost.id)  # by the API node's rescuer
            requeued = ts.get_job(lost.id)
            assert requeued.status == "queued"
            assert requeued.attempts == 0
            assert requeued.notes == [f"no entry on the queue after {GRACE_SECONDS:g} s queued; re-queued"]

            # Many more rescue rounds, each past the grace period: every job keeps one entry.
            time.sleep(3 * GRACE_SECONDS + 2 * RESCUE_INTERVAL_SECONDS)
            assert queue.waiting() == Counter({lost.id: 1, kept.id: 1})
            assert ts.get_job(lost.id).notes == requeued.notes
            assert ts.get_job(kept.id).notes == []
            assert api.log().count("had no entry on the queue") == 1

            worker = start_worker(tmp_path / "worker", env)
            try:
                finals = [ts.wait(job_id, timeout=120) for job_id in (lost.id, kept.id)]
            finally:
                stop_process(worker)
            assert [job.status for job in finals] == ["succeeded", "succeeded"], [job.error for job in finals]
            assert [job.attempts for job in finals] == [1, 1]
            assert Counter(model.job_id for model in ts.list_models()) == Counter({lost.id: 1, kept.id: 1})
            assert queue.waiting() == Counter()
    finally:
        stop_server(api)


def test_a_restart_enqueues_the_queued_jobs_without_an_entry_and_only_those(
    backends: tuple[dict[str, str], Queue], tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    env, queue = backends
    env = {**env, "TRAINSERVE_LOST_ENTRY_GRACE_SECONDS": "3600"}  # only the start-up pass may act here
    api = start_server(tmp_path / "api", workers=0, env=env)
    try:
        with TrainserveClient(api.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            lost, kept = (ts.train(moons_spec(dataset.id, epochs=3, seed=seed)).id for seed in (1, 2))
        queue.lose(lost)
    finally:
        stop_server(api)
    assert queue.waiting() == Counter({kept: 1})

    again = start_server(tmp_path / "api-again", workers=0, env=env)
    try:
        # The lost entry is back at once; the one still waiting gets no duplicate.
        assert queue.waiting() == Counter({lost: 1, kept: 1})
    finally:
        stop_server(again)
