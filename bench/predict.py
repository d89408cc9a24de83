"""Benchmark: single-row POST /predict throughput against a bare FastAPI endpoint, side by side.

Three servers run at once, each a single uvicorn process: the bare baseline
(bench/bare_app.py: constant JSON, nothing read or computed), trainserve with
micro-batching (the default) and trainserve with it off (TRAINSERVE_PREDICT_BATCHING=false),
both serving the guide's 2x30 Tanh make_moons classifier. ``wrk`` drives each in turn
with the same one-row JSON request at every concurrency level, the rounds interleaved so
that noise from other work on the machine hits all three alike.

    .venv/bin/python bench/predict.py                    # 1, 8, 32, 64 clients, 3 rounds of 5 s
    .venv/bin/python bench/predict.py --clients 32 --rounds 5

Prints requests/s, p50 and p99 latency for each server and concurrency, the ratio to the
bare endpoint, and the CPU share (of one core) the generator and the server used: a
server near 100% and a generator well below it means the server was the limit being
measured. Exit status 1 when trainserve (batching on) at 32 clients reaches less than 70%
of the bare endpoint's rate (the median over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.serving import Load, bare_fastapi, data_dir, train_moons_model, trainserve, wrk  # noqa: E402

TARGET_CLIENTS = 32
TARGET_RATIO = 0.70


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrency levels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    folder = data_dir()
    print(f"training the moons classifier in {folder} ...", flush=True)
    model_id = train_moons_model(folder)
    body = json.dumps({"model_id": model_id, "inputs": [[0.5, -0.2]]})

    with ExitStack() as stack:
        servers = {
            "bare FastAPI": stack.enter_context(bare_fastapi()),
            "trainserve, batching on": stack.enter_context(trainserve(folder)),
            "trainserve, batching off": stack.enter_context(trainserve(folder, predict_batching="false")),
        }
        for server in servers.values():  # warm up: model loaded and cached, code paths hot
            wrk(server, "/predict", body, connections=8, seconds=1)
        loads: dict[tuple[str, int], list[Load]] = {(name, c): [] for name in servers for c in levels}
        for clients in levels:
            for _ in range(args.rounds):
                for name, server in servers.items():
                    load = wrk(server, "/predict", body, connections=clients, seconds=args.seconds)
                    if load.errors:
                        print(f"{name}: {load.errors} failed requests", file=sys.stderr)
                        return 2
                    loads[(name, clients)].append(load)

    print(f"\nsingle-row POST /predict, {args.rounds} rounds of {args.seconds:g} s, median of rounds")
    print(
        f"{'server':<26}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}"
        f"{'spread':>15}{'wrk CPU':>9}{'srv CPU':>9}"
    )
    ratios_at_target: list[float] = []
    for clients in levels:
        bare = loads[("bare FastAPI", clients)]
        for name in servers:
            runs = loads[(name, clients)]
            ratios = [run.requests_per_s / base.requests_per_s for run, base in zip(runs, bare, strict=True)]
            if name == "trainserve, batching on" and clients == TARGET_CLIENTS:
                ratios_at_target = ratios
            rate = statistics.median(r.requests_per_s for r in runs)
            print(
                f"{name:<26}{clients:>8}{rate:>10.0f}"
                f"{statistics.median(r.p50_ms for r in runs):>9.2f}{statistics.median(r.p99_ms for r in runs):>9.2f}"
                f"{statistics.median(ratios):>8.0%} {min(ratios):>6.0%}-{max(ratios):<6.0%}"
                f"{statistics.median(r.generator_cpu for r in runs):>9.0%}"
                f"{statistics.median(r.server_cpu for r in runs):>9.0%}"
            )
    if not ratios_at_target:
        print(f"\n(no {TARGET_CLIENTS}-client run: target not checked)")
        return 0
    ratio = statistics.median(ratios_at_target)
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"\ntarget: trainserve at {TARGET_CLIENTS} clients >= {TARGET_RATIO:.0%} of bare FastAPI:"
        f" {ratio:.0%}, {verdict}"
    )
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
