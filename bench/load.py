"""Load benchmark: hundreds of concurrent POST /predict calls, first on an idle service,
then while its worker trains a job that saturates the CPU; every answer is compared with
a reference taken one call at a time before the load.

It prints p50/p99 latency idle and during training, and their ratio. By default it starts
its own servers (a real ``trainserve serve`` with one worker) twice, with the worker at
``TRAINSERVE_WORKER_NICE=0`` and at the default niceness, to show what lowering the
worker's scheduling priority does; ``--url`` measures a running server instead.

    .venv/bin/python bench/load.py
    .venv/bin/python bench/load.py --requests 600 --concurrency 50
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000

Exit status 1 when an answer is wrong or missing, or when the p99 during training is
more than ``--max-ratio`` times the idle p99 (a ratio, never an absolute time).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.client import TrainserveClient  # noqa: E402
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv  # noqa: E402

SPEC: dict[str, Any] = {
    "target": "label",
    "model": MOONS_MLP_LAYERS,
    "loss": "CrossEntropyLoss",
    "optimizer": {"type": "Adam", "lr": 0.01},
}


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered call
    wrong: list[str] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)


def make_batches(count: int, rows: int, seed: int = 0) -> list[list[list[float]]]:
    """``count`` distinct prediction inputs of ``rows`` rows each, around the moons."""
    generator = np.random.default_rng(seed)
    return generator.uniform(-1.5, 2.5, size=(count, rows, 2)).round(4).tolist()  # type: ignore[no-any-return]


def prepare_model(url: str, *, api_key: str | None = None) -> tuple[str, str]:
    """Upload the moons and train a small classifier: (dataset id, model id)."""
    x, y = make_moons(200, noise=0.05, seed=0)
    with TrainserveClient(url, api_key=api_key, timeout=120) as ts:
        dataset = ts.upload_dataset(to_csv(x, y).encode(), "moons.csv")
        job = ts.wait(ts.train({**SPEC, "dataset_id": dataset.id, "epochs": 30, "batch_size": 16}).id)
        if job.status != "succeeded":
            raise RuntimeError(f"training the model failed: {job.error}")
        return dataset.id, job.model_id or ""


def reference_answers(url: str, model_id: str, batches: list[Any], *, api_key: str | None = None) -> list[Any]:
    """One call at a time, nothing else running: the answers the load must reproduce, as
    sent (the JSON body; the client's parsed model would add the fields a body leaves out)."""
    with TrainserveClient(url, api_key=api_key, timeout=60) as ts:
        answers = []
        for batch in batches:
            response = ts.http.post("/predict", json={"model_id": model_id, "inputs": batch})
            response.raise_for_status()
            answers.append(response.json())
        return answers


def start_busy_job(url: str, dataset_id: str, *, api_key: str | None = None) -> str:
    """A job that keeps the worker busy on every core (wide layers: torch's matrix products
    use all its threads), for far longer than the load lasts; returns once it runs."""
    wide = [{"type": "Linear", "out_features": 1024}, "Tanh", {"type": "Linear", "out_features": 1024}, "Tanh"]
    busy = {**SPEC, "model": [*wide, {"type": "Linear", "out_features": 2}], "epochs": 100_000, "batch_size": 64}
    with TrainserveClient(url, api_key=api_key, timeout=60) as ts:
        job = ts.train({**busy, "dataset_id": dataset_id})
        deadline = time.monotonic() + 60
        while ts.get_job(job.id).status != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the busy job did not start running within 60 s")
            time.sleep(0.05)
        return job.id


def job_status(url: str, job_id: str, *, api_key: str | None = None) -> str:
    with TrainserveClient(url, api_key=api_key, timeout=60) as ts:
        return ts.get_job(job_id).status


def cancel(url: str, job_id: str, *, api_key: str | None = None) -> None:
    with TrainserveClient(url, api_key=api_key, timeout=60) as ts:
        ts.cancel_job(job_id)


async def _fire(
    url: str,
    model_id: str,
    batches: list[Any],
    reference: list[Any],
    *,
    requests: int,
    concurrency: int,
    api_key: str | None,
) -> LoadResult:
    result = LoadResult()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:

        async def one(i: int) -> None:
            k = i % len(batches)
            async with gate:
                started = time.perf_counter()
                try:
                    response = await http.post("/predict", json={"model_id": model_id, "inputs": batches[k]})
                except httpx.HTTPError as exc:
                    result.wrong.append(f"call {i}: {exc!r}")
                    return
                elapsed = time.perf_counter() - started
            if response.status_code != 200:
                result.wrong.append(f"call {i}: {response.status_code} {response.text[:200]}")
            elif response.json() != reference[k]:
                result.wrong.append(f"call {i}: the answer differs from the reference")
            else:
                result.latencies.append(elapsed)

        await asyncio.gather(*(one(i) for i in range(requests)))
    return result


def fire(
    url: str,
    model_id: str,
    batches: list[Any],
    reference: list[Any],
    *,
    requests: int,
    concurrency: int,
    api_key: str | None = None,
) -> LoadResult:
    """``requests`` /predict calls, at most ``concurrency`` in flight, each checked."""
    return asyncio.run(
        _fire(url, model_id, batches, reference, requests=requests, concurrency=concurrency, api_key=api_key)
    )


@dataclass
class Measurement:
    idle: LoadResult
    busy: LoadResult
    busy_job_still_running: bool

    @property
    def ratio(self) -> float:
        return self.busy.p99 / self.idle.p99


def measure(url: str, *, requests: int, concurrency: int, api_key: str | None = None) -> Measurement:
    dataset_id, model_id = prepare_model(url, api_key=api_key)
    batches = make_batches(32, 8)
    reference = reference_answers(url, model_id, batches, api_key=api_key)
    fire(url, model_id, batches, reference, requests=concurrency, concurrency=concurrency, api_key=api_key)  # warm
    idle = fire(url, model_id, batches, reference, requests=requests, concurrency=concurrency, api_key=api_key)
    job_id = start_busy_job(url, dataset_id, api_key=api_key)
    try:
        busy = fire(url, model_id, batches, reference, requests=requests, concurrency=concurrency, api_key=api_key)
        running = job_status(url, job_id, api_key=api_key) == "running"
    finally:
        cancel(url, job_id, api_key=api_key)
    return Measurement(idle, busy, running)


def _report(label: str, m: Measurement) -> None:
    ms = 1000
    print(
        f"{label:<24} idle p50 {m.idle.p50 * ms:7.1f} ms  p99 {m.idle.p99 * ms:7.1f} ms | "
        f"training p50 {m.busy.p50 * ms:7.1f} ms  p99 {m.busy.p99 * ms:7.1f} ms | "
        f"p99 ratio {m.ratio:5.2f}x | wrong {len(m.idle.wrong) + len(m.busy.wrong)} | "
        f"job ran throughout: {m.busy_job_still_running}"
    )


def _own_server(nice: int, args: argparse.Namespace) -> Measurement:
    from tests.conftest import start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="trainserve-load-") as folder:
        server = start_server(Path(folder), env={"TRAINSERVE_WORKER_NICE": str(nice)})
        try:
            return measure(server.url, requests=args.requests, concurrency=args.concurrency)
        finally:
            stop_server(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("--api-key")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--max-ratio", type=float, default=10.0)
    args = parser.parse_args(argv)
    failed = False
    for round_ in range(1, args.repeat + 1):
        runs: list[tuple[str, Measurement]] = []
        if args.url:
            runs.append(("given server", measure(args.url, **_load_args(args))))
        else:
            from trainserve.config import Settings

            default_nice = Settings.model_fields["worker_nice"].default
            runs.append(("worker nice 0", _own_server(0, args)))
            runs.append((f"worker nice {default_nice}", _own_server(default_nice, args)))
        print(f"round {round_}: {args.requests} calls, {args.concurrency} in flight, 8 rows each")
        for label, m in runs:
            _report(label, m)
            failed |= bool(m.idle.wrong or m.busy.wrong) or not m.busy_job_still_running
        failed |= runs[-1][1].ratio > args.max_ratio
        if len(runs) == 2:
            print(f"  nice: p99 during training {runs[0][1].busy.p99 / runs[1][1].busy.p99:.2f}x lower than at nice 0")
    return 1 if failed else 0


def _load_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"requests": args.requests, "concurrency": args.concurrency, "api_key": args.api_key}


if __name__ == "__main__":
    sys.exit(main())
