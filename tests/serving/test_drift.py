"""Drift figures in numpy (trainserve.serving.drift): PSI over a category's levels with blank
and unseen bins beside the numeric decile PSI, and the reference rows redrawn exactly as the
worker split them (serving.monitoring.trained_rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.training.test_features import LIMITS, make_spec, mixed_table
from trainserve.datasets.tables import Table
from trainserve.serving import drift, monitoring
from trainserve.training import features
from trainserve.training.spec import plan_training

NAN = math.nan


def _psi(expected: list[float], actual: list[float]) -> float:
    e, a = np.maximum(expected, 1e-4), np.maximum(actual, 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def test_category_psi_has_a_bin_per_level_one_for_blank_and_one_for_unseen() -> None:
    # Training: 3 levels (codes 0, 1, 2) and blanks; half level 0.
    training = np.array([0.0] * 5 + [1.0] * 2 + [2.0] * 2 + [NAN], dtype=np.float32)
    ref = drift.category_reference(training, 3)
    assert ref.kind == "category"
    assert ref.expected.tolist() == pytest.approx([0.5, 0.2, 0.2, 0.1, 0.0])  # levels, blank, unseen

    # Logged: level 2 took over, two blanks, two never-seen levels (-1).
    logged = np.array([2.0] * 4 + [0.0] * 2 + [NAN] * 2 + [-1.0] * 2)
    numbers = np.linspace(0, 1, 10)  # a numeric feature beside it, as its training had it
    rows = np.column_stack([numbers, logged])
    refs = [drift.reference(np.linspace(0, 1, 100)), ref]
    number, category = drift.measure(refs, ["x", "island"], rows, threshold=0.2)

    assert category.kind == "category"
    assert (category.unseen_share, category.missing_share) == pytest.approx((0.2, 0.2))
    assert category.psi == pytest.approx(_psi([0.5, 0.2, 0.2, 0.1, 0.0], [0.2, 0.0, 0.4, 0.2, 0.2]))
    assert category.drifted
    assert category.psi > 1.5  # the unseen bin alone adds 0.2 * ln(0.2 / 1e-4), about 1.5
    assert (number.kind, number.unseen_share) == ("number", None)
    assert not number.drifted

    same = drift.measure([ref], ["island"], training.reshape(-1, 1).astype(np.float64), threshold=0.2)[0]
    assert (same.psi, same.unseen_share, same.drifted) == (0.0, 0.0, False)


def test_a_level_code_outside_the_vocabulary_counts_as_unseen_and_an_empty_window_as_nothing() -> None:
    ref = drift.category_reference(np.array([0.0, 1.0]), 2)
    outside = drift.measure([ref], ["c"], np.array([[0.0], [7.0]]), threshold=0.2)[0]
    assert outside.unseen_share == 0.5
    empty = drift.measure([ref], ["c"], np.empty((0, 1)), threshold=0.2)[0]
    assert (empty.psi, empty.unseen_share, empty.missing_share, empty.drifted) == (0.0, 0.0, 0.0, False)


def test_the_reference_rows_are_the_rows_the_worker_trained_on() -> None:
    """Blank targets dropped, then a stratified split with a test share: redrawn from the spec
    and the classes, the same rows features.prepare encoded for training."""
    table = mixed_table(n=150)
    label = table.column("label").copy()
    label[[3, 7, 40]] = ""
    table = Table(table.names, [*table.columns[:3], label])
    spec = make_spec(target="label", split={"validation": 0.2, "test": 0.1, "stratify": True})
    plan = plan_training(spec, table.schema(), LIMITS)
    ready = features.prepare(table, spec, plan, LIMITS)

    rows = monitoring.trained_rows(table, spec, plan.features, plan.targets, plan.task, plan.classes)
    assert len(rows) == len(ready.split.train)
    assert not set(rows.tolist()) & {3, 7, 40}
    np.testing.assert_array_equal(features.encode_table(ready.features, table, rows), ready.x[ready.split.train])
