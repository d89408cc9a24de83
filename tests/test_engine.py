"""Unit tests for trainserve.training (building, training, metrics) and trainserve.serving.predictor.

CPU only, tiny networks, a few hundred rows: the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
import typing
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from trainserve.datasets.tables import Table
from trainserve.errors import CheckpointMismatch, InvalidInput, PayloadTooLarge, TrainingDiverged
from trainserve.examples import make_moons, make_wave
from trainserve.serving.predictor import Predictor, inputs_to_matrix
from trainserve.storage.base import new_id
from trainserve.storage.local import LocalStore
from trainserve.training import loop as engine
from trainserve.training import native, network
from trainserve.training import spec as S

LIMITS = S.Limits(max_epochs=1_000, max_parameters=1_000_000, max_layer_width=1_024)


def linear(width: int) -> dict[str, Any]:
    return {"type": "Linear", "out_features": width}


CLASSIFIER = [linear(16), "Tanh", linear(16), "Tanh", linear(2)]


def allowed_types(union: Any) -> list[str]:
    """The ``type`` names of the pydantic models in one of spec.py's discriminated unions."""
    members = typing.get_args(typing.get_args(union)[0])  # Annotated[Union[...], Field] -> the models
    return [typing.get_args(m.model_fields["type"].annotation)[0] for m in members]


