"""Evaluation metrics over a whole split, in numpy: what a careful person reads before shipping.

Computed once, after training or when a model is evaluated on another table; the
per-epoch validation inside the loop stays cheap (loss and accuracy on the device).
Pure numpy with no scikit-learn at run time: the formulas are short and standard, and
tests/training/test_metrics.py checks each against scikit-learn's.

Labels arrive as class indices (0..k-1, in the model's class order) and scores as
probabilities ``[n, k]``; results are JSON-ready (floats, lists, str keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_EPS = 1e-15  # log loss clips probabilities to [eps, 1 - eps], as scikit-learn does
CALIBRATION_BINS = 10


def _safe_div(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise a / b, 0 where b is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts, ``n_classes`` square."""
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (the Mann-Whitney convention)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Runs of equal values share the mean of the ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the boolean ``positive``; None when one
    side is empty (the area is undefined)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    sorted_score = np.asarray(score, dtype=np.float64)[order]
    hits = positive[order]
    last_of_run = np.r_[sorted_score[1:] != sorted_score[:-1], True]
    tp = np.cumsum(hits)[last_of_run]
    fp = np.cumsum(~hits)[last_of_run]
    n_pos, n_neg = max(int(positive.sum()), 1), max(len(positive) - int(positive.sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def log_loss(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped, rows renormalised)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1 - _EPS)
    p /= p.sum(axis=1, keepdims=True)
    return float(-np.log(p[np.arange(len(p)), np.asarray(y_true, dtype=np.int64)]).mean())


def calibration_bins(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> list[dict[str, float]]:
    """The top-label reliability diagram: per equal-width confidence bin with rows in it,
    its mean confidence, its accuracy and its row count."""
    confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
    correct = np.asarray(probabilities).argmax(axis=1) == np.asarray(y_true)
    # Bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 (impossible for a top label) joins bin 0.
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        if count:
            bins.append(
                {
                    "lower": i / n_bins,
                    "upper": (i + 1) / n_bins,
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": count,
                }
            )
    return bins


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = CALIBRATION_BINS) -> float:
    """ECE: the row-weighted mean gap between confidence and accuracy over the bins."""
    n = len(y_true)
    bins = calibration_bins(y_true, probabilities, n_bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / max(n, 1))


def _label(value: Any) -> str:
    return str(value)


def classification_report(y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[Any]) -> dict[str, Any]:
    """Every classifier metric for true class indices and predicted probabilities ``[n, k]``.

    ``roc_auc`` is the positive class's for two classes and the macro one-vs-rest mean
    otherwise (over classes present with both outcomes; None when there are none), as
    scikit-learn's ``roc_auc_score(multi_class="ovr")``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = len(classes)
    if probabilities.ndim != 2 or probabilities.shape != (len(y_true), k):
        raise ValueError(f"probabilities must be [{len(y_true)}, {k}], got {list(probabilities.shape)}")
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, k)
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    precision = _safe_div(true_positive, predicted)
    recall = _safe_div(true_positive, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0
    if k == 2:
        auc = roc_auc(y_true == 1, probabilities[:, 1])
    else:
        areas = [roc_auc(y_true == j, probabilities[:, j]) for j in range(k)]
        defined = [a for a in areas if a is not None]
        auc = float(np.mean(defined)) if defined else None
    return {
        "n": len(y_true),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else math.nan,
        # Over the classes that occur in y_true, as scikit-learn's balanced_accuracy_score.
        "balanced_accuracy": float(recall[present].mean()) if present.any() else math.nan,
        # Over every class, as scikit-learn's f1_score(average="macro", labels=all classes).
        "macro_f1": float(f1.mean()),
        "roc_auc": auc,
        "log_loss": log_loss(y_true, probabilities),
        "expected_calibration_error": expected_calibration_error(y_true, probabilities),
        "per_class": {
            _label(c): {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "support": int(support[j]),
            }
            for j, c in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "classes": [c if isinstance(c, int | str) else _label(c) for c in classes],
    }


def regression_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE and R² (averaged over targets, as scikit-learn's uniform_average), and the
    residuals' summary (y_pred - y_true: mean, std and quantiles)."""
    truth = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if truth.shape != pred.shape:
        raise ValueError(f"y_true {list(truth.shape)} and y_pred {list(pred.shape)} differ in shape")
    residual = pred - truth
    mse = (residual**2).mean(axis=0)
    variance = ((truth - truth.mean(axis=0)) ** 2).mean(axis=0)
    # A constant target: R² is 1 for a perfect fit and 0 otherwise (scikit-learn's convention).
    r2 = np.where(variance > 0, 1 - _safe_div(mse, variance), np.where(mse == 0, 1.0, 0.0))
    quantiles = np.quantile(residual, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {
        "n": len(truth),
        "mae": float(np.abs(residual).mean()),
        "rmse": float(np.sqrt(mse).mean()),
        "mse": float(mse.mean()),
        "r2": float(r2.mean()),
        "residuals": {
            "mean": float(residual.mean()),
            "std": float(residual.std()),
            "min": float(quantiles[0]),
            "p05": float(quantiles[1]),
            "p25": float(quantiles[2]),
            "median": float(quantiles[3]),
            "p75": float(quantiles[4]),
            "p95": float(quantiles[5]),
            "max": float(quantiles[6]),
        },
    }
