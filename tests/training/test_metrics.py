"""The evaluation metrics agree with scikit-learn's on the same labels and scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from trainserve.training import metrics


def _probabilities(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    logits = rng.normal(size=(n, k))
    # A few exact ties, which the rank-based AUC must average as scikit-learn does.
    logits[: n // 10] = np.round(logits[: n // 10], 1)
    exp = np.exp(logits)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_classification_report_matches_scikit_learn(k: int) -> None:
    rng = np.random.default_rng(k)
    n = 400
    y = rng.integers(0, k, size=n)
    p = _probabilities(rng, n, k)
    p[y == 0, 0] += 0.5  # some signal, so the metrics are not all chance
    p /= p.sum(axis=1, keepdims=True)
    classes = [f"c{j}" for j in range(k)]

    report = metrics.classification_report(y, p, classes)

    pred = p.argmax(axis=1)
    labels = list(range(k))
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert report["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert report["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", labels=labels, zero_division=0))
    assert report["log_loss"] == pytest.approx(sk.log_loss(y, p, labels=labels))
    expected_auc = sk.roc_auc_score(y, p[:, 1]) if k == 2 else sk.roc_auc_score(y, p, multi_class="ovr")
    assert report["roc_auc"] == pytest.approx(expected_auc)
    assert report["confusion_matrix"] == sk.confusion_matrix(y, pred, labels=labels).tolist()
    precision, recall, f1, support = sk.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for j, name in enumerate(classes):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[j], recall[j], f1[j], support[j])
        )


def test_a_class_never_predicted_scores_zero_not_nan() -> None:
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    report = metrics.classification_report(y, p, [0, 1, 2])
    assert report["per_class"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["macro_f1"] == pytest.approx(sk.f1_score(y, p.argmax(1), average="macro", zero_division=0))


def test_auc_is_none_when_one_outcome_is_absent() -> None:
    assert metrics.roc_auc(np.array([True, True]), np.array([0.2, 0.9])) is None


def test_the_roc_curve_runs_from_origin_to_one_and_its_area_is_the_auc() -> None:
    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.3
    score = rng.random(300) + positive * 0.3
    fpr, tpr = metrics.roc_curve(positive, score)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(positive, score))


def test_expected_calibration_error_of_a_calibrated_and_an_overconfident_model() -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, size=20_000)
    correct = rng.random(20_000) < confidence  # right exactly as often as it claims
    y = np.where(correct, 0, 1)
    calibrated = np.stack([confidence, 1 - confidence], axis=1)
    assert metrics.expected_calibration_error(y, calibrated) < 0.02
    overconfident = np.stack([np.full(20_000, 0.99), np.full(20_000, 0.01)], axis=1)
    ece = metrics.expected_calibration_error(y, overconfident)
    assert ece == pytest.approx(0.99 - correct.mean(), abs=1e-9)


def test_the_regression_report_matches_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(200, 2))
    pred = truth + rng.normal(scale=0.3, size=(200, 2))
    report = metrics.regression_report(truth, pred)
    assert report["mae"] == pytest.approx(sk.mean_absolute_error(truth, pred))
    assert report["rmse"] == pytest.approx(sk.root_mean_squared_error(truth, pred))
    assert report["r2"] == pytest.approx(sk.r2_score(truth, pred))
    assert report["residuals"]["median"] == pytest.approx(float(np.median(pred - truth)))
    one = metrics.regression_report(truth[:, 0], pred[:, 0])
    assert one["r2"] == pytest.approx(sk.r2_score(truth[:, 0], pred[:, 0]))
