"""Load: hundreds of concurrent /predict calls while a worker trains, against a real server.

Every answer must equal the reference taken one call at a time beforehand, and the p99
latency while the worker trains on every core must stay within a small multiple of the
idle p99 measured in the same test (a ratio: the machine is shared and noisy).
bench/load.py prints the figures; this test asserts them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import measure
from tests.conftest import Server, start_server, stop_server

CALLS = 200
IN_FLIGHT = 25
# busy p99 / idle p99. With the worker training on one thread (the suite's default) the
# ratio was 0.99-1.23 and the bound 10: a large slow-down passed. With the worker on every
# core, measured 2026-11-30 on the 2-core shared machine (load average 13-17 from other
# test runs, so idle p99 itself was 1.8-7.7 s): 1.27, 1.64, 0.74, 1.02. The bound is about twice
# the worst ratio measured, as the noise of this machine allows: the API at nice 0 must
# keep its p99 while the worker keeps every core busy. The worker's default niceness then
# went from 10 to 5 (docs/performance-16.md), and a clean-clone CI run on a quiet machine
# measured 3.77 (idle p99 0.32 s, busy 1.19 s): the bound is 6, still well under the old
# 10. Re-measure on an idle machine (bench/load.py) before tightening it further.
MAX_P99_RATIO = 6.0


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[Server]:
    # One worker at the default niceness, training on every core: the conftest default of
    # one training thread left the other cores idle, so the API had them to itself.
    threads = str(os.cpu_count() or 1)
    running = start_server(tmp_path / "load", env={"TRAINSERVE_TRAIN_THREADS": threads})
    yield running
    stop_server(running)


def test_concurrent_predictions_stay_correct_and_fast_while_a_job_trains(loaded: Server) -> None:
    result = measure(loaded.url, requests=CALLS, concurrency=IN_FLIGHT)
    assert result.idle.wrong == []
    assert result.busy.wrong == []
    assert len(result.idle.latencies) == len(result.busy.latencies) == CALLS
    assert result.busy_job_still_running, "the load must overlap the training job"
    print(f"p99 idle {result.idle.p99 * 1000:.1f} ms, busy {result.busy.p99 * 1000:.1f} ms, ratio {result.ratio:.2f}")
    assert result.ratio < MAX_P99_RATIO, (result.idle.p99, result.busy.p99)