def moons(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_moons(n, noise=0.1, seed=0)
    return x.astype(np.float32), y


def wave(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_wave(n, seed=0)
    return x.astype(np.float32), y


def plan_for(spec: S.TrainSpec, x: np.ndarray, y: np.ndarray) -> S.TrainingPlan:
    """Plan against the schema of a table with columns x0..xn and "label"."""
    names = [f"x{j}" for j in range(x.shape[1])]
    table = Table([*names, "label"], [*(x[:, j] for j in range(x.shape[1])), y])
    return S.plan_training(spec, table.schema(), LIMITS)


TRAIN_KWARGS = (
    "on_epoch",
    "should_stop",
    "check_every_s",
    "resume",
    "on_checkpoint",
    "checkpoint_every_s",
    "should_preempt",
)


def fit(x: np.ndarray, y: np.ndarray, **fields: Any) -> tuple[S.TrainSpec, S.TrainingPlan, engine.TrainedModel]:
    """Parse a spec (CPU, Adam, a two-class classifier unless ``fields`` say otherwise), plan it, train it."""
    base: dict[str, Any] = {
        "model": CLASSIFIER,
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "Adam", "lr": 0.05},
        "epochs": 30,
        "batch_size": 32,
        "device": "cpu",
    }
    train_kwargs = {k: fields.pop(k) for k in TRAIN_KWARGS if k in fields}
    spec = S.TrainSpec.model_validate({**base, **fields})
    plan = plan_for(spec, x, y)
    return spec, plan, engine.train(spec, plan, x, y, **train_kwargs)


def predict_raw(module: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return module(torch.from_numpy(x))


def save_and_load(tmp_path, spec: S.TrainSpec, plan: S.TrainingPlan, result: engine.TrainedModel) -> Predictor:
    store = LocalStore(tmp_path / "store")
    store.ensure()
    model_id = new_id()
    sha256, _ = store.save_weights(model_id, result.module.state_dict(), {"trainserve_model_id": model_id})
    record = SimpleNamespace(
        id=model_id,
        weights_sha256=sha256,
        spec=spec.model_dump(mode="json"),
        features=plan.features,
        targets=plan.targets,
        task=plan.task,
        classes=plan.classes,
        name=None,
        version=None,
    )
    return Predictor.load(store, record)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def moons_classifier():
    x, y = moons()
    labels = np.where(y == 1, "inner", "outer")
    spec, plan, result = fit(x, labels)
    return x, labels, spec, plan, result


# -- training ------------------------------------------------------------------------------------


def test_adam_learns_moons(moons_classifier):
    x, labels, _, plan, result = moons_classifier
    assert plan.classes == ["inner", "outer"]
    assert result.device == "cpu"
    assert len(result.history) == 30
    assert result.history[-1].train_loss < result.history[0].train_loss / 5
    assert result.metrics["train_accuracy"] >= 0.95
    # The returned module scales raw inputs itself: it classifies the unscaled rows too.
    predicted = predict_raw(result.module, x).argmax(dim=1).numpy()
    assert np.mean(np.asarray(plan.classes)[predicted] == labels) >= 0.95
    assert not result.module.training


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    x, y = moons()
    fields = {
        "model": [linear(8), {"type": "Dropout", "p": 0.2}, "ReLU", linear(2)],
        "epochs": 3,
        "validation_split": 0.25,
        "shuffle": True,
    }
    first = fit(x, y, seed=7, **fields)[2].module.state_dict()
    again = fit(x, y, seed=7, **fields)[2].module.state_dict()
    other = fit(x, y, seed=8, **fields)[2].module.state_dict()

    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_training_does_not_disturb_the_global_torch_rng():
    x, y = moons()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(x, y, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_standardize_stores_training_set_mean_and_std():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(10, 2, 200), rng.normal(-500, 50, 200)]).astype(np.float32)
    y = (x[:, 0] > 10).astype(np.int64)
    spec, _, result = fit(x, y, epochs=1, validation_split=0.25)

    train_rows, _ = engine.split_indices(len(x), spec.validation_split, spec.seed)
    expected_mean = x[train_rows].mean(axis=0, dtype=np.float64)
    expected_std = x[train_rows].std(axis=0, dtype=np.float64)
    scaler = result.module.scaler
    np.testing.assert_allclose(scaler.mean.numpy(), expected_mean, rtol=1e-6)
    np.testing.assert_allclose(scaler.std.numpy(), expected_std, rtol=1e-6)
    assert result.input_mean == scaler.mean.tolist()
    assert result.input_std == scaler.std.tolist()
    assert "scaler.mean" in result.module.state_dict()  # saved with the weights


def test_standardize_off_leaves_inputs_unscaled():
    x, y = moons()
    _, _, result = fit(x, y, epochs=1, standardize=False)
    assert result.input_mean is None
    assert result.input_std is None
    assert torch.equal(result.module.scaler.mean, torch.zeros(2))
    assert torch.equal(result.module.scaler.std, torch.ones(2))


def test_constant_feature_is_centred_not_divided_by_zero():
    x, y = moons()
    x = np.column_stack([x, np.full(len(x), 3.0, dtype=np.float32)])
    _, _, result = fit(x, y, epochs=2, model=[linear(8), "Tanh", linear(2)])
    assert result.module.scaler.mean[2] == 3.0
    assert result.module.scaler.std[2] == 1.0
    assert math.isfinite(result.metrics["train_loss"])


def test_validation_split_reports_classification_metrics():
    x, y = moons()
    reports: list[engine.EpochReport] = []
    _, _, result = fit(x, y, epochs=5, validation_split=0.2, on_epoch=reports.append)

    assert set(result.metrics) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert reports == result.history
    assert [r.epoch for r in reports] == [1, 2, 3, 4, 5]
    assert all(r.val_loss is not None and set(r.val_metrics) == {"accuracy"} for r in reports)


def test_no_validation_split_means_no_validation_metrics():
    x, y = moons()
    _, _, result = fit(x, y, epochs=2)
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert all(r.val_loss is None and r.val_metrics is None for r in result.history)


def test_regression_on_wave_reduces_mse():
    x, y = wave()
    _, plan, result = fit(x, y, model=[linear(16), "Tanh", linear(1)], loss="MSELoss", epochs=40, validation_split=0.2)
    assert plan.task == "regression"
    assert set(result.metrics) == {
        "train_loss",
        "train_mse",
        "train_mae",
        "train_r2",
        "val_loss",
        "val_mse",
        "val_mae",
        "val_r2",
    }
    assert result.history[-1].train_loss < result.history[0].train_loss / 10
    assert result.metrics["val_mse"] == pytest.approx(result.metrics["val_loss"])
    assert result.metrics["train_r2"] > 0.8
    assert result.metrics["val_r2"] > 0.7
    assert set(result.history[-1].val_metrics) == {"mse", "mae", "r2"}


def test_binary_cross_entropy_with_string_labels():
    x, y = moons()
    labels = np.where(y == 1, "yes", "no")
    _, plan, result = fit(x, labels, model=[linear(16), "Tanh", linear(1)], loss="BCEWithLogitsLoss")
    assert plan.task == "binary"
    assert plan.classes == ["no", "yes"]
    assert result.metrics["train_accuracy"] >= 0.9
    logits = predict_raw(result.module, x)[:, 0].numpy()
    assert np.mean(np.where(logits > 0, "yes", "no") == labels) >= 0.9


def test_should_stop_true_cancels_training():
    x, y = moons()
    asked: list[int] = []
    reports: list[engine.EpochReport] = []

    def should_stop() -> bool:
        asked.append(1)
        return True

    with pytest.raises(engine.TrainingCancelled):
        fit(x, y, epochs=50, should_stop=should_stop, check_every_s=0.0, on_epoch=reports.append)
    assert len(asked) == 1
    assert reports == []  # stopped inside the first epoch


def test_should_stop_false_lets_training_finish():
    x, y = moons()
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return False

    _, _, result = fit(x, y, epochs=2, should_stop=should_stop, check_every_s=0.0)
    assert len(result.history) == 2
    assert len(asked) >= 2


def test_huge_learning_rate_raises_training_diverged():
    x, y = wave()
    with pytest.raises(TrainingDiverged, match="smaller learning rate"):
        fit(x, y, model=[linear(1)], loss="MSELoss", optimizer={"type": "SGD", "lr": 1e10}, epochs=5)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batchnorm_trains_when_the_last_batch_would_hold_one_row(shuffle):
    x, y = moons(65)  # 65 = 2 * 32 + 1
    model = [linear(8), {"type": "BatchNorm1d"}, "ReLU", linear(2)]
    _, _, result = fit(x, y, model=model, batch_size=32, epochs=2, shuffle=shuffle)
    assert len(result.history) == 2
    assert math.isfinite(result.history[-1].train_loss)


# -- checkpoints: resuming is bit for bit ------------------------------------------------------------

# Every piece of state a checkpoint must carry: Dropout (global RNG), shuffling (its generator),
# Adam's moments and step count, a scheduler, clipping, validation and early stopping.
RESUMABLE: dict[str, Any] = {
    "model": [linear(16), {"type": "Dropout", "p": 0.2}, "Tanh", linear(2)],
    "optimizer": {"type": "Adam", "lr": 0.02},
    "scheduler": {"type": "StepLR", "step_size": 2, "gamma": 0.5},
    "clip_grad_norm": 1.0,
    "validation_split": 0.2,
    "epochs": 5,
    "batch_size": 16,
}


def through_files(checkpoint: engine.Checkpoint, tmp_path) -> engine.Checkpoint:
    """Store a checkpoint the way the jobs module does (safetensors + strict JSON) and load it back."""
    path = tmp_path / f"checkpoint-{new_id()}.safetensors"
    save_file(checkpoint.tensors, path)
    meta = json.loads(json.dumps(checkpoint.meta, allow_nan=False))
    return engine.Checkpoint(checkpoint.epoch, load_file(path), meta)


def assert_same_run(a: engine.TrainedModel, b: engine.TrainedModel) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert a.history == b.history
    assert a.metrics == b.metrics


def test_resuming_from_any_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    x, y = moons()
    taken: list[engine.Checkpoint] = []
    _, _, whole = fit(x, y, **RESUMABLE, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    mid_epoch = [c for c in taken if c.meta["step"] > 0 and 0 < c.epoch < 4]
    between = [c for c in taken if c.meta["step"] == 0 and c.epoch == 3]
    assert mid_epoch
    assert between
    for checkpoint in (mid_epoch[len(mid_epoch) // 2], between[0], taken[0], taken[-1]):
        _, _, resumed = fit(x, y, **RESUMABLE, resume=through_files(checkpoint, tmp_path))
        assert_same_run(whole, resumed)
        assert any("resumed from a checkpoint" in note for note in resumed.notes)


def test_preemption_checkpoints_then_raises_and_the_run_resumes(tmp_path):
    x, y = moons()
    _, _, whole = fit(x, y, **RESUMABLE)
    polls: list[int] = []
    handed: list[engine.Checkpoint] = []

    def should_preempt() -> bool:
        polls.append(1)
        return len(polls) == 30  # inside epoch 3 (10 batches an epoch, plus one poll at each epoch's end)

    with pytest.raises(engine.TrainingPreempted) as info:
        fit(x, y, **RESUMABLE, should_preempt=should_preempt, on_checkpoint=handed.append, check_every_s=0.0)
    assert handed == [info.value.checkpoint]
    checkpoint = info.value.checkpoint
    assert checkpoint.epoch == 2
    assert checkpoint.meta["step"] > 0
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in checkpoint.tensors.values())
    _, _, resumed = fit(x, y, **RESUMABLE, resume=through_files(checkpoint, tmp_path))
    assert_same_run(whole, resumed)


@pytest.mark.parametrize("optimizer", [*allowed_types(S.Optimizer), "SGD-momentum"])
def test_every_optimizer_resumes_bit_for_bit(tmp_path, optimizer):
    x, y = moons(120)
    fields: dict[str, Any] = {**RESUMABLE, "epochs": 2, "scheduler": None}
    fields["optimizer"] = (
        {"type": "SGD", "momentum": 0.9, "nesterov": True} if optimizer == "SGD-momentum" else optimizer
    )
    taken: list[engine.Checkpoint] = []
    _, _, whole = fit(x, y, **fields, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    _, _, resumed = fit(x, y, **fields, resume=through_files(taken[len(taken) // 2], tmp_path))
    assert_same_run(whole, resumed)


def test_plateau_scheduler_and_early_stopping_state_survive_a_checkpoint(tmp_path):
    x, y = moons()
    fields: dict[str, Any] = {
        **RESUMABLE,
        "epochs": 40,
        "optimizer": {"type": "SGD", "lr": 0.5, "momentum": 0.9},
        "scheduler": {"type": "ReduceLROnPlateau", "patience": 1, "factor": 0.5},
        "early_stopping": {"patience": 3},
    }
    taken: list[engine.Checkpoint] = []
    _, _, whole = fit(x, y, **fields, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    assert whole.stopped_epoch is not None
    assert whole.stopped_epoch < 40
    for checkpoint in (taken[len(taken) // 3], taken[-2]):
        _, _, resumed = fit(x, y, **fields, resume=through_files(checkpoint, tmp_path))
        assert_same_run(whole, resumed)
        assert resumed.stopped_epoch == whole.stopped_epoch
        assert resumed.best_epoch == whole.best_epoch


def test_a_checkpoint_of_another_spec_is_refused():
    x, y = moons()
    taken: list[engine.Checkpoint] = []
    fit(x, y, epochs=1, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    with pytest.raises(CheckpointMismatch):
        fit(x, y, epochs=1, batch_size=8, resume=taken[0])


def test_checkpoints_come_no_more_often_than_asked():
    x, y = moons()
    taken: list[engine.Checkpoint] = []
    fit(x, y, epochs=3, on_checkpoint=taken.append, checkpoint_every_s=3600.0)
    assert taken == []
    fit(x, y, epochs=3, compile="off", on_checkpoint=taken.append, checkpoint_every_s=0.0)
    assert len(taken) == 3 * (7 + 1)  # after each of 7 eager batches an epoch, and at each epoch's end


# -- schedulers, early stopping, clipping, Dropout and BatchNorm ------------------------------------------


def final_lr(x: np.ndarray, y: np.ndarray, **fields: Any) -> float:
    taken: list[engine.Checkpoint] = []
    fit(x, y, **fields, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    return float(taken[-1].meta["optimizer"]["param_groups"][0]["lr"])


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ({"type": "StepLR", "step_size": 2, "gamma": 0.5}, 0.1 * 0.5**3),  # after 6 epochs: 3 decays
        ({"type": "MultiStepLR", "milestones": [1, 4], "gamma": 0.1}, 0.1 * 0.01),
        ({"type": "ExponentialLR", "gamma": 0.9}, 0.1 * 0.9**6),
        ({"type": "CosineAnnealingLR", "T_max": 6}, 0.0),
        ({"type": "LinearLR", "start_factor": 0.5, "total_iters": 4}, 0.1),
    ],
)
def test_schedulers_step_once_an_epoch_like_torch(scheduler, expected):
    x, y = moons(64)
    lr = final_lr(x, y, epochs=6, optimizer={"type": "SGD", "lr": 0.1}, scheduler=scheduler)
    assert lr == pytest.approx(expected, abs=1e-12)


def test_reduce_on_plateau_watches_the_training_loss_without_a_validation_split():
    x, y = moons(64)
    # lr 0 never improves the loss: every epoch past the patience halves the rate.
    fields = {"optimizer": {"type": "SGD", "lr": 1e-30}, "epochs": 4}
    scheduler = {"type": "ReduceLROnPlateau", "patience": 0, "factor": 0.5, "threshold": 0.5}
    assert final_lr(x, y, **fields, scheduler=scheduler) == pytest.approx(1e-30 * 0.5**3)


@pytest.mark.parametrize(
    ("scheduler", "loc"),
    [
        ({"type": "CyclicLR"}, ("scheduler",)),
        ({"type": "StepLR"}, ("scheduler", "StepLR", "step_size")),
        ({"type": "StepLR", "step_size": 0}, ("scheduler", "StepLR", "step_size")),
        ({"type": "MultiStepLR", "milestones": [5, 2]}, ("scheduler", "MultiStepLR", "milestones")),
        ({"type": "ReduceLROnPlateau", "factor": 1.5}, ("scheduler", "ReduceLROnPlateau", "factor")),
        ({"type": "ExponentialLR", "gamma": 0.9, "verbose": True}, ("scheduler", "ExponentialLR", "verbose")),
    ],
)
def test_bad_schedulers_are_refused_naming_the_field(scheduler, loc):
    with pytest.raises(ValidationError) as info:
        S.TrainSpec.model_validate({"model": [linear(2)], "loss": "MSELoss", "scheduler": scheduler})
    assert info.value.errors()[0]["loc"] == loc


def test_early_stopping_needs_a_validation_split():
    x, y = moons()
    spec = S.TrainSpec.model_validate({"model": CLASSIFIER, "loss": "CrossEntropyLoss", "early_stopping": {}})
    with pytest.raises(InvalidInput) as info:
        plan_for(spec, x, y)
    assert info.value.errors[0]["loc"] == ["early_stopping"]
    assert "validation_split" in info.value.detail


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_weights():
    x, y = moons()
    fields: dict[str, Any] = {
        "epochs": 200,
        "optimizer": {"type": "Adam", "lr": 0.05},
        "validation_split": 0.3,
        "early_stopping": {"patience": 3, "min_delta": 0.001},
    }
    _, _, result = fit(x, y, **fields)
    assert result.stopped_epoch is not None
    assert result.best_epoch is not None
    assert len(result.history) == result.stopped_epoch < 200
    assert result.stopped_epoch - result.best_epoch >= 3
    best = result.history[result.best_epoch - 1]
    # No later epoch beat the best by min_delta; the best beat every earlier one.
    assert all(r.val_loss > best.val_loss - 0.001 for r in result.history[result.best_epoch :])
    assert all(r.val_loss > best.val_loss for r in result.history[: result.best_epoch - 1])
    assert result.metrics["val_loss"] == pytest.approx(best.val_loss, rel=1e-6)  # the saved weights are the best's
    assert any(f"best epoch {result.best_epoch}" in note for note in result.notes)

    fields["early_stopping"] = {"patience": 3, "min_delta": 0.001, "restore_best_weights": False}
    _, _, last = fit(x, y, **fields)
    assert last.stopped_epoch == result.stopped_epoch
    assert last.metrics["val_loss"] == pytest.approx(last.history[-1].val_loss, rel=1e-6)


def test_clip_grad_norm_bounds_every_update():
    x, y = wave(64)
    fields: dict[str, Any] = {
        "model": [linear(8), "Tanh", linear(1)],
        "loss": "MSELoss",
        "optimizer": {"type": "SGD", "lr": 1.0},
        "epochs": 1,
        "batch_size": 64,  # one step: the change in weights is lr * the clipped gradient
        "standardize": False,
    }
    spec, plan, result = fit(x, y, **fields, clip_grad_norm=0.01)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        initial = network.TabularNet(spec.model, plan.in_features).net.state_dict()
    trained = result.module.net.state_dict()
    change = torch.sqrt(sum(((trained[k] - initial[k]) ** 2).sum() for k in initial))
    assert 0 < float(change) <= 0.01 * 1.0001
    _, _, unclipped = fit(x, y, **fields)
    free = unclipped.module.net.state_dict()
    assert float(torch.sqrt(sum(((free[k] - initial[k]) ** 2).sum() for k in initial))) > 0.1


def test_dropout_is_off_when_evaluating_and_predicting():
    x, y = moons()
    model = [linear(32), {"type": "Dropout", "p": 0.5}, "ReLU", linear(2)]
    _, _, result = fit(x, y, model=model, epochs=20, validation_split=0.2)
    assert result.metrics["train_accuracy"] > 0.9
    assert torch.equal(predict_raw(result.module, x), predict_raw(result.module, x))
    # A train-mode pass drops units: the answers differ from the saved model's.
    result.module.train()
    with torch.no_grad():
        assert not torch.equal(result.module(torch.from_numpy(x)), predict_raw(result.module.eval(), x))


def test_batchnorm_learns_running_statistics_and_predicts_single_rows():
    x, y = moons()
    model = [linear(16), {"type": "BatchNorm1d"}, "ReLU", linear(2)]
    _, _, result = fit(x, y, model=model, epochs=10)
    norm = result.module.net[1]
    assert not torch.equal(norm.running_mean, torch.zeros(16))
    assert int(norm.num_batches_tracked) == 10 * 7
    batch = predict_raw(result.module, x)
    one_by_one = torch.cat([predict_raw(result.module, x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(one_by_one, batch[:5])
    assert result.metrics["train_accuracy"] > 0.9


def test_batchnorm_with_batch_size_one_is_refused_at_submit():
    x, y = moons()
    spec = S.TrainSpec.model_validate(
        {"model": [linear(8), {"type": "BatchNorm1d"}, linear(2)], "loss": "CrossEntropyLoss", "batch_size": 1}
    )
    with pytest.raises(InvalidInput) as info:
        plan_for(spec, x, y)
    assert info.value.errors[0]["loc"] == ["batch_size"]
    assert "BatchNorm1d" in info.value.detail


# -- the native loop: generated C for the whole step ---------------------------------------------------

NATIVE_OPTIMIZERS = [
    "SGD",
    {"type": "SGD", "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"type": "SGD", "momentum": 0.9, "nesterov": True},
    "Adam",
    {"type": "Adam", "amsgrad": True, "weight_decay": 0.01},
    {"type": "AdamW", "amsgrad": True},
    "RMSprop",
    {"type": "RMSprop", "momentum": 0.5, "centered": True, "weight_decay": 0.1},
    {"type": "Adagrad", "lr_decay": 0.01, "weight_decay": 0.1},
]


def native_and_eager(x: np.ndarray, y: np.ndarray, **fields: Any) -> tuple[engine.TrainedModel, engine.TrainedModel]:
    _, _, fast = fit(x, y, **fields)
    _, _, slow = fit(x, y, **fields, compile="off")
    assert fast.loop == "native", fast.notes
    assert slow.loop == "eager"
    return fast, slow


def assert_close_runs(fast: engine.TrainedModel, slow: engine.TrainedModel, tolerance: float = 1e-5) -> None:
    a, b = fast.module.state_dict(), slow.module.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tolerance, atol=tolerance)
    for r, s in zip(fast.history, slow.history, strict=True):
        assert r.train_loss == pytest.approx(s.train_loss, rel=tolerance, abs=tolerance)


@pytest.mark.parametrize("optimizer", NATIVE_OPTIMIZERS, ids=lambda o: o if isinstance(o, str) else str(o)[:60])
def test_native_loop_matches_eager_torch_for_every_optimizer(optimizer):
    x, y = moons(120)
    fields = {"optimizer": optimizer, "epochs": 3, "batch_size": 8, "clip_grad_norm": 0.5}
    assert_close_runs(*native_and_eager(x, y, **fields))


@pytest.mark.parametrize("layer", [t for t in allowed_types(S.Layer) if t in native.ACTIVATIONS])
def test_native_loop_matches_eager_torch_for_every_activation(layer):
    x, y = moons(120)
    extra = [{"type": "GELU", "approximate": "tanh"}] if layer == "GELU" else []
    model = [linear(8), {"type": layer}, *extra, linear(8), {"type": layer}, linear(2)]
    assert_close_runs(*native_and_eager(x, y, model=model, epochs=3, batch_size=4))


@pytest.mark.parametrize("loss", [*allowed_types(S.Loss), "SmoothL1Loss-beta0", "CrossEntropyLoss-smoothed"])
def test_native_loop_matches_eager_torch_for_every_loss(loss):
    spec_loss: Any = {
        "SmoothL1Loss-beta0": {"type": "SmoothL1Loss", "beta": 0.0},
        "CrossEntropyLoss-smoothed": {"type": "CrossEntropyLoss", "label_smoothing": 0.1},
    }.get(loss, loss)
    task = S.task_of(S.TrainSpec.model_validate({"model": ["Tanh"], "loss": spec_loss}).loss)
    if task == "regression":
        x, y = wave(120)
        y = np.column_stack([y, -2 * y])  # two targets
        width = 2
    else:
        x, y = moons(120)
        width = 2 if task == "classification" else 1
    model = [linear(8), "Tanh", {"type": "Linear", "out_features": width, "bias": False}]
    fields = {"model": model, "loss": spec_loss, "epochs": 3, "batch_size": 5}
    if task == "regression":
        fields["target"] = ["label", "label2"]
        names = ["x0", "label", "label2"]
        table = Table(names, [x[:, 0], y[:, 0], y[:, 1]])
        spec = S.TrainSpec.model_validate({"optimizer": {"type": "Adam", "lr": 0.05}, "device": "cpu", **fields})
        plan = S.plan_training(spec, table.schema(), LIMITS)
        fast = engine.train(spec, plan, x, y)
        slow = engine.train(spec.model_copy(update={"compile": "off"}), plan, x, y)
        assert (fast.loop, slow.loop) == ("native", "eager")
        assert_close_runs(fast, slow)
    else:
        assert_close_runs(*native_and_eager(x, y, **fields))


def test_native_loop_resumes_bit_for_bit_between_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(native.NativeSteps, "chunk_steps", 7)  # several calls an epoch, so mid-epoch checkpoints
    x, y = moons()
    fields: dict[str, Any] = {
        "optimizer": {"type": "Adam", "lr": 0.02},
        "scheduler": {"type": "StepLR", "step_size": 1, "gamma": 0.7},
        "validation_split": 0.2,
        "epochs": 4,
        "batch_size": 4,
    }
    taken: list[engine.Checkpoint] = []
    _, _, whole = fit(x, y, **fields, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    assert whole.loop == "native"
    mid_epoch = [c for c in taken if c.meta["step"] > 0 and c.epoch == 2]
    assert mid_epoch
    _, _, resumed = fit(x, y, **fields, resume=through_files(mid_epoch[1], tmp_path))
    assert_same_run(whole, resumed)
    # The checkpoint is torch's own optimizer state: the eager loop can pick it up too.
    _, _, eager = fit(x, y, **fields, compile="off", resume=through_files(mid_epoch[1], tmp_path))
    assert_close_runs(whole, eager)


def test_notes_say_which_loop_ran_and_why():
    x, y = moons()
    _, _, fast = fit(x, y, epochs=1)
    assert fast.loop == "native"
    assert fast.notes[0].startswith("training loop: native")
    _, _, off = fit(x, y, epochs=1, compile="off")
    assert off.notes == ["training loop: eager PyTorch (compile is off in the spec)"]
    _, _, dropout = fit(x, y, epochs=1, model=[linear(8), {"type": "Dropout"}, linear(2)])
    assert dropout.notes == ["training loop: eager PyTorch (Dropout runs in eager PyTorch)"]


def test_compiled_steps_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINSERVE_NATIVE_CACHE_DIR", str(tmp_path / "cache"))
    spec = S.TrainSpec.model_validate({"model": [linear(3), "Softplus", linear(2)], "loss": "CrossEntropyLoss"})
    source, _ = native.generate(spec, 5, "classification")
    source += f"// {new_id()}\n"  # a source no other test or process has compiled yet
    _, cached = native.load(source)
    assert not cached
    assert len(list((tmp_path / "cache").glob("step-*.so"))) == 1
    native._loaded.clear()  # as a new worker process would start
    _, cached = native.load(source)
    assert cached


def test_an_unwritable_cache_falls_back_to_the_eager_loop(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TRAINSERVE_NATIVE_CACHE_DIR", str(blocker / "cache"))
    x, y = moons()
    _, _, result = fit(x, y, epochs=1, model=[linear(5), "SiLU", linear(2)], batch_size=3)
    assert result.loop == "eager"
    assert "compiling generated code" in result.notes[0]


# -- serving: the row-wise generated forward pass -------------------------------------------------------

ROWWISE_CASES = [
    ("classification", [linear(12), {"type": "GELU", "approximate": "tanh"}, linear(12), "Mish", linear(3)]),
    ("binary", [linear(12), "ReLU", {"type": "Dropout", "p": 0.3}, linear(12), "Sigmoid", linear(1)]),
    (
        "regression",
        [
            linear(12),
            {"type": "ELU", "alpha": 0.5},
            {"type": "Linear", "out_features": 12, "bias": False},
            {"type": "LeakyReLU", "negative_slope": 0.2},
            "Softplus",
            "SiLU",
            "Identity",
            linear(2),
        ],
    ),
]


@pytest.mark.parametrize(("task", "layers"), ROWWISE_CASES, ids=[task for task, _ in ROWWISE_CASES])
def test_rowwise_forward_matches_torch_and_never_depends_on_the_other_rows(task, layers):
    torch.manual_seed(0)
    spec = S.TrainSpec.model_validate({"model": layers, "loss": "MSELoss"})
    module = network.TabularNet(spec.model, 5).eval()
    module.scaler.mean.copy_(torch.randn(5))
    module.scaler.std.copy_(torch.rand(5) + 0.5)
    forward = native.RowwiseForward(module, spec.model, 5, task)
    x = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)

    outputs = forward(x)
    expected = predict_raw(module, x)
    if task != "regression":
        expected = network.outputs_to_probabilities(expected, task)
    np.testing.assert_allclose(outputs, expected.numpy(), rtol=1e-5, atol=1e-6)
    # Each row on its own: alone, in any slice, in any order, to the last bit.
    alone = np.concatenate([forward(x[i : i + 1]) for i in range(len(x))])
    assert np.array_equal(alone, outputs)
    shuffled = np.random.default_rng(1).permutation(len(x))
    assert np.array_equal(forward(x[shuffled]), outputs[shuffled])


def test_rowwise_forward_is_refused_for_layers_it_does_not_compute():
    spec = S.TrainSpec.model_validate(
        {"model": [linear(4), {"type": "BatchNorm1d"}, linear(2)], "loss": "CrossEntropyLoss"}
    )
    module = network.TabularNet(spec.model, 2).eval()
    with pytest.raises(native.NativeUnavailable, match="BatchNorm1d is served by PyTorch"):
        native.RowwiseForward(module, spec.model, 2, "classification")


def test_predictor_answers_small_requests_row_wise_and_large_ones_with_torch(tmp_path, moons_classifier):
    x, _, spec, plan, result = moons_classifier
    predictor = save_and_load(tmp_path, spec, plan, result)
    assert predictor.rowwise is not None
    small = x[:3].astype(np.float32)
    assert predictor.takes_rowwise(len(small))
    # A small request's answer is the one each of its rows gets alone: what micro-batching relies on.
    together = predictor.infer(small).probabilities
    assert together is not None
    for i in range(len(small)):
        assert np.array_equal(predictor.infer(small[i : i + 1]).probabilities, together[i : i + 1])
    many = np.repeat(x, 1 + (1 << 18) // (len(x) * predictor.n_parameters), axis=0).astype(np.float32)
    assert not predictor.takes_rowwise(len(many))
    torch_answer = predictor.infer(many).probabilities
    expected = torch.softmax(predict_raw(result.module, many), dim=1).numpy()
    np.testing.assert_allclose(torch_answer, expected, rtol=1e-6, atol=1e-7)  # softmax written out: rounding
    labels_only = predictor.infer(many, probabilities=False)
    assert labels_only.probabilities is None
    assert np.array_equal(labels_only.predictions, predictor.infer(many).predictions)


def test_a_model_without_a_rowwise_pass_is_served_by_torch(tmp_path):
    x, y = moons()
    spec, plan, result = fit(x, y, model=[linear(8), {"type": "BatchNorm1d"}, "Tanh", linear(2)], batch_size=16)
    predictor = save_and_load(tmp_path, spec, plan, result)
    assert predictor.rowwise is None
    assert not predictor.takes_rowwise(1)
    probabilities = predictor.infer(x[:5].astype(np.float32)).probabilities
    expected = torch.softmax(predict_raw(result.module, x[:5].astype(np.float32)), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)


# -- devices and precision -------------------------------------------------------------------------------


def test_bf16_autocast_trains_in_the_eager_loop_and_says_so():
    x, y = moons()
    _, _, result = fit(x, y, autocast="bf16", epochs=20)
    assert result.loop == "eager"
    assert "autocast runs in eager PyTorch" in result.notes[0]
    assert "autocast: forward and loss in bf16" in result.notes
    assert result.metrics["train_accuracy"] > 0.9
    assert all(p.dtype == torch.float32 for p in result.module.parameters())  # weights stay float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_keeps_the_data_on_the_device_and_never_syncs_per_step():
    x, y = moons(512)
    epochs, steps_per_epoch = 3, 512 // 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _, _, result = fit(x, y, device="cuda", autocast="bf16", epochs=epochs, batch_size=8)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= epochs * 8 < epochs * steps_per_epoch  # a few per epoch (its loss), none per step
    assert result.device.startswith("cuda")
    assert result.loop == "eager"
    assert result.metrics["train_accuracy"] > 0.9
    assert all(t.device.type == "cpu" for t in result.module.state_dict().values())  # saved from the CPU


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
    assert type(engine.build_loss(loss)).__name__ == loss_type
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
    assert type(engine.build_optimizer(spec.optimizer, result.module.parameters())).__name__ == optimizer_type


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


# -- encode_targets ------------------------------------------------------------------------------------


def test_encode_string_classes_for_cross_entropy():
    encoded = engine.encode_targets(np.array(["bee", "ant", "cat", "ant"]), "classification", ["ant", "bee", "cat"])
    assert encoded.dtype == torch.int64
    assert encoded.tolist() == [1, 0, 2, 0]


def test_encode_string_classes_for_binary():
    encoded = engine.encode_targets(np.array(["yes", "no", "yes"]), "binary", ["no", "yes"])
    assert encoded.dtype == torch.float32
    assert encoded.tolist() == [[1.0], [0.0], [1.0]]


def test_encode_integer_and_whole_float_labels():
    assert engine.encode_targets(np.array([3, 7, 3]), "classification", [3, 7]).tolist() == [0, 1, 0]
    assert engine.encode_targets(np.array([2.0, 1.0, 3.0]), "classification", [1, 2, 3]).tolist() == [1, 0, 2]


def test_encode_regression_targets():
    one = engine.encode_targets(np.array([0.5, 1.5]), "regression", None)
    assert one.dtype == torch.float32
    assert one.tolist() == [[0.5], [1.5]]
    two = engine.encode_targets(np.array([[0.5, 1.0], [2.0, 3.0]]), "regression", None)
    assert two.tolist() == [[0.5, 1.0], [2.0, 3.0]]


# -- inference: inputs_to_matrix -------------------------------------------------------------------------

FEATURES = ["a", "b"]


def matrix_error(inputs: list[Any], features: list[str] = FEATURES) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        inputs_to_matrix(inputs, features, max_rows=100)
    return info.value


def test_matrix_from_list_rows():
    matrix = inputs_to_matrix([[1, 2.5], [-3, 4]], FEATURES, max_rows=100)
    assert matrix.dtype == np.float32
    assert matrix.tolist() == [[1.0, 2.5], [-3.0, 4.0]]


def test_matrix_from_dict_rows_follows_feature_order():
    matrix = inputs_to_matrix([{"b": 2, "a": 1}, {"a": 3.5, "b": -4}], FEATURES, max_rows=100)
    assert matrix.dtype == np.float32
    assert matrix.tolist() == [[1.0, 2.0], [3.5, -4.0]]


@pytest.mark.parametrize("value", ["x", "1", None, [1]], ids=["text", "numeric-text", "null", "list"])
def test_matrix_names_the_cell_that_is_not_a_number(value):
    error = matrix_error([[1, 2], [3, value]])
    assert "row 1, column 1" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, 1]


@pytest.mark.parametrize("row", [[3], [3, 4, 5], []], ids=["short", "long", "empty"])
def test_matrix_names_the_ragged_row(row):
    error = matrix_error([[1, 2], row])
    assert "row 1" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1]


def test_matrix_every_row_ragged_the_same_way():
    error = matrix_error([[1, 2, 3], [4, 5, 6]])
    assert "row 0 has 3 values" in error.detail


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_matrix_names_the_non_finite_cell(value):
    error = matrix_error([[1, 2], [value, 4]])
    assert "row 1, column 0" in error.detail
    assert "finite" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, 0]


def test_matrix_names_a_cell_that_overflows_float32():
    # 1e39 is a finite float64 but inf as float32; the error must come without a stray RuntimeWarning
    # (the test suite runs with warnings as errors).
    error = matrix_error([[1, 2], [1e39, 4]])
    assert "row 1, column 0" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, 0]


def test_matrix_names_an_unknown_feature():
    error = matrix_error([{"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}])
    assert "row 1" in error.detail
    assert "'c'" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, "c"]


def test_matrix_names_a_missing_feature():
    error = matrix_error([{"a": 1}])
    assert "row 0" in error.detail
    assert "'b'" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 0, "b"]


def test_matrix_rows_must_not_mix_lists_and_objects():
    assert matrix_error([{"a": 1, "b": 2}, [1, 2]]).errors[0]["loc"] == ["inputs", 1]
    assert matrix_error([[1, 2], {"a": 1, "b": 2}]).errors[0]["loc"] == ["inputs", 1]


def test_matrix_flat_list_is_not_rows():
    assert matrix_error([1, 2]).errors[0]["loc"] == ["inputs", 0]


def test_matrix_empty_inputs():
    error = matrix_error([])
    assert "empty" in error.detail


def test_matrix_too_many_rows():
    assert inputs_to_matrix([[1, 2]] * 10, FEATURES, max_rows=10).shape == (10, 2)
    with pytest.raises(PayloadTooLarge) as info:
        inputs_to_matrix([[1, 2]] * 11, FEATURES, max_rows=10)
    assert info.value.status_code == 413
    assert "11" in info.value.detail
    assert "10" in info.value.detail


@pytest.mark.parametrize("inputs", [[[1.5, True]], [{"a": 1.5, "b": False}]], ids=["list-row", "object-row"])
def test_matrix_rejects_booleans_next_to_numbers(inputs):
    # [[true, false]] is refused as "not a number"; a boolean beside a number must be too.
    error = matrix_error(inputs)
    assert error.errors[0]["loc"] == ["inputs", 0, 1]


def test_matrix_accepts_integers_beyond_int64():
    matrix = inputs_to_matrix([[2**64, 1]], FEATURES, max_rows=100)  # a finite JSON number, about 1.8e19
    assert matrix[0, 0] == np.float32(2.0**64)


def test_matrix_names_the_cell_of_an_integer_too_large_for_float():
    error = matrix_error([[1, 2], [10**400, 4]])
    assert error.errors[0]["loc"] == ["inputs", 1, 0]


# -- inference: Predictor ---------------------------------------------------------------------------------


def test_predictor_decodes_string_classes(tmp_path, moons_classifier):
    x, labels, spec, plan, result = moons_classifier
    predictor = save_and_load(tmp_path, spec, plan, result)
    assert predictor.features == ["x0", "x1"]
    assert predictor.classes == ["inner", "outer"]

    rows = [dict(zip(predictor.features, map(float, row), strict=True)) for row in x]
    prediction = predictor.predict(inputs_to_matrix(rows, predictor.features, max_rows=1_000))

    assert set(prediction.predictions) <= {"inner", "outer"}
    assert np.mean(np.asarray(prediction.predictions) == labels) >= 0.95
    assert prediction.classes == ["inner", "outer"]
    probabilities = np.asarray(prediction.probabilities)
    assert probabilities.shape == (len(x), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # The loaded weights are the trained ones, bit for bit; the answers torch's to rounding
    # (the row-wise generated forward pass sums in its own order).
    for key, tensor in result.module.state_dict().items():
        assert torch.equal(predictor.module.state_dict()[key], tensor), key
    expected = torch.softmax(predict_raw(result.module, x), dim=1).numpy()
    np.testing.assert_allclose(probabilities.astype(np.float32), expected, rtol=1e-5, atol=1e-6)


def test_predictor_binary_model(tmp_path):
    x, y = moons()
    labels = np.where(y == 1, "yes", "no")
    spec, plan, result = fit(x, labels, model=[linear(16), "Tanh", linear(1)], loss="BCEWithLogitsLoss")
    predictor = save_and_load(tmp_path, spec, plan, result)

    prediction = predictor.predict(inputs_to_matrix(x.tolist(), predictor.features, max_rows=1_000))
    assert prediction.classes == ["no", "yes"]
    assert np.mean(np.asarray(prediction.predictions) == labels) >= 0.9
    probabilities = np.asarray(prediction.probabilities)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert all(p[1] > 0.5 for p, label in zip(probabilities, prediction.predictions, strict=True) if label == "yes")
    many = np.repeat(x, 1 + (1 << 18) // (len(x) * predictor.n_parameters), axis=0).astype(np.float32)
    assert not predictor.takes_rowwise(len(many))  # torch's pass, where labels may skip probabilities
    labels_only = predictor.infer(many, probabilities=False)
    assert labels_only.probabilities is None
    assert np.array_equal(labels_only.predictions, predictor.infer(many).predictions)


def test_predictor_regression_model(tmp_path):
    x, y = wave()
    spec, plan, result = fit(x, y, model=[linear(16), "Tanh", linear(1)], loss="MSELoss", epochs=40)
    predictor = save_and_load(tmp_path, spec, plan, result)

    prediction = predictor.predict(inputs_to_matrix([[2.0], [10.0], [18.0]], predictor.features, max_rows=10))
    assert prediction.probabilities is None
    assert prediction.classes is None
    assert all(isinstance(v, float) for v in prediction.predictions)
    expected = predict_raw(result.module, np.array([[2.0], [10.0], [18.0]], dtype=np.float32))[:, 0]
    np.testing.assert_allclose(prediction.predictions, expected.tolist(), rtol=1e-5)
    # y = x + 2 sin(x) + noise: predictions land near the curve.
    truth = [v + 2 * math.sin(v) for v in (2.0, 10.0, 18.0)]
    assert all(abs(p - t) < 3.0 for p, t in zip(prediction.predictions, truth, strict=True))
