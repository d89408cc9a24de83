"""Benchmark: the guide's make_moons MLP trained by the guide's loop, by trainserve's engine, and over HTTP.

All runs share one process, one data set (``make_moons(200, noise=0.05, seed=0)``) and one
algorithm: the 2x30 Tanh MLP, CrossEntropyLoss, SGD lr 0.001, batch size 1, rows in their
stored order (the guide's ``DataLoader(dataset)`` does not shuffle), raw unscaled inputs,
weights drawn after ``torch.manual_seed(0)``. So the engine starts from the guide's very
weights and should end at (nearly) the guide's loss; only the time differs.

    guide    bench/guide.py's ``simple_network``: DataLoader, batch 1, ``loss.item()`` per step
    engine   ``trainserve.training.loop.train`` with the equivalent spec (standardize false, seed 0): the
             native loop (generated C for the whole step), its library found in the on-disk cache
    cold     the same with an empty cache, so the time includes generating and compiling the C
    eager    the same spec with ``"loop": "eager"``: the eager PyTorch loop
    service  with ``--url``: upload + POST /train + wait; timed from POST /train until the job
             has succeeded, next to the model's own ``train_seconds``, so that the service's
             overhead (end to end minus engine time) shows

Run from the repository root:

    .venv/bin/python bench/train_moons.py
    .venv/bin/python bench/train_moons.py --repeat 3 --url http://127.0.0.1:8000

Exit status 1 when the engine (cached) is not at least 20x faster than the guide's loop,
or when its training accuracy is more than 0.02 below the guide's (ratios and accuracies
only, never absolute times, so the check holds on any machine); 2 when the service could
not be used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.guide import accuracy, train_moons  # noqa: E402
from trainserve.datasets.tables import ColumnInfo, TableSchema  # noqa: E402
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv  # noqa: E402
from trainserve.training import loop, native  # noqa: E402
from trainserve.training.spec import Limits, TrainSpec, plan_training  # noqa: E402

SEED = 0
MAX_ACCURACY_DROP = 0.02
TARGET_SPEEDUP = 20.0


@dataclass
class Run:
    name: str
    seconds: float
    loss: float
    accuracy: float
    engine_seconds: float | None = None  # the service's own train_seconds
    queued_seconds: float | None = None  # job created -> a worker claimed it
    model_id: str | None = None
    loop: str | None = None


def moons_spec(epochs: int, device: str, dataset_id: str | None = None, training_loop: str = "auto") -> dict[str, Any]:
    """The guide's experiment as a trainserve spec: same layers, loss, optimizer, order, seed."""
    return {
        "dataset_id": dataset_id,
        "target": "y",
        "model": MOONS_MLP_LAYERS,
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "SGD", "lr": 0.001},
        "epochs": epochs,
        "batch_size": 1,
        "shuffle": False,
        "seed": SEED,
        "standardize": False,
        "device": device,
        "loop": training_loop,
    }


def run_guide(x: np.ndarray, y: np.ndarray, epochs: int) -> Run:
    started = time.perf_counter()
    model, loss = train_moons(x, y, epochs=epochs, seed=SEED)
    seconds = time.perf_counter() - started
    return Run("guide loop", seconds, loss, accuracy(model, x, y))


def run_engine(
    x: np.ndarray, y: np.ndarray, epochs: int, device: str, name: str = "engine", training_loop: str = "auto"
) -> Run:
    spec = TrainSpec.model_validate(moons_spec(epochs, device, training_loop=training_loop))
    schema = TableSchema(
        len(x),
        [
            ColumnInfo("x0", "float64"),
            ColumnInfo("x1", "float64"),
            ColumnInfo("y", "int64", sorted(int(c) for c in np.unique(y))),
        ],
    )
    plan = plan_training(spec, schema, Limits(max_epochs=10**9, max_parameters=10**9, max_layer_width=10**6))
    features = x.astype(np.float32)
    started = time.perf_counter()
    result = loop.train(spec, plan, features, y)
    seconds = time.perf_counter() - started
    # Scored by the guide's own accuracy(), on the module /predict would serve.
    loss = result.history[-1].train_loss
    return Run(name, seconds, loss, accuracy(result.module, x, y), loop=result.notes[0])


def run_engine_cold(x: np.ndarray, y: np.ndarray, epochs: int, device: str) -> Run:
    """The engine with an empty compile cache: generating and compiling the step counts."""
    saved = os.environ.get("TRAINSERVE_NATIVE_CACHE_DIR")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["TRAINSERVE_NATIVE_CACHE_DIR"] = empty
        native._loaded.clear()
        try:
            return run_engine(x, y, epochs, device, name="engine, cold cache")
        finally:
            native._loaded.clear()
            if saved is None:
                del os.environ["TRAINSERVE_NATIVE_CACHE_DIR"]
            else:
                os.environ["TRAINSERVE_NATIVE_CACHE_DIR"] = saved


