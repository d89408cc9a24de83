"""Drift: how far the inputs a model has been receiving (the prediction log) moved from
the table it was trained on.

Per numeric feature, the population stability index over ten bins cut at the training
split's deciles: PSI = sum over bins of (actual - expected) * ln(actual / expected), each
share floored at 1e-4 so that an empty bin counts as very unlikely rather than infinite.
The common reading: below 0.1 stable, 0.1-0.2 moderate, above 0.2 a shift worth a look
(the default threshold). Also the share of missing values among the logged rows.

Per category feature (a ``training.features`` category: in the raw layout the level's index
in the vocabulary, NaN for a blank, -1 for a level never seen in training), the same PSI
over the levels instead of deciles: each level a bin, blank a bin of its own, and unseen a
bin whose training share is 0 (floored like any empty bin, so a few unseen values already
move the PSI). Also the share of unseen values among the logged rows.

numpy only; the training split is the one the model trained on (serving/monitoring.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

N_BINS = 10
_FLOOR = 1e-4


@dataclass(frozen=True)
class Reference:
    """One feature's training distribution: the inner bin edges and each bin's share. For a
    category, ``edges`` is empty and the bins are its ``levels`` levels, blank, unseen."""

    edges: np.ndarray
    expected: np.ndarray
    kind: Literal["number", "category"] = "number"
    levels: int = 0


def category_reference(codes: np.ndarray, levels: int) -> Reference:
    """A category's training distribution from its raw codes (``levels``: its vocabulary's size)."""
    return Reference(np.empty(0), _level_shares(codes, levels), "category", levels)


def _level_bins(codes: np.ndarray, levels: int) -> np.ndarray:
    """Raw codes -> bin numbers: a level its index, blank ``levels``, unseen ``levels + 1``."""
    codes = np.asarray(codes, dtype=np.float64)
    blank = np.isnan(codes)
    known = ~blank & (codes >= 0) & (codes < levels)
    bins = np.full(len(codes), levels + 1, dtype=np.int64)
    bins[blank] = levels
    bins[known] = codes[known].astype(np.int64)
    return bins


def _level_shares(codes: np.ndarray, levels: int) -> np.ndarray:
    counts = np.bincount(_level_bins(codes, levels), minlength=levels + 2)
    return counts / max(1, len(codes))


def reference(values: np.ndarray, n_bins: int = N_BINS) -> Reference:
    quantiles = np.quantile(values.astype(np.float64), np.linspace(0, 1, n_bins + 1)[1:-1])
    edges = np.unique(quantiles)  # a feature with few distinct values has fewer bins
    return Reference(edges, _shares(values, edges))


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def psi(ref: Reference, values: np.ndarray) -> float:
    """``values``: a number's present values, or a category's raw codes (blanks included)."""
    expected = np.maximum(ref.expected, _FLOOR)
    shares = _level_shares(values, ref.levels) if ref.kind == "category" else _shares(values, ref.edges)
    actual = np.maximum(shares, _FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    missing_share: float
    drifted: bool
    kind: Literal["number", "category"] = "number"
    unseen_share: float | None = None  # categories: share of logged rows with a level never seen in training


def measure(references: list[Reference], features: list[str], rows: np.ndarray, threshold: float) -> list[FeatureDrift]:
    """Drift of each feature of ``rows`` (logged inputs, one row each) against its reference."""
    out = []
    for j, (feature, ref) in enumerate(zip(features, references, strict=True)):
        column = rows[:, j] if len(rows) else np.empty(0)
        finite = np.isfinite(column)
        missing = float(1 - finite.mean()) if len(column) else 0.0
        if ref.kind == "category":
            # A blank is a level of its own here, so every logged row counts.
            score = psi(ref, column) if len(column) else 0.0
            unseen = float((_level_bins(column, ref.levels) == ref.levels + 1).mean()) if len(column) else 0.0
            out.append(FeatureDrift(feature, score, missing, score > threshold, "category", unseen))
            continue
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
