"""Benchmark: the prediction log writer's CPU per entry, by batch size, with and without a shadow.

The log's thread runs in the API process, so its CPU is taken from requests. This times
``PredictionLog._write`` (one transaction per call) on a real SQLite file with one-row
entries of the moons classifier, written 1, 8 or 64 to a batch, and prints the thread's CPU
milliseconds per entry and its ratio to one entry a batch (what the writer did before it
lingered for a batch, serving/predlog.py ``_LINGER_S``).

    .venv/bin/python bench/predlog_writer.py [--entries 640]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.small_models import save_and_load, train_moons_classifier  # noqa: E402
from trainserve.db import make_engine, make_session_factory, upgrade_to_head  # noqa: E402
from trainserve.serving.predlog import LogSettings, PredictionLog, _Entry  # noqa: E402

BATCHES = (1, 8, 64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=640, help="entries written per configuration")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="trainserve-bench-"))
    url = f"sqlite:///{folder / 'log.db'}"
    upgrade_to_head(url)
    x, _, spec, plan, result = train_moons_classifier()
    predictor = save_and_load(folder, spec, plan, result)
    sessions = make_session_factory(make_engine(url))
    settings = LogSettings(sample=1.0, buffer=10_000, max_rows=1_000_000, max_age_s=3600, prune_interval_s=3600)
    row = x[:1].copy()
    answer = predictor.infer(row).predictions

    def cpu_ms_per_entry(shadow: bool, batch: int, entries: int) -> float:
        log = PredictionLog(sessions, settings, shadow=(lambda name: predictor) if shadow else None)
        todo = [_Entry("a" * 32, "moons", 1, row, answer, time.time(), True) for _ in range(entries)]
        started = time.thread_time()
        for i in range(0, entries, batch):
            log._write(todo[i : i + batch])
        return 1000 * (time.thread_time() - started) / entries

    print(f"load average {os.getloadavg()[0]:.2f}; {args.entries} one-row entries per line, SQLite in {folder}")
    print(f"{'shadow':<8}{'batch':>6}{'CPU ms/entry':>14}{'vs batch 1':>12}")
    for shadow in (False, True):
        first = None
        for batch in BATCHES:
            cpu_ms_per_entry(shadow, batch, min(64, args.entries))  # warm: statement caches, shadow path
            figure = cpu_ms_per_entry(shadow, batch, args.entries)
            first = first or figure
            print(f"{'yes' if shadow else 'no':<8}{batch:>6}{figure:>14.3f}{figure / first:>12.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
