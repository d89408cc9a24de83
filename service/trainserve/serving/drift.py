"""Drift: how far the inputs a model has been receiving (the prediction log) moved from
the table it was trained on.

Per numeric feature, the population stability index over ten bins cut at the training
split's deciles: PSI = sum over bins of (actual - expected) * ln(actual / expected), each
share floored at 1e-4 so that an empty bin counts as very unlikely rather than infinite.
The common reading: below 0.1 stable, 0.1-0.2 moderate, above 0.2 a shift worth a look
(the default threshold). Also the share of missing values among the logged rows. Only
plain numbers reach a model today (the API refuses nulls and text), so categorical PSI and
the share of unseen categories have nothing to measure yet; see docs/shipping.md.

numpy only; the training split is the one ``training.loop.split_indices`` drew.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

N_BINS = 10
_FLOOR = 1e-4


@dataclass(frozen=True)
class Reference:
    """One feature's training distribution: the inner bin edges and each bin's share."""

    edges: np.ndarray
    expected: np.ndarray


def reference(values: np.ndarray, n_bins: int = N_BINS) -> Reference:
    quantiles = np.quantile(values.astype(np.float64), np.linspace(0, 1, n_bins + 1)[1:-1])
    edges = np.unique(quantiles)  # a feature with few distinct values has fewer bins
    return Reference(edges, _shares(values, edges))


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def psi(ref: Reference, values: np.ndarray) -> float:
    expected = np.maximum(ref.expected, _FLOOR)
    actual = np.maximum(_shares(values, ref.edges), _FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    missing_share: float
    drifted: bool


def measure(references: list[Reference], features: list[str], rows: np.ndarray, threshold: float) -> list[FeatureDrift]:
    """Drift of each feature of ``rows`` (logged inputs, one row each) against its reference."""
    out = []
    for j, (feature, ref) in enumerate(zip(features, references, strict=True)):
        column = rows[:, j] if len(rows) else np.empty(0)
        finite = np.isfinite(column)
        missing = float(1 - finite.mean()) if len(column) else 0.0
        score = psi(ref, column[finite]) if finite.any() else 0.0
        out.append(FeatureDrift(feature, score, missing, score > threshold))
    return out


class ReferenceCache:
    """Training distributions by model id: computed once per process (a model's training
    data never changes), at most ``capacity`` models."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: dict[str, list[Reference]] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> list[Reference] | None:
        return self._entries.get(model_id)

    def put(self, model_id: str, references: list[Reference]) -> None:
        with self._lock:
            if len(self._entries) >= self.capacity:
                self._entries.pop(next(iter(self._entries)))
            self._entries[model_id] = references


class TimedCache:
    """The last answer for a key, reused for ``ttl_s``: a Prometheus scrape every few
    seconds must not re-read the prediction log each time."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._value: object = None
        self._at = -float("inf")

    def fresh(self) -> object | None:
        return self._value if time.monotonic() - self._at < self.ttl_s else None

    def store(self, value: object) -> None:
        self._value, self._at = value, time.monotonic()
