"""Fixtures that run the real thing: a ``trainserve serve`` process (API + worker) over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.backends import postgres_database, queue_url_for, unique_name
from trainserve.client import TrainserveClient
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv

REPO = Path(__file__).resolve().parent.parent
# tests/faults.py: the crash and stop tests' fixture and tools
pytest_plugins = ["tests.faults"]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``'s pool: most tests wait on real servers, workers and jobs rather than
    compute, so even a 2-core machine gains from two pytest processes, and past four the
    servers each one starts (an API and a worker apiece, each importing torch) cost more
    memory and start-up than they save."""
    return max(2, min(os.cpu_count() or 1, 4))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # the TRAINSERVE_* overrides it runs with

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models_store"

    def files(self, folder: str) -> list[Path]:
        return sorted((self.store_dir / folder).glob("*"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(data_dir: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "TRAINSERVE_DATA_DIR": str(data_dir),
        "TRAINSERVE_PROGRESS_INTERVAL_S": "0.2",
        "TRAINSERVE_TRAIN_THREADS": "1",  # small models; and CI machines are shared
        **(env or {}),
    }
    command = [sys.executable, "-m", "trainserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=data_dir,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", data_dir, process, log_path, dict(env or {}))
    wait_until_ready(server)
    return server


def wait_until_ready(server: Server, timeout: float = 90) -> None:
    """Poll ``/readyz`` until the database, queue and store answer; stop the server and
    raise, with its log, if it exits or does not get there in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


# The end-to-end tests run twice: on the embedded default (SQLite database and queue) and
# on the scale-out backends (a fresh PostgreSQL database, which also holds the Huey queue).
# `-k sqlite` or `-k postgres` picks one while iterating.
@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with ExitStack() as resources:
        env: dict[str, str] = {}
        if request.param == "postgres":
            database_url = resources.enter_context(postgres_database())
            env = {
                "TRAINSERVE_DATABASE_URL": database_url,
                "TRAINSERVE_QUEUE_URL": queue_url_for(database_url),
                "TRAINSERVE_QUEUE_NAME": unique_name("trainserve_test"),
            }
        running = start_server(tmp_path_factory.mktemp(f"server-{request.param}"), env=env)
        yield running
        stop_server(running)


@pytest.fixture
def client(server: Server) -> Iterator[TrainserveClient]:
    with TrainserveClient(server.url, timeout=60) as ts:
        yield ts


@pytest.fixture(scope="session")
def moons() -> tuple[bytes, int]:
    """The guide's make_moons table as CSV bytes (x0, x1, label) and its row count."""
    x, y = make_moons(200, noise=0.05, seed=0)
    return to_csv(x, y).encode(), 200


def moons_spec(dataset_id: str | None = None, **overrides: object) -> dict[str, object]:
    """The guide's 2x30 Tanh make_moons classifier."""
    spec: dict[str, object] = {
        "target": "label",
        "model": MOONS_MLP_LAYERS,
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "Adam", "lr": 0.01},
        "epochs": 30,
        "batch_size": 16,
    }
    if dataset_id is not None:
        spec["dataset_id"] = dataset_id
    spec.update(overrides)
    return spec


def assert_spec_refused(
    client: TrainserveClient, dataset_id: str, change: dict[str, object], loc: list[object]
) -> None:
    """``POST /train`` with the moons spec changed by ``change`` is a 422 whose first error
    is at ``loc``, and creates no job."""
    before = len(client.list_jobs())
    response = client.http.post("/train", json={**moons_spec(dataset_id), **change})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["errors"][0]["loc"][: len(loc)] == loc
    assert body["detail"]
    assert len(client.list_jobs()) == before
