"""Benchmark: training jobs finished per minute by 1 and by 2 stand-alone workers.

The scale-out topology on one machine: an API-only node (``trainserve serve --workers 0``),
``trainserve worker`` processes, a fresh PostgreSQL database and a Redis queue (or the
Postgres queue, or the embedded SQLite pair, with ``--queue``/``--database``). Each round
submits the same batch of small make_moons jobs over HTTP and times the first POST /train
to the last job's ``succeeded``; the 1-worker and 2-worker rounds alternate, so that a
change in the machine's load hits both.

    .venv/bin/python bench/jobs_per_minute.py
    .venv/bin/python bench/jobs_per_minute.py --jobs 30 --repeat 3 --queue postgres

Each worker gets one CPU thread (OMP_NUM_THREADS=1), as it would get one GPU: the question
is how the queue shares jobs, not how torch shares cores. Exit status 1 when 2 workers are
not at least ``--min-ratio`` times as fast as 1 (best of the rounds: a ratio measured in
this run, never an absolute rate), or when any job did not succeed exactly once.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.client import TrainserveClient  # noqa: E402
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv  # noqa: E402

POSTGRES_ADMIN_DSN = os.environ.get("TRAINSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TRAINSERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def job_spec(dataset_id: str, seed: int) -> dict[str, object]:
    return {
        "dataset_id": dataset_id,
        "target": "label",
        "model": MOONS_MLP_LAYERS,
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "SGD", "lr": 0.01},
        "epochs": 30,
        "batch_size": 4,
        "seed": seed,
    }


@contextmanager
def postgres_database() -> Iterator[str]:
    name = f"trainserve_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_keys_removed(name: str) -> Iterator[None]:
    try:
        yield
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"huey.*.{name}*"))
        if keys:
            client.delete(*keys)
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "trainserve", *command],
            env={**os.environ, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def api_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def run_round(url: str, env: dict[str, str], workdir: Path, workers: int, jobs: int, dataset_id: str) -> float:
    """Jobs per minute with ``workers`` fresh worker processes, started before the clock."""
    started = []
    try:
        for i in range(workers):
            log = workdir / f"worker-{workers}-{i}-{uuid.uuid4().hex[:6]}.log"
            worker = spawn(["worker"], {**env, "OMP_NUM_THREADS": "1"}, log)
            started.append(worker)
            wait_until(lambda log=log: "consumer started" in log.read_text(errors="replace"), worker, log, "a worker")
        with TrainserveClient(url, timeout=60) as ts:
            begin = time.perf_counter()
            ids = [ts.train(job_spec(dataset_id, seed)).id for seed in range(jobs)]
            finished = [ts.wait(job_id, timeout=900, poll=0.05) for job_id in ids]
            elapsed = time.perf_counter() - begin
        bad = [(job.id, job.status, job.attempts) for job in finished if job.status != "succeeded" or job.attempts != 1]
        if bad:
            raise RuntimeError(f"jobs that did not succeed exactly once: {bad}")
        ran_on = {job.worker for job in finished}
        if len(ran_on) != workers:
            raise RuntimeError(f"{workers} worker(s) started, {len(ran_on)} ran jobs: {ran_on}")
        return jobs / elapsed * 60
    finally:
        for worker in started:
            stop(worker)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20, help="jobs per round")
    parser.add_argument("--repeat", type=int, default=2, help="rounds with 1 worker and with 2")
    parser.add_argument("--queue", choices=["redis", "postgres", "sqlite"], default="redis")
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--min-ratio", type=float, default=1.3, help="2 workers vs 1, best round")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as resources:
        workdir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="trainserve-bench-")))
        queue_name = f"trainserve_bench_{uuid.uuid4().hex[:12]}"
        env = {
            "TRAINSERVE_DATA_DIR": str(workdir),
            "TRAINSERVE_QUEUE_NAME": queue_name,
            "TRAINSERVE_PROGRESS_INTERVAL_S": "0.5",
        }
        if args.database == "postgres":
            env["TRAINSERVE_DATABASE_URL"] = resources.enter_context(postgres_database())
        if args.queue == "redis":
            env["TRAINSERVE_QUEUE_URL"] = REDIS_URL
            resources.enter_context(redis_keys_removed(queue_name))
        elif args.queue == "postgres":
            if args.database != "postgres":
                env["TRAINSERVE_DATABASE_URL"] = resources.enter_context(postgres_database())
            env["TRAINSERVE_QUEUE_URL"] = env["TRAINSERVE_DATABASE_URL"].replace("+psycopg", "", 1)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api_log = workdir / "api.log"
        api = spawn(["serve", "--port", str(port), "--workers", "0", "--log-level", "warning"], env, api_log)
        resources.callback(stop, api)
        wait_until(lambda: api_ready(url), api, api_log, "the API")

        x, y = make_moons(200, noise=0.05, seed=0)
        with TrainserveClient(url, timeout=60) as ts:
            dataset_id = ts.upload_dataset(to_csv(x, y).encode(), "moons.csv").id

        rates: dict[int, list[float]] = {1: [], 2: []}
        for round_number in range(args.repeat):
            for workers in (1, 2):
                rate = run_round(url, env, workdir, workers, args.jobs, dataset_id)
                rates[workers].append(rate)
                print(f"round {round_number + 1}: {workers} worker(s): {rate:6.1f} jobs/min", flush=True)

    ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    print(f"\nqueue {args.queue}, database {args.database}, {args.jobs} jobs a round, {os.cpu_count()} CPU cores")
    print("| workers | jobs/min (best) | jobs/min (median) | rounds |")
    print("| ---: | ---: | ---: | --- |")
    for workers, values in rates.items():
        listed = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {workers} | {max(values):.1f} | {statistics.median(values):.1f} | {listed} |")
    best = max(ratios)
    print(f"2 workers / 1 worker: best {best:.2f}x, per round {', '.join(f'{r:.2f}x' for r in ratios)}")
    if best < args.min_ratio:
        print(f"FAIL: 2 workers are not {args.min_ratio:.2f}x as fast as 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
