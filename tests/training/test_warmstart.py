"""Warm starts in the training loop: a child continues its parent's loss, frozen layers stay
bit-identical, preprocessing statistics come from the parent unless refitted, and the
spec checks name what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.small_models import CLASSIFIER, fit, linear, moons
from trainserve.errors import InvalidInput
from trainserve.training import loop, warmstart
from trainserve.training import spec as S

PARENT_ID = "0" * 32


def _parent() -> tuple[np.ndarray, np.ndarray, loop.TrainedModel]:
    x, y = moons()
    _spec, _plan, parent = fit(x, y, epochs=25, seed=3)
    return x, y, parent


def _init(parent: loop.TrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in parent.module.state_dict().items()}


def test_a_warm_start_continues_where_the_parent_left_off_and_frozen_layers_stay_put() -> None:
    x, y, parent = _parent()
    first, last = parent.history[0].train_loss, parent.history[-1].train_loss
    assert last < first / 3  # the parent learned something to continue from

    _spec, _plan, child = fit(x, y, epochs=2, seed=4, init_from=PARENT_ID, init=_init(parent))
    _spec, _plan, cold = fit(x, y, epochs=2, seed=4)
    # Its first epoch starts from the parent's weights: near the parent's last loss, far below a cold start.
    assert child.history[0].train_loss < last * 2 + 0.05
    assert child.history[0].train_loss < cold.history[0].train_loss / 2
    assert any("warm start" in note for note in child.notes)

    _spec, _plan, frozen = fit(x, y, epochs=3, seed=4, init_from=PARENT_ID, freeze=[0, 2], init=_init(parent))
    before, after = parent.module.state_dict(), frozen.module.state_dict()
    for key in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["net.4.weight"], after["net.4.weight"])  # the free layer trained
    assert frozen.loop == "eager"


def test_preprocessing_statistics_come_from_the_parent_unless_refit() -> None:
    x, y, parent = _parent()
    shifted = x * 3 + 5  # new data, other statistics
    _spec, _plan, kept = fit(shifted, y, epochs=1, init_from=PARENT_ID, init=_init(parent))
    assert kept.input_mean == parent.input_mean
    assert kept.input_std == parent.input_std
    _spec, _plan, refit = fit(shifted, y, epochs=1, init_from=PARENT_ID, refit=True, init=_init(parent))
    assert refit.input_mean == pytest.approx(shifted.mean(axis=0).tolist(), rel=1e-4)


def test_the_checkpoint_fingerprint_includes_init_from() -> None:
    base = {"model": CLASSIFIER, "loss": "CrossEntropyLoss"}
    cold = S.TrainSpec.model_validate(base)
    warm = S.TrainSpec.model_validate({**base, "init_from": PARENT_ID})
    other = S.TrainSpec.model_validate({**base, "init_from": "1" * 32})
    prints = {loop._fingerprint(spec, 200, 2) for spec in (cold, warm, other)}
    assert len(prints) == 3


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"freeze": [0]}, ["freeze"]),  # without init_from
        ({"init_from": PARENT_ID, "freeze": [0, 2, 4]}, ["freeze"]),  # every layer with parameters
        ({"init_from": PARENT_ID, "freeze": [1]}, ["freeze", 0]),  # Tanh has none
        ({"init_from": PARENT_ID, "freeze": [0, 9]}, ["freeze", 1]),  # no such layer
    ],
)
def test_bad_freezes_are_refused_naming_the_field(change: dict[str, object], loc: list[object]) -> None:
    spec = S.TrainSpec.model_validate({"model": CLASSIFIER, "loss": "CrossEntropyLoss", **change})
    with pytest.raises(InvalidInput) as refused:
        warmstart.check_freeze(spec, 2)
    assert refused.value.errors[0]["loc"] == loc


def test_layers_must_match_the_parent_shape_for_shape() -> None:
    parent = S.TrainSpec.model_validate({"model": CLASSIFIER, "loss": "CrossEntropyLoss"}).model
    wider = S.TrainSpec.model_validate(
        {"model": [linear(32), "Tanh", linear(16), "Tanh", linear(2)], "loss": "CrossEntropyLoss"}
    ).model
    warmstart.check_layers(parent, parent, 2)
    with pytest.raises(InvalidInput) as refused:
        warmstart.check_layers(wider, parent, 2)
    assert refused.value.errors[0]["loc"] == ["model", 0]
    assert "[32, 2]" in refused.value.detail
    assert "[16, 2]" in refused.value.detail
