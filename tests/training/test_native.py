"""Unit tests for trainserve.training.native: the generated-C training loop against eager
torch, its compile cache, and the row-wise generated forward pass that serving uses.

CPU only, tiny networks: the whole file runs in seconds once the C compiler's cache is warm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.small_models import (
    LIMITS,
    NATIVE_OPTIMIZERS,
    allowed_types,
    assert_same_run,
    fit,
    linear,
    moons,
    predict_raw,
    through_files,
    wave,
)
from trainserve.datasets.tables import Table
from trainserve.storage.base import new_id
from trainserve.training import loop, native, network
from trainserve.training import spec as S


@pytest.fixture(autouse=True)
def _native_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests compare the two loops, not the choice between them (that is
    test_native_crossover.py's): native wherever it applies, whatever this machine's
    kept timing says."""
    monkeypatch.setenv("TRAINSERVE_NATIVE_CHOICE", "native")


# -- the native loop: generated C for the whole step ---------------------------------------------------


def native_and_eager(x: np.ndarray, y: np.ndarray, **fields: Any) -> tuple[loop.TrainedModel, loop.TrainedModel]:
    _, _, fast = fit(x, y, **fields)
    _, _, slow = fit(x, y, **fields, loop="eager")
    assert fast.loop == "native", fast.notes
    assert slow.loop == "eager"
    return fast, slow


def assert_close_runs(fast: loop.TrainedModel, slow: loop.TrainedModel, tolerance: float = 1e-5) -> None:
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
        fast = loop.train(spec, plan, x, y)
        slow = loop.train(spec.model_copy(update={"loop": "eager"}), plan, x, y)
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
    taken: list[loop.Checkpoint] = []
    _, _, whole = fit(x, y, **fields, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    assert whole.loop == "native"
    mid_epoch = [c for c in taken if c.meta["step"] > 0 and c.epoch == 2]
    assert mid_epoch
    _, _, resumed = fit(x, y, **fields, resume=through_files(mid_epoch[1], tmp_path))
    assert_same_run(whole, resumed)
    # The checkpoint is torch's own optimizer state: the eager loop can pick it up too.
    _, _, eager = fit(x, y, **fields, loop="eager", resume=through_files(mid_epoch[1], tmp_path))
    assert_close_runs(whole, eager)


def test_notes_say_which_loop_ran_and_why():
    x, y = moons()
    _, _, fast = fit(x, y, epochs=1)
    assert fast.loop == "native"
    assert fast.notes[0].startswith("training loop: native")
    _, _, off = fit(x, y, epochs=1, loop="eager")
    assert off.notes == ["training loop: eager PyTorch (the spec's loop is eager)"]
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
