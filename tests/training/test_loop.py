"""Unit tests for trainserve.training.loop: training, checkpoints and resuming, schedulers,
early stopping, clipping, Dropout and BatchNorm, devices and precision, target encoding.

CPU only, tiny networks, a few hundred rows: the whole file runs in seconds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.small_models import (
    CLASSIFIER,
    allowed_types,
    assert_same_run,
    fit,
    linear,
    moons,
    plan_for,
    predict_raw,
    through_files,
    train_moons_classifier,
    wave,
)
from trainserve.errors import CheckpointMismatch, InvalidInput, TrainingDiverged
from trainserve.training import loop, network
from trainserve.training import spec as S

# -- training ------------------------------------------------------------------------------------


def test_adam_learns_moons():
    x, labels, _, plan, result = train_moons_classifier()
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

    train_rows, _ = loop.split_indices(len(x), spec.validation_split, spec.seed)
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
    reports: list[loop.EpochReport] = []
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
    reports: list[loop.EpochReport] = []

    def should_stop() -> bool:
        asked.append(1)
        return True

    with pytest.raises(loop.TrainingCancelled):
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


def test_resuming_from_any_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    x, y = moons()
    taken: list[loop.Checkpoint] = []
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
    handed: list[loop.Checkpoint] = []

    def should_preempt() -> bool:
        polls.append(1)
        return len(polls) == 30  # inside epoch 3 (10 batches an epoch, plus one poll at each epoch's end)

    with pytest.raises(loop.TrainingPreempted) as info:
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
    taken: list[loop.Checkpoint] = []
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
    taken: list[loop.Checkpoint] = []
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
    taken: list[loop.Checkpoint] = []
    fit(x, y, epochs=1, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    with pytest.raises(CheckpointMismatch):
        fit(x, y, epochs=1, batch_size=8, resume=taken[0])


def test_checkpoints_come_no_more_often_than_asked():
    x, y = moons()
    taken: list[loop.Checkpoint] = []
    fit(x, y, epochs=3, on_checkpoint=taken.append, checkpoint_every_s=3600.0)
    assert taken == []
    fit(x, y, epochs=3, loop="eager", on_checkpoint=taken.append, checkpoint_every_s=0.0)
    assert len(taken) == 3 * (7 + 1)  # after each of 7 eager batches an epoch, and at each epoch's end


# -- schedulers, early stopping, clipping, Dropout and BatchNorm ------------------------------------------


def final_lr(x: np.ndarray, y: np.ndarray, **fields: Any) -> float:
    taken: list[loop.Checkpoint] = []
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
    batch_size = 8

    def synchronizations(run: Any) -> tuple[int, Any]:
        """How many synchronizing CUDA operations ``run()`` made, and what it returned."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                value = run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message).lower() for w in caught), value

    # The detector sees a synchronization where there is one: a count of 0 below means none.
    control, _ = synchronizations(lambda: torch.ones(1, device="cuda").item())
    assert control >= 1

    def train(epochs: int) -> loop.TrainedModel:
        return fit(x, y, device="cuda", autocast="bf16", epochs=epochs, batch_size=batch_size)[2]

    train(1)  # CUDA's one-time start (context, kernels) outside the counts
    short_syncs, short = synchronizations(lambda: train(1))
    syncs, result = synchronizations(lambda: train(3))
    epochs = len(result.history) - len(short.history)  # the epochs the longer run added
    assert epochs == 2
    steps_per_epoch = math.ceil(len(x) / batch_size)
    per_epoch = (syncs - short_syncs) / epochs
    assert per_epoch <= 8  # a few per epoch (its loss, its metrics), whatever the steps...
    assert syncs < len(result.history) * steps_per_epoch  # ...so fewer in all than the steps it took
    assert result.device.startswith("cuda")
    assert result.loop == "eager"
    assert result.metrics["train_accuracy"] > 0.9
    assert all(t.device.type == "cpu" for t in result.module.state_dict().values())  # saved from the CPU


# -- encode_targets ------------------------------------------------------------------------------------


def test_encode_string_classes_for_cross_entropy():
    encoded = loop.encode_targets(np.array(["bee", "ant", "cat", "ant"]), "classification", ["ant", "bee", "cat"])
    assert encoded.dtype == torch.int64
    assert encoded.tolist() == [1, 0, 2, 0]


def test_encode_string_classes_for_binary():
    encoded = loop.encode_targets(np.array(["yes", "no", "yes"]), "binary", ["no", "yes"])
    assert encoded.dtype == torch.float32
    assert encoded.tolist() == [[1.0], [0.0], [1.0]]


def test_encode_integer_and_whole_float_labels():
    assert loop.encode_targets(np.array([3, 7, 3]), "classification", [3, 7]).tolist() == [0, 1, 0]
    assert loop.encode_targets(np.array([2.0, 1.0, 3.0]), "classification", [1, 2, 3]).tolist() == [1, 0, 2]


def test_encode_regression_targets():
    one = loop.encode_targets(np.array([0.5, 1.5]), "regression", None)
    assert one.dtype == torch.float32
    assert one.tolist() == [[0.5], [1.5]]
    two = loop.encode_targets(np.array([[0.5, 1.0], [2.0, 3.0]]), "regression", None)
    assert two.tolist() == [[0.5, 1.0], [2.0, 3.0]]


def test_training_metrics_of_a_large_split_come_from_evenly_spaced_rows(monkeypatch: pytest.MonkeyPatch):
    # Over TRAIN_METRICS_ROWS training rows (262,144 in the product; 50 here), the finished
    # model's training metrics are those of every n-th training row, said in the notes;
    # validation metrics still cover all the validation rows.
    x, y = moons(200)
    monkeypatch.setattr(loop, "TRAIN_METRICS_ROWS", 50)
    spec, _, result = fit(x, y, epochs=2, validation_split=0.25)
    train_rows, val_rows = loop.split_indices(len(x), spec.validation_split, spec.seed)
    assert len(train_rows) == 150
    assert "training metrics: over 50 of the 150 training rows, evenly spaced" in " ".join(result.notes)
    net, loss_fn = result.module, torch.nn.CrossEntropyLoss()
    features, targets = torch.from_numpy(x), torch.from_numpy(y)
    spread = torch.from_numpy(train_rows[np.arange(50) * 150 // 50])
    expected = loop.evaluate(net, loss_fn, features, targets, "classification", spread)
    assert result.metrics["train_loss"] == expected["loss"]
    assert result.metrics["train_accuracy"] == expected["accuracy"]
    everything = loop.evaluate(net, loss_fn, features, targets, "classification", torch.from_numpy(val_rows))
    assert result.metrics["val_loss"] == everything["loss"]
    # At or under the bound, every training row counts and nothing is said.
    monkeypatch.setattr(loop, "TRAIN_METRICS_ROWS", 150)
    _, _, exact = fit(x, y, epochs=2, validation_split=0.25)
    assert not any(note.startswith("training metrics") for note in exact.notes)
    assert (
        exact.metrics["train_loss"]
        == loop.evaluate(exact.module, loss_fn, features, targets, "classification", torch.from_numpy(train_rows))[
            "loss"
        ]
    )
