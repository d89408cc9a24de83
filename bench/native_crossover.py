"""Benchmark: the engine's measured native/eager choice against a plain torch loop, per batch size.

Issue #16, target 2. Two MLPs (MSELoss, Adam lr 1e-3, one thread), batch sizes 1 to 4,096:

    narrow   10-64-64-1     (4,993 parameters)
    wide     32-256-256-1   (74,497 parameters)

Per cell, side by side in one process:

    engine   ``trainserve.training.loop.train`` with its own choice of loop (the one it
             chose is printed); timed from the call to the end of its last epoch (the final
             metrics pass, which a plain loop does not do, left out)
    plain    bench/threads.py's plain loop (randperm, index batches, zero_grad/forward/
             loss/backward/step, ``loss.item()``)
    other    the engine forced onto the other loop (TRAINSERVE_NATIVE_CHOICE), stopped once
             past 3x the engine's time (then shown as "over 3x")

Times are this thread's CPU seconds (everything runs on it at one torch thread): on a
shared machine the wall clock adds whatever the other processes take, several-fold at a
load of 8 on 2 cores, while the work's own cost is what the loop choice changes. The
wall-clock ratio is printed beside it. Engine, plain and other run in turn, three times
(other once when it was stopped), and the fastest of each counts.
Before the cell, one short engine run on the cell's shape pays the first-use cost
(compile + measurement, printed as "first use" with the measurement's own share in
brackets), in a fresh native cache unless ``--cache-dir``: jobs pay it once per machine
and shape.

Exit 1 when, in any cell, the engine is slower than the plain loop by more than 5% (noise),
or the other loop was more than 5% faster than the one the engine chose.

    .venv/bin/python bench/native_crossover.py
    .venv/bin/python bench/native_crossover.py --shapes narrow --batches 16 32 64
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.threads import Shape, plain_loop, schema_for, spec_for  # noqa: E402
from trainserve.training import crossover, loop  # noqa: E402
from trainserve.training.spec import Limits, plan_training  # noqa: E402

NOISE = 0.05
BATCHES = (1, 8, 16, 32, 64, 128, 256, 1024, 4096)
MLPS = {"narrow": (10, 64), "wide": (32, 256)}
EPOCHS = 2
# Steps per epoch by batch: a cell's plain loop takes a fraction of a second to a few seconds.
STEPS = {1: 400, 8: 400, 16: 300, 32: 300, 64: 200, 128: 150, 256: 100, 1024: 40, 4096: 12}
OTHER_GIVE_UP = 3.0
REPEATS = 3  # engine, plain and other in turn; the fastest of each counts


def shape(name: str, batch: int) -> Shape:
    features, hidden = MLPS[name]
    steps = STEPS.get(batch, max(10, 40_000 // batch))
    if name == "wide" and batch >= 256:
        steps = max(10, steps // 2)
    return Shape(name, batch * steps, features, hidden, 1, batch, EPOCHS, "MSELoss")


@contextlib.contextmanager
def choice(value: str | None) -> Iterator[None]:
    before = os.environ.get("TRAINSERVE_NATIVE_CHOICE")
    if value is None:
        os.environ.pop("TRAINSERVE_NATIVE_CHOICE", None)
    else:
        os.environ["TRAINSERVE_NATIVE_CHOICE"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRAINSERVE_NATIVE_CHOICE", None)
        else:
            os.environ["TRAINSERVE_NATIVE_CHOICE"] = before


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    cpu: float  # this thread's CPU seconds (everything runs on it at one torch thread)
    loop: str = ""
    note: str = ""


STOPPED = Run(math.inf, math.inf)


def engine(s: Shape, x: np.ndarray, y: np.ndarray, give_up_s: float = math.inf) -> Run:
    """The engine's run to the end of its last epoch; STOPPED when past ``give_up_s``."""
    spec = spec_for(s)
    plan = plan_training(spec, schema_for(s), Limits(10**7, 10**9, 10**7))
    ended: list[tuple[float, float]] = []
    started, started_cpu = time.perf_counter(), time.thread_time()
    try:
        result = loop.train(
            spec,
            plan,
            x,
            y,
            on_epoch=lambda _: ended.append((time.perf_counter(), time.thread_time())),
            should_stop=lambda: time.perf_counter() - started > give_up_s,
            check_every_s=0.05,
        )
    except loop.TrainingCancelled:
        return STOPPED
    wall, cpu = ended[-1]
    return Run(wall - started, cpu - started_cpu, result.loop, result.notes[0])


