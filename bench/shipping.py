"""Benchmark: what shipping safely costs a single-row POST /predict by name.

Two trainserve servers (one uvicorn process each, API only) share one trained, named model
(``moons``, with a ``production`` alias, and a ``shadow`` alias on a second version). One
runs with the prediction log off (TRAINSERVE_PREDICTION_LOG_SAMPLE=0: no log, no shadow), the
other with its default share (each logged request is also answered by the shadow, on the
log's thread). Both are asked by name alone (``{"name": "moons", ...}``), so each answer
also goes through the alias and the name cache. ``wrk`` (or, without it, a Python asyncio
client: ``--generator python``) drives both with the same one-row request at 32 clients,
rounds interleaved so that noise from other work on the machine hits both alike.

    .venv/bin/python bench/shipping.py                  # 3 rounds of 5 s, wrk
    .venv/bin/python bench/shipping.py --generator python --rounds 5

Prints requests/s and p50/p99 latency of each, and the ratio logged/off per round. Exit
status 1 when the median ratio is below 0.90 (the issue's target: within 10%). A ratio,
never an absolute time: on a shared machine single rounds swing by 10-20%, so read the
median and the spread together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.serving import Load, Server, data_dir, trainserve, wrk  # noqa: E402
from trainserve.config import Settings  # noqa: E402
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv  # noqa: E402

CLIENTS = 32
TARGET_RATIO = 0.90


def train_named_model(folder: Path) -> None:
    """The guide's moons classifier as ``moons`` v1 and v2 (another seed), ``production`` on v1
    and ``shadow`` on v2."""
    x, y = make_moons(400, noise=0.1, seed=0)
    with trainserve(folder, workers=1) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        dataset = http.post("/datasets", files={"file": ("moons.csv", to_csv(x, y).encode())}).json()
        spec = {
            "dataset_id": dataset["id"],
            "name": "moons",
            "target": "label",
            "model": MOONS_MLP_LAYERS,
            "loss": "CrossEntropyLoss",
            "optimizer": {"type": "Adam", "lr": 0.01},
            "epochs": 10,
            "batch_size": 32,
        }
        for seed in (0, 1):
            job = http.post("/train", json={**spec, "seed": seed}).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.2)
                job = http.get(f"/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"training failed: {job.get('error')}")
        http.put("/models/by-name/moons/aliases/production", json={"version": 1}).raise_for_status()
        http.put("/models/by-name/moons/aliases/shadow", json={"version": 2}).raise_for_status()


async def _python_load(url: str, body: str, *, clients: int, seconds: float) -> Load:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = await http.post("/predict", content=body, headers={"Content-Type": "application/json"})
                if response.status_code != 200:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.monotonic() - started
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return Load(
        len(latencies) / wall, statistics.median(ordered) * 1000, p99 * 1000, errors, float("nan"), float("nan")
    )


def load(generator: str, server: Server, body: str, *, seconds: float) -> Load:
    if generator == "wrk":
        return wrk(server, "/predict", body, connections=CLIENTS, seconds=seconds)
    return asyncio.run(_python_load(server.url, body, clients=CLIENTS, seconds=seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--generator", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    args = parser.parse_args()

    folder = data_dir()
    print(f"training moons in {folder} ...", flush=True)
    train_named_model(folder)
    body = json.dumps({"name": "moons", "inputs": [[0.5, -0.2]]})
    default_share = Settings.model_fields["prediction_log_sample"].default
    with ExitStack() as stack:
        servers = {
            "log off": stack.enter_context(trainserve(folder, prediction_log_sample="0")),
            f"log {default_share:g} + shadow": stack.enter_context(trainserve(folder)),
        }
        for server in servers.values():  # warm up: model and name cached, code paths hot
            load(args.generator, server, body, seconds=1)
        runs: dict[str, list[Load]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, server in servers.items():
                result = load(args.generator, server, body, seconds=args.seconds)
                if result.errors:
                    print(f"{name}: {result.errors} failed requests", file=sys.stderr)
                    return 2
                runs[name].append(result)

    print(
        f"\nsingle-row POST /predict by name, {CLIENTS} clients, {args.generator}, {args.rounds} x {args.seconds:g} s"
    )
    print(f"{'server':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for name, results in runs.items():
        print(
            f"{name:<22}{statistics.median(r.requests_per_s for r in results):>10.0f}"
            f"{statistics.median(r.p50_ms for r in results):>9.2f}{statistics.median(r.p99_ms for r in results):>9.2f}"
        )
    off, logged = runs.values()
    ratios = [b.requests_per_s / a.requests_per_s for a, b in zip(off, logged, strict=True)]
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"\nlogged / off: median {ratio:.0%} (rounds {', '.join(f'{r:.0%}' for r in ratios)}); "
        f"target >= {TARGET_RATIO:.0%}: {verdict}"
    )
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
