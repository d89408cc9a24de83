"""The on-disk cache of model plots (trainserve.serving.plot_cache): bounded, by model and size."""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainserve.serving.plot_cache import PlotCache

A, B, C = "a" * 32, "b" * 32, "c" * 32


def test_a_plot_comes_back_by_model_and_size_with_a_stable_etag(tmp_path: Path) -> None:
    cache = PlotCache(tmp_path / "plots")
    assert cache.get(A, (800, 600)) is None
    put = cache.put(A, (800, 600), "decision-regions", b"png one")
    got = cache.get(A, (800, 600))
    assert got is not None
    assert (got.kind, got.etag, got.read()) == ("decision-regions", put.etag, b"png one")
    assert cache.get(A, (400, 300)) is None
    assert cache.put(B, (800, 600), "fitted-curve", b"png two").etag != put.etag


def test_the_least_recently_used_go_first_and_a_deleted_model_s_plots_go(tmp_path: Path) -> None:
    cache = PlotCache(tmp_path, capacity=2)
    cache.put(A, (800, 600), "k", b"1")
    cache.put(B, (800, 600), "k", b"2")
    old = time.time() - 100
    for path in tmp_path.iterdir():  # both older than what comes next
        os.utime(path, (old, old))
    assert cache.get(A, (800, 600)) is not None  # A used again: B is now the oldest
    cache.put(C, (800, 600), "k", b"3")
    assert cache.get(B, (800, 600)) is None
    assert cache.get(A, (800, 600)) is not None
    cache.forget(A)
    assert cache.get(A, (800, 600)) is None
    assert [p.name[:32] for p in tmp_path.iterdir()] == [C]
