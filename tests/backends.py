"""The scale-out services the tests use for real: PostgreSQL and Redis on loopback, an
S3-compatible server process (moto) and stand-alone ``trainserve worker`` processes.

Every test gets its own Postgres database, Redis queue name and bucket, so that parallel
runs (and other projects on the same servers) never see each other's jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
import psycopg
import redis

# The servers `.ci/run` starts when they are down (trust auth for user postgres on loopback).
POSTGRES_ADMIN_DSN = os.environ.get("TRAINSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TRAINSERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database for one test (or one server); dropped afterwards.
    Yields its SQLAlchemy URL (``postgresql+psycopg://...``)."""
    name = unique_name("trainserve_test")
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def queue_url_for(database_url: str) -> str:
    """The same Postgres database as a Huey queue URL (libpq's scheme, no driver)."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def redis_queue_name() -> Iterator[str]:
    """A queue name of its own on the shared Redis; its keys are deleted afterwards."""
    name = unique_name("trainserve_test")
    try:
        yield name
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"huey.*.{name}*"))
        if keys:
            client.delete(*keys)
        client.close()


def start_worker(data_dir: Path, env: dict[str, str], *, args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """A stand-alone ``trainserve worker`` process, as on a GPU machine of its own: it shares
    nothing with the API but what ``env`` names (database, queue, store)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "TRAINSERVE_DATA_DIR": str(data_dir), "TRAINSERVE_PROGRESS_INTERVAL_S": "0.2", **env}
    with open(data_dir / "worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "trainserve", "worker", *args],
            cwd=data_dir,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{path.read_text(errors='replace')}")
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{text!r} did not appear in {path}:\n{path.read_text(errors='replace')}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class S3Server:
    """moto's S3-compatible server on loopback: the one boundary emulated (no real S3 here)."""

    endpoint_url: str
    process: subprocess.Popen[bytes]

    # moto accepts any credentials; these are what every client of this server uses.
    env: ClassVar[dict[str, str]] = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextmanager
def s3_server(port: int, log_path: Path) -> Iterator[S3Server]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(server.endpoint_url, timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log_path.read_text(errors='replace')}") from None
                time.sleep(0.2)
        yield server
    finally:
        stop_process(process)
