"""Benchmark: what a sweep costs beyond its trials' training, and what pruning saves.

One embedded server (``trainserve serve --workers 2``, SQLite database and queue, one
torch thread per worker) runs the guide's moons MLP search twice, with the same seed:

1. ``pruner: none``, ``parallel: 2``: wall time from POST /sweeps to its last trial's end,
   against (sum of the trials' engine times) / 2, the best two workers could do if the
   queue, the sampler and the bookkeeping cost nothing. Engine time is the model's
   ``train_seconds`` (the training loop, compile included).
2. ``pruner: median``: the total time its trials' jobs spent training (claim to end),
   against sweep 1's on the same search.

    .venv/bin/python bench/sweeps.py
    .venv/bin/python bench/sweeps.py --trials 20 --max-overhead 1.25

Both figures are ratios measured in the same run, never absolute times. Exit status 1 when
sweep 1's ratio is over ``--max-overhead`` or pruning did not cut the training time.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.client import TrainserveClient  # noqa: E402
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv  # noqa: E402


def sweep_request(dataset_id: str, trials: int, pruner: str) -> dict[str, Any]:
    return {
        "name": f"bench-{pruner}",
        "base": {
            "dataset_id": dataset_id,
            "target": "label",
            "model": MOONS_MLP_LAYERS,
            "loss": "CrossEntropyLoss",
            "optimizer": {"type": "Adam", "lr": 0.01},
            "epochs": 100,
            "batch_size": 8,
            "validation_split": 0.25,
        },
        "search": {
            "optimizer.lr": {"log_uniform": [1e-5, 1e-1]},
            "model.0.out_features": {"choice": [16, 30]},
            "batch_size": {"choice": [4, 8, 16]},
            "epochs": {"int_uniform": [50, 150]},
        },
        "sampler": "tpe",
        "trials": trials,
        "parallel": 2,
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "pruner": {"type": pruner, "startup_trials": 3, "warmup_epochs": 5} if pruner == "median" else pruner,
        "seed": 0,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def seconds(start: str | datetime | None, end: str | datetime | None) -> float:
    if start is None or end is None:
        return 0.0
    a = start if isinstance(start, datetime) else datetime.fromisoformat(start)
    b = end if isinstance(end, datetime) else datetime.fromisoformat(end)
    return (b - a).total_seconds()


def run_sweep(ts: TrainserveClient, request: dict[str, Any]) -> dict[str, float]:
    begin = time.perf_counter()
    sweep = ts.create_sweep(request)
    done = ts.wait_sweep(sweep.id, timeout=3600, poll=0.05)
    wall = time.perf_counter() - begin
    if len(done.trials) != request["trials"]:
        raise RuntimeError(f"{len(done.trials)} trials, asked for {request['trials']}")
    engine = training = waited = 0.0
    epochs = 0
    for trial in done.trials:
        assert trial.job_id is not None
        job = ts.get_job(trial.job_id)
        training += seconds(job.started_at, job.finished_at)
        if trial.number >= request["parallel"]:  # queued when an earlier trial ended: time to its claim
            waited += seconds(job.created_at, job.started_at)
        epochs += trial.epochs_run
        if trial.model_id is not None:
            engine += ts.get_model(trial.model_id).train_seconds
    states = {s: sum(t.state == s for t in done.trials) for s in ("complete", "pruned", "failed")}
    best = done.best.value if done.best is not None else float("nan")
    return {
        "wall": wall,
        "engine": engine,
        "training": training,
        "waited": waited,
        "epochs": epochs,
        "best": best,
        **states,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-overhead", type=float, default=1.25, help="wall / (sum of engine times / 2)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trainserve-bench-sweeps-") as workdir:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "TRAINSERVE_DATA_DIR": workdir, "TRAINSERVE_TRAIN_THREADS": "1"}
        log = Path(workdir) / "server.log"
        with open(log, "wb") as handle:
            server = subprocess.Popen(
                [sys.executable, "-m", "trainserve", "serve", "--port", str(port), "--workers", "2"],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)
            x, y = make_moons(200, noise=0.05, seed=0)
            with TrainserveClient(url, timeout=120) as ts:
                dataset_id = ts.upload_dataset(to_csv(x, y).encode(), "moons.csv").id
                # Both widths compiled once before the clock (the native loop's on-disk cache).
                warm = sweep_request(dataset_id, 2, "none") | {"sampler": "grid"}
                warm["search"] = {"model.0.out_features": {"choice": [16, 30]}}
                ts.wait_sweep(ts.create_sweep(warm).id, timeout=600)
                plain = run_sweep(ts, sweep_request(dataset_id, args.trials, "none"))
                pruned = run_sweep(ts, sweep_request(dataset_id, args.trials, "median"))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    overhead = plain["wall"] / (plain["engine"] / 2)
    saved = pruned["training"] / plain["training"]
    print(f"{args.trials} trials of the moons MLP, parallel 2, on 2 workers")
    print(
        f"  pruner none:   wall {plain['wall']:.1f} s, engine sum {plain['engine']:.1f} s, "
        f"wall / (engine sum / 2) = {overhead:.2f} (limit {args.max_overhead})"
    )
    print(
        f"    of which, per trial: {(plain['training'] - plain['engine']) / args.trials * 1000:.0f} ms claimed but "
        f"outside the engine (data, plan, saving the model), {plain['waited'] / args.trials * 1000:.0f} ms "
        "from being queued to being claimed"
    )
    print(
        f"  pruner median: {int(pruned['pruned'])} of {args.trials} pruned, {int(pruned['epochs'])} epochs "
        f"against {int(plain['epochs'])}; training time {pruned['training']:.1f} s against "
        f"{plain['training']:.1f} s = {saved:.2f}x; best val_loss {pruned['best']:.4g} against {plain['best']:.4g}"
    )
    return 0 if overhead <= args.max_overhead and saved < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
