"""Benchmark: the engine under the thread policy against a plain torch loop at 1 thread and at all cores.

Two shapes (issue #16, target 1), each on an idle machine and with CPU burners this
script starts itself (``--burners``, default one process spinning per two cores):

    medium   200,000 x 20, MLP 20-128-128-2, CrossEntropyLoss, Adam, batch 256, 3 epochs
    large    1,000,000 x 32, MLP 32-256-256-1, MSELoss, Adam, batch 4096, 3 epochs

    plain-1  a plain torch loop (randperm, index batches, zero_grad/forward/loss/backward/step)
             with torch.set_num_threads(1)
    plain-N  the same with one thread per allowed core (torch's default)
    engine   ``trainserve.training.loop.train`` with the threads the worker would choose
             (``trainserve.training.threads.choose``): what a job runs
    service  with ``--service``: a real ``trainserve serve`` (its worker at the default
             niceness), POST /train until succeeded, timed end to end

Each figure is the engine's (and service's) time over the best plain loop measured in the
same condition, side by side. Exit 1 when the engine (or service) reaches less than 90%
of the best plain loop's speed (ratio of times above 1/0.9) in any cell.

    .venv/bin/python bench/threads.py                 # full shapes (minutes)
    .venv/bin/python bench/threads.py --quick         # a quarter of the rows, 1 epoch
    .venv/bin/python bench/threads.py --quick --service

On a shared machine every figure moves with the other users' load; run twice.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.datasets.tables import ColumnInfo, TableSchema  # noqa: E402
from trainserve.training import loop, threads  # noqa: E402
from trainserve.training.spec import Limits, TrainSpec, plan_training  # noqa: E402

MIN_SHARE = 0.90  # of the best plain loop's speed


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    features: int
    hidden: int
    outputs: int
    batch: int
    epochs: int
    loss: str

    def layers(self) -> list[dict[str, Any]]:
        return [
            {"type": "Linear", "out_features": self.hidden},
            {"type": "ReLU"},
            {"type": "Linear", "out_features": self.hidden},
            {"type": "ReLU"},
            {"type": "Linear", "out_features": self.outputs},
        ]

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((self.rows, self.features), dtype=np.float32)
        signal = x[:, : min(4, self.features)].sum(axis=1) + 0.1 * rng.standard_normal(self.rows).astype(np.float32)
        if self.loss == "CrossEntropyLoss":
            return x, (signal > 0).astype(np.int64)
        return x, signal.astype(np.float32).reshape(-1, 1)

    def parameters(self) -> int:
        h, f, o = self.hidden, self.features, self.outputs
        return f * h + h + h * h + h + h * o + o


SHAPES = {
    "medium": Shape("medium", 200_000, 20, 128, 2, 256, 3, "CrossEntropyLoss"),
    "large": Shape("large", 1_000_000, 32, 256, 1, 4096, 3, "MSELoss"),
}


def plain_loop(
    shape: Shape, x: np.ndarray, y: np.ndarray, n_threads: int, give_up_s: float = float("inf")
) -> tuple[float, float]:
    """A plain torch loop as a user writes it; (seconds, last epoch's mean loss). Past
    ``give_up_s`` it stops and answers inf: it cannot be the best loop any more (all
    cores under contention ran 20-30x slower than one thread, minutes for nothing)."""
    torch.set_num_threads(n_threads)
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net = nn.Sequential(
        nn.Linear(shape.features, shape.hidden),
        nn.ReLU(),
        nn.Linear(shape.hidden, shape.hidden),
        nn.ReLU(),
        nn.Linear(shape.hidden, shape.outputs),
    )
    loss_fn: nn.Module = nn.CrossEntropyLoss() if shape.loss == "CrossEntropyLoss" else nn.MSELoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    started = time.perf_counter()
    loss_sum = 0.0
    for _ in range(shape.epochs):
        order = torch.randperm(len(xt))
        loss_sum, steps = 0.0, 0
        for start in range(0, len(xt), shape.batch):
            rows = order[start : start + shape.batch]
            optimizer.zero_grad()
            loss = loss_fn(net(xt[rows]), yt[rows])
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            steps += 1
            if time.perf_counter() - started > give_up_s:
                return float("inf"), float("nan")
        loss_sum /= steps
    return time.perf_counter() - started, loss_sum


def spec_for(shape: Shape) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "dataset_id": "bench",
            "target": "y",
            "model": shape.layers(),
            "loss": shape.loss,
            "optimizer": {"type": "Adam", "lr": 1e-3},
            "epochs": shape.epochs,
            "batch_size": shape.batch,
            "standardize": False,
            "seed": 0,
            "device": "cpu",
        }
    )


def schema_for(shape: Shape) -> TableSchema:
    columns = [ColumnInfo(f"x{i}", "float64") for i in range(shape.features)]
    target = ColumnInfo("y", "int64", [0, 1]) if shape.loss == "CrossEntropyLoss" else ColumnInfo("y", "float64")
    return TableSchema(shape.rows, [*columns, target])


def engine(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """The engine as the worker runs it: threads chosen by the policy; (seconds, loss, threads note)."""
    spec = spec_for(shape)
    plan = plan_training(spec, schema_for(shape), Limits(10**6, 10**9, 10**6))
    choice = threads.choose(shape.batch * plan.n_parameters)
    started = time.perf_counter()
    result = loop.train(spec, plan, x, y.reshape(len(y), -1) if y.ndim == 2 else y, threads=choice)
    return time.perf_counter() - started, result.history[-1].train_loss, choice.note()


@contextlib.contextmanager
def burners(count: int) -> Iterator[None]:
    """``count`` processes spinning at normal priority: the cores kept busy by someone else."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(0.5)  # let the scheduler place them
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def service(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """POST /train -> succeeded on a fresh ``trainserve serve``; (seconds, loss, threads note)."""
    import httpx

    from trainserve.client import TrainserveClient

    with tempfile.TemporaryDirectory(prefix="trainserve-bench-") as tmp:
        port = _free_port()
        env = {**os.environ, "TRAINSERVE_DATA_DIR": tmp}
        env.pop("TRAINSERVE_TRAIN_THREADS", None)
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainserve", "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log.name}")
                time.sleep(0.1)
            buffer = io.BytesIO()
            np.savez(buffer, X=x, y=y.reshape(-1))  # columns x0..x19 and y, as the engine's spec names them
            spec = spec_for(shape).model_dump(mode="json")
            with TrainserveClient(url, timeout=300) as ts:
                dataset = ts.upload_dataset(buffer.getvalue(), filename="bench.npz")
                spec["dataset_id"] = dataset.id
                # A first job, so that the worker process has started and paid its one-off
                # costs: what is timed below is a job on a running service.
                warm = ts.train({**spec, "epochs": 1, "max_seconds": 600})
                ts.wait(warm.id, timeout=600)
                started = time.perf_counter()
                job = ts.train(spec)
                while job.status in ("queued", "running"):
                    time.sleep(0.05)
                    job = ts.get_job(job.id)
                seconds = time.perf_counter() - started
            if job.status != "succeeded":
                raise RuntimeError(f"the job ended {job.status}: {job.error}")
            note = next((n for n in job.notes or [] if n.startswith("intra-op")), "")
            return seconds, float(job.train_loss or "nan"), note
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/4 of the rows, 1 epoch: shared machines")
    parser.add_argument("--shapes", default="medium,large", help="comma-separated: medium, large")
    parser.add_argument("--conditions", default="idle,busy", help="comma-separated: idle, busy")
    parser.add_argument("--burners", type=int, default=max(1, threads.allowed_cores() // 2))
    parser.add_argument("--service", action="store_true", help="also time POST /train on a fresh server")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cores = threads.allowed_cores()
    missed: list[str] = []
    print(f"{cores} allowed cores; load average {os.getloadavg()[0]:.2f}; burners in 'busy': {args.burners}")
    print(f"{'shape':7} {'condition':9} {'plain-1':>8} {'plain-N':>8} {'engine':>8} {'ratio':>6}  engine threads")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if args.quick:
            rows = shape.rows // 4
            shape = Shape(shape.name, rows, shape.features, shape.hidden, shape.outputs, shape.batch, 1, shape.loss)
        x, y = shape.data()
        for condition in args.conditions.split(","):
            with burners(args.burners) if condition == "busy" else contextlib.nullcontext():
                t1, l1 = plain_loop(shape, x, y, 1)
                tn, ln = plain_loop(shape, x, y, cores, give_up_s=3 * t1)
                te, le, note = engine(shape, x, y)
                row = [("engine", te, le, note)]
                if args.service:
                    ts, ls, snote = service(shape, x, y)
                    row.append(("service", ts, ls, snote))
            best = min(t1, tn)
            for who, seconds, loss, how in row:
                ratio = best / seconds  # share of the best plain loop's speed
                flag = "" if ratio >= MIN_SHARE else "  MISS"
                print(
                    f"{name:7} {condition:9} {t1:8.2f} {tn:8.2f} {seconds:8.2f} {ratio:6.2f}  "
                    f"{who}: {how}; loss {loss:.4f} (plain {l1:.4f}/{ln:.4f}){flag}"
                )
                if ratio < MIN_SHARE:
                    missed.append(f"{who} {name} {condition}")
    torch.set_num_threads(cores)
    if missed:
        print(f"MISS: below {MIN_SHARE:.0%} of the best plain loop: {', '.join(missed)}")
        return 1
    print(f"every cell at or above {MIN_SHARE:.0%} of the best plain loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
