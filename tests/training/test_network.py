"""Unit tests for trainserve.training.network: every allow-listed building block builds and
trains, and the parameter count a spec is checked against is the built module's.

CPU only, tiny networks: the whole file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.small_models import allowed_types, fit, linear, moons, wave
from trainserve.training import loop, network
from trainserve.training import spec as S

# -- every allow-listed building block ----------------------------------------------------------------


@pytest.mark.parametrize("layer_type", allowed_types(S.Layer))
def test_every_allowed_layer_builds_and_trains(layer_type):
    x, y = moons()
    layer = linear(8) if layer_type == "Linear" else {"type": layer_type}
    _, _, result = fit(x, y, model=[linear(8), layer, linear(2)], epochs=1)
    assert [type(m).__name__ for m in result.module.net][1] == layer_type
    assert len(result.history) == 1
    assert math.isfinite(result.history[0].train_loss)


@pytest.mark.parametrize("loss_type", allowed_types(S.Loss))
def test_every_allowed_loss_builds_and_trains(loss_type):
    loss = S.TrainSpec.model_validate({"model": ["Tanh"], "loss": loss_type}).loss
    task = S.task_of(loss)
    if task == "regression":
        x, y = wave()
        width, metric = 1, "train_r2"
    else:
        x, y = moons()
        width, metric = (2 if task == "classification" else 1), "train_accuracy"
    _, plan, result = fit(x, y, model=[linear(8), "Tanh", linear(width)], loss=loss_type, epochs=1)
    assert plan.task == task
    assert type(loop.build_loss(loss)).__name__ == loss_type
    assert math.isfinite(result.history[0].train_loss)
    assert metric in result.metrics


@pytest.mark.parametrize("optimizer_type", allowed_types(S.Optimizer))
def test_every_allowed_optimizer_builds_and_updates_weights(optimizer_type):
    x, y = moons()
    spec, plan, result = fit(x, y, optimizer=optimizer_type, epochs=1)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        initial = network.TabularNet(spec.model, plan.in_features).net.state_dict()
    trained = result.module.net.state_dict()
    assert initial.keys() == trained.keys()
    assert all(not torch.equal(initial[k], trained[k]) for k in initial)
    assert type(loop.build_optimizer(spec.optimizer, result.module.parameters())).__name__ == optimizer_type


def test_allow_lists_are_complete():
    assert len(allowed_types(S.Layer)) == 14
    assert set(allowed_types(S.Loss)) == {
        "MSELoss",
        "L1Loss",
        "HuberLoss",
        "SmoothL1Loss",
        "CrossEntropyLoss",
        "BCEWithLogitsLoss",
    }
    assert set(allowed_types(S.Optimizer)) == {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad"}


def test_parameter_count_matches_the_built_module():
    spec = S.TrainSpec.model_validate(
        {
            "model": [
                linear(7),
                {"type": "BatchNorm1d"},
                "GELU",
                {"type": "Linear", "out_features": 5, "bias": False},
                {"type": "LayerNorm"},
                {"type": "BatchNorm1d", "affine": False},
                linear(3),
            ],
            "loss": "MSELoss",
        }
    )
    counted, width = S.count_parameters(spec.model, 4)
    built = network.build_sequential(spec.model, 4)
    assert counted == sum(p.numel() for p in built.parameters())
    assert width == 3 == built(torch.zeros(2, 4)).shape[1]