def run_service(url: str, api_key: str | None, x: np.ndarray, y: np.ndarray, epochs: int, device: str) -> Run:
    from trainserve.client import TrainserveClient

    with TrainserveClient(url, api_key=api_key) as client:
        csv = to_csv(x, y, feature_names=["x0", "x1"], target="y").encode()
        dataset = client.upload_dataset(csv, filename="bench-moons.csv")
        started = time.perf_counter()
        job = client.train(moons_spec(epochs, device, dataset.id))
        done = client.wait(job.id, timeout=3600, poll=0.05)
        seconds = time.perf_counter() - started
        if done.status != "succeeded" or done.model_id is None:
            raise RuntimeError(f"job {job.id} {done.status}: {done.error}")
        model = client.get_model(done.model_id)
    queued = (done.started_at - done.created_at).total_seconds() if done.started_at else None
    return Run(
        "service",
        seconds,
        float(done.train_loss) if done.train_loss is not None else float("nan"),
        float(model.metrics["train_accuracy"]),
        engine_seconds=model.train_seconds,
        queued_seconds=queued,
        model_id=model.id,
    )


def best(runs: Sequence[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def print_table(rows: Sequence[Run], baseline: Run) -> None:
    header = f"{'run':<20} {'seconds':>8} {'final loss':>11} {'train acc':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = baseline.seconds / r.seconds
        print(f"{r.name:<20} {r.seconds:>8.3f} {r.loss:>11.5f} {r.accuracy:>10.3f} {ratio:>8.1f}x")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=300, help="epochs for every run (the guide: 300)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    parser.add_argument("--url", help="also time the whole service at this base URL")
    parser.add_argument(
        "--api-key", default=os.environ.get("TRAINSERVE_API_KEY"), help="bearer key (default: $TRAINSERVE_API_KEY)"
    )
    parser.add_argument("--skip-eager", action="store_true", help="leave out the eager-loop run (slow)")
    parser.add_argument("--device", default="cpu", help="device for the engine and service runs (the guide's: cpu)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeat < 1:
        parser.error("--epochs and --repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    x, y = make_moons(200, noise=0.05, seed=SEED)
    print(
        f"make_moons(200, noise=0.05, seed={SEED}); 2x30 Tanh MLP, SGD lr 0.001, batch 1, {args.epochs} epochs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine/service device {args.device}; "
        f"best of {args.repeat}",
        flush=True,
    )
    guides: list[Run] = []
    engines: list[Run] = []
    colds: list[Run] = []
    eagers: list[Run] = []
    services: list[Run] = []
    service_error: str | None = None
    # One untimed epoch of each first, so neither timed run pays torch's one-off start-up costs.
    run_guide(x, y, 1)
    run_engine(x, y, 1, args.device)
    for i in range(args.repeat):
        guides.append(run_guide(x, y, args.epochs))
        colds.append(run_engine_cold(x, y, args.epochs, args.device))
        native._loaded.clear()  # found on disk, as a fresh worker process would
        engines.append(run_engine(x, y, args.epochs, args.device))
        if not args.skip_eager:
            eagers.append(run_engine(x, y, args.epochs, args.device, name="engine, eager loop", training_loop="eager"))
        if args.url and service_error is None:
            try:
                services.append(run_service(args.url, args.api_key, x, y, args.epochs, args.device))
            except Exception as exc:  # the report should still show the local runs
                service_error = f"{type(exc).__name__}: {exc}"
                print(f"service run failed: {service_error}", file=sys.stderr)
        print(f"  round {i + 1}/{args.repeat} done", flush=True)

    guide, eng = best(guides), best(engines)
    rows = [guide, eng, best(colds)] + ([best(eagers)] if eagers else []) + ([best(services)] if services else [])
    print()
    print_table(rows, guide)
    print(f"\nfinal loss: mean over the last epoch; |engine - guide| = {abs(eng.loss - guide.loss):.2e}")
    print(f"engine: {eng.loop}")
    if len(guides) > 1:
        ratios = sorted(g.seconds / e.seconds for g, e in zip(guides, engines, strict=True))
        print(f"engine speed-up per round: {', '.join(f'{r:.1f}x' for r in ratios)}")
    if services:
        svc = best(services)
        assert svc.engine_seconds is not None
        overhead = svc.seconds - svc.engine_seconds
        print(
            f"service: {svc.seconds:.2f} s from POST /train to succeeded, of which the engine trained "
            f"{svc.engine_seconds:.2f} s; overhead {overhead:.2f} s ({overhead / svc.seconds:.0%}); "
            f"model {svc.model_id}"
        )
        if svc.queued_seconds is not None:
            print(
                f"  of the overhead, {svc.queued_seconds:.2f} s passed between the job's creation and a worker "
                f"claiming it (queue pickup); the rest is loading the data, saving the model and HTTP polling"
            )

    failures = []
    if guide.seconds / eng.seconds < TARGET_SPEEDUP:
        failures.append(
            f"the engine is {guide.seconds / eng.seconds:.1f}x faster than the guide's loop; the target is "
            f"{TARGET_SPEEDUP:.0f}x"
        )
    if eng.accuracy < guide.accuracy - MAX_ACCURACY_DROP:
        failures.append(
            f"the engine's accuracy {eng.accuracy:.3f} is more than {MAX_ACCURACY_DROP} below the guide's "
            f"{guide.accuracy:.3f}"
        )
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(
        f"OK: the engine is {guide.seconds / eng.seconds:.1f}x faster than the guide's loop (target "
        f"{TARGET_SPEEDUP:.0f}x) and as accurate"
    )
    if service_error is not None:
        print(f"FAIL: the service run failed: {service_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
