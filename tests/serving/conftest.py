"""Fixtures of the serving unit tests: a trained model to serve, trained once for the folder."""

from __future__ import annotations

import pytest

from tests.small_models import MoonsClassifier, train_moons_classifier


@pytest.fixture(scope="package")
def moons_classifier() -> MoonsClassifier:
    return train_moons_classifier()
