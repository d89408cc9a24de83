"""Unit tests for trainserve.serving.predictor: reading rows into a matrix (inputs_to_matrix)
and a trained model answering as /predict does (Predictor: loaded from the store, the row-wise
pass for small requests, torch's for large ones, labels decoded).

CPU only, tiny networks: the whole file runs in seconds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from tests.small_models import fit, linear, moons, predict_raw, save_and_load, wave
from trainserve.errors import InvalidInput, PayloadTooLarge
from trainserve.serving.formats import encode_json
from trainserve.serving.predictor import Predictor, inputs_to_matrix


def answer(predictor: Predictor, inputs: list[Any], *, max_rows: int) -> dict[str, Any]:
    """The JSON body /predict answers for these rows: read, inferred and encoded as its route does."""
    x = inputs_to_matrix(inputs, predictor.features, max_rows=max_rows)
    body: dict[str, Any] = orjson.loads(encode_json(predictor, predictor.infer(x)))
    return body


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
    assert "inputs[1][1]" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, 1]


@pytest.mark.parametrize("row", [[3], [3, 4, 5], []], ids=["short", "long", "empty"])
def test_matrix_names_the_ragged_row(row):
    error = matrix_error([[1, 2], row])
    assert "inputs[1]" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1]


def test_matrix_every_row_ragged_the_same_way():
    error = matrix_error([[1, 2, 3], [4, 5, 6]])
    assert "inputs[0] has 3 values" in error.detail


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_matrix_names_the_non_finite_cell(value):
    error = matrix_error([[1, 2], [value, 4]])
    assert "inputs[1][0]" in error.detail
    assert "finite" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, 0]


def test_matrix_names_a_cell_that_overflows_float32():
    # 1e39 is a finite float64 but inf as float32; the error must come without a stray RuntimeWarning
    # (the test suite runs with warnings as errors).
    error = matrix_error([[1, 2], [1e39, 4]])
    assert "inputs[1][0]" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, 0]


def test_matrix_names_an_unknown_feature():
    error = matrix_error([{"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}])
    assert "inputs[1]" in error.detail
    assert "'c'" in error.detail
    assert error.errors[0]["loc"] == ["inputs", 1, "c"]


def test_matrix_names_a_missing_feature():
    error = matrix_error([{"a": 1}])
    assert "inputs[0]" in error.detail
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
    prediction = answer(predictor, rows, max_rows=1_000)

    assert set(prediction["predictions"]) <= {"inner", "outer"}
    assert np.mean(np.asarray(prediction["predictions"]) == labels) >= 0.95
    assert prediction["classes"] == ["inner", "outer"]
    probabilities = np.asarray(prediction["probabilities"])
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

    prediction = answer(predictor, x.tolist(), max_rows=1_000)
    assert prediction["classes"] == ["no", "yes"]
    assert np.mean(np.asarray(prediction["predictions"]) == labels) >= 0.9
    probabilities = np.asarray(prediction["probabilities"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert all(p[1] > 0.5 for p, label in zip(probabilities, prediction["predictions"], strict=True) if label == "yes")
    many = np.repeat(x, 1 + (1 << 18) // (len(x) * predictor.n_parameters), axis=0).astype(np.float32)
    assert not predictor.takes_rowwise(len(many))  # torch's pass, where labels may skip probabilities
    labels_only = predictor.infer(many, probabilities=False)
    assert labels_only.probabilities is None
    assert np.array_equal(labels_only.predictions, predictor.infer(many).predictions)


def test_predictor_regression_model(tmp_path):
    x, y = wave()
    spec, plan, result = fit(x, y, model=[linear(16), "Tanh", linear(1)], loss="MSELoss", epochs=40)
    predictor = save_and_load(tmp_path, spec, plan, result)

    prediction = answer(predictor, [[2.0], [10.0], [18.0]], max_rows=10)
    assert prediction["probabilities"] is None
    assert prediction["classes"] is None
    assert all(isinstance(v, float) for v in prediction["predictions"])
    expected = predict_raw(result.module, np.array([[2.0], [10.0], [18.0]], dtype=np.float32))[:, 0]
    np.testing.assert_allclose(prediction["predictions"], expected.tolist(), rtol=1e-5)
    # y = x + 2 sin(x) + noise: predictions land near the curve.
    truth = [v + 2 * math.sin(v) for v in (2.0, 10.0, 18.0)]
    assert all(abs(p - t) < 3.0 for p, t in zip(prediction["predictions"], truth, strict=True))


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
        alone = predictor.infer(small[i : i + 1]).probabilities
        assert alone is not None
        assert np.array_equal(alone, together[i : i + 1])
    many = np.repeat(x, 1 + (1 << 18) // (len(x) * predictor.n_parameters), axis=0).astype(np.float32)
    assert not predictor.takes_rowwise(len(many))
    torch_answer = predictor.infer(many).probabilities
    assert torch_answer is not None
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
    assert probabilities is not None
    expected = torch.softmax(predict_raw(result.module, x[:5].astype(np.float32)), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)