def plain(s: Shape, x: np.ndarray, y: np.ndarray) -> Run:
    started_cpu = time.thread_time()
    wall, _ = plain_loop(s, x, y, 1)
    return Run(wall, time.thread_time() - started_cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(MLPS), default=["narrow", "wide"])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--cache-dir", type=Path, help="the native cache to use (default: a fresh one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fresh = tempfile.TemporaryDirectory(prefix="native-crossover-")
    os.environ["TRAINSERVE_NATIVE_CACHE_DIR"] = str(args.cache_dir or Path(fresh.name) / "native")
    measuring: list[float] = []
    measure = crossover.measure

    def timed_measure(*a: Any, **k: Any) -> crossover.Figures:
        started = time.perf_counter()
        try:
            return measure(*a, **k)
        finally:
            measuring.append(time.perf_counter() - started)

    crossover.measure = timed_measure  # type: ignore[assignment]
    print(f"torch {torch.__version__}, 1 thread, cores {len(os.sched_getaffinity(0))}, {EPOCHS} epochs per cell")
    print(
        f"{'mlp':6} {'batch':>5} {'first use':>18} {'engine':>16} {'plain':>8} {'ratio':>6}"
        f" {'other loop':>17} {'wall ratio':>10} {'load':>5}  verdict"
    )
    misses: list[str] = []
    try:
        for name in args.shapes:
            for batch in args.batches:
                s = shape(name, batch)
                x, y = s.data()
                measuring.clear()
                warm = Shape(s.name, batch * 2, s.features, s.hidden, 1, batch, 1, s.loss)
                started = time.perf_counter()
                with choice(None):
                    engine(warm, x[: warm.rows], y[: warm.rows])
                first_use = time.perf_counter() - started
                runs: dict[str, list[Run]] = {"engine": [], "plain": [], "other": []}
                for _ in range(REPEATS):
                    with choice(None):
                        runs["engine"].append(engine(s, x, y))
                    runs["plain"].append(plain(s, x, y))
                    if runs["other"] and runs["other"][0] is STOPPED:
                        continue  # stopped once: clearly slower, no need to repeat it
                    other = "eager" if runs["engine"][-1].loop == "native" else "native"
                    with choice(other):
                        give_up = OTHER_GIVE_UP * min(r.wall for r in runs["engine"])
                        runs["other"].append(engine(s, x, y, give_up_s=give_up))
                chosen = runs["engine"][-1].loop
                other = "eager" if chosen == "native" else "native"
                best = {k: Run(min(r.wall for r in v), min(r.cpu for r in v)) for k, v in runs.items()}
                ratio = best["plain"].cpu / best["engine"].cpu
                verdict = []
                if ratio < 1 - NOISE:
                    verdict.append("MISS: slower than the plain loop")
                if best["other"].cpu < (1 - NOISE) * best["engine"].cpu:
                    verdict.append(f"MISS: {other} was faster")
                misses += [f"{name} batch {batch}: {v}" for v in verdict]
                spent = f"{first_use:.2f} s ({sum(measuring) * 1000:.0f} ms)" if measuring else f"{first_use:.2f} s"
                other_cpu = best["other"].cpu
                other_text = f"{other_cpu:.2f} s" if math.isfinite(other_cpu) else "over 3x"
                print(
                    f"{name:6} {batch:5} {spent:>18} {best['engine'].cpu:7.2f} s {chosen:6} {best['plain'].cpu:6.2f} s"
                    f" {ratio:5.2f}x {other_text:>10} {other:6} {best['plain'].wall / best['engine'].wall:9.2f}x"
                    f" {os.getloadavg()[0]:5.1f}  {'; '.join(verdict) or 'ok'}",
                    flush=True,
                )
                if os.environ.get("BENCH_VERBOSE"):
                    print(f"       {runs['engine'][-1].note}")
    finally:
        crossover.measure = measure  # type: ignore[assignment]
        fresh.cleanup()
    print(f"load average now: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for miss in misses:
        print(miss)
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
