"""Unit tests for trainserve.training.spec: parsing the allow-listed TrainSpec and checking it against a dataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from trainserve.datasets.tables import Table, TableSchema
from trainserve.errors import InvalidInput
from trainserve.training import spec as S
from trainserve.training.loop import _fingerprint
from trainserve.training.spec import Limits, TrainSpec, estimate_memory_bytes, plan_training

LIMITS = Limits(max_epochs=1_000, max_parameters=100_000, max_layer_width=512)


def make_spec(**fields: Any) -> TrainSpec:
    """A valid two-class classifier spec, with ``fields`` replacing the defaults."""
    base: dict[str, Any] = {
        "model": [{"type": "Linear", "out_features": 8}, "Tanh", {"type": "Linear", "out_features": 2}],
        "loss": "CrossEntropyLoss",
    }
    return TrainSpec.model_validate({**base, **fields})


def linear(width: int, **kwargs: Any) -> dict[str, Any]:
    return {"type": "Linear", "out_features": width, **kwargs}


def schema_of(**columns: list[Any]) -> TableSchema:
    """The schema trainserve.datasets.tables would report for these columns, in this order."""
    return Table(list(columns), [np.asarray(values) for values in columns.values()]).schema()


# Two float features, an int label with classes {0, 1}.
MOONS = schema_of(x0=[0.1, 0.7, -0.3, 1.2], x1=[0.5, -0.2, 0.9, 0.0], label=[0, 1, 0, 1])
# Mixed columns, in the shape the API stores them.
MIXED = TableSchema.from_dicts(
    10,
    [
        {"name": "age", "dtype": "int64", "classes": [20, 30, 40]},
        {"name": "height", "dtype": "float64", "classes": None},
        {"name": "city", "dtype": "string", "classes": ["Oslo", "Rome"]},
        {"name": "score", "dtype": "float64", "classes": None},
        {"name": "grade", "dtype": "float64", "classes": [1, 2, 3]},
        {"name": "species", "dtype": "string", "classes": ["ant", "bee", "cat"]},
    ],
)


def plan_error(spec: TrainSpec, schema: TableSchema, limits: Limits = LIMITS) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        plan_training(spec, schema, limits)
    return info.value


def first_loc(error: InvalidInput) -> list[Any]:
    return list(error.errors[0]["loc"])


def validation_locs(fields: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        make_spec(**fields)
    return [e["loc"] for e in info.value.errors()]


# -- parsing ------------------------------------------------------------------------------------


def test_bare_names_stand_for_type_objects():
    spec = TrainSpec.model_validate({"model": [linear(4), "Tanh", linear(1)], "loss": "MSELoss", "optimizer": "SGD"})
    assert isinstance(spec.model[1], S.Tanh)
    assert isinstance(spec.loss, S.MSELoss)
    assert isinstance(spec.optimizer, S.SGD)
    assert spec.optimizer.lr == 0.001  # torch's default
    assert spec.optimizer.kwargs() == {
        "lr": 0.001,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
    }


def test_bare_names_from_json():
    spec = TrainSpec.model_validate_json('{"model": ["ReLU", "Identity"], "loss": "L1Loss", "optimizer": "Adam"}')
    assert [layer.type for layer in spec.model] == ["ReLU", "Identity"]
    assert spec.loss.type == "L1Loss"
    assert spec.optimizer.type == "Adam"
    assert spec.optimizer.betas == (0.9, 0.999)


def test_defaults():
    spec = TrainSpec.model_validate({"model": ["Tanh"], "loss": "MSELoss"})
    assert spec.optimizer.type == "SGD"
    assert (spec.epochs, spec.batch_size, spec.seed) == (20, 32, 0)
    assert spec.standardize is True
    assert spec.shuffle is True
    assert spec.validation_split == 0.0
    assert spec.device == "auto"
    assert spec.target_names is None


def test_target_names_from_string_or_list():
    assert make_spec(target="label").target_names == ["label"]
    assert make_spec(target=["a", "b"]).target_names == ["a", "b"]


@pytest.mark.parametrize(
    "layer_type",
    ["Conv2d", "Sequential", "LSTM", "linear", "torch.nn.Linear", "__class__", "eval", ""],
)
def test_unknown_layer_type_is_rejected(layer_type):
    locs = validation_locs({"model": [linear(4), layer_type, linear(2)]})
    assert locs[0][:2] == ("model", 1)


@pytest.mark.parametrize("field", ["model", "loss", "optimizer"])
def test_code_like_type_string_is_rejected(field):
    code = "__import__('os').system('x')"
    value = [code] if field == "model" else code
    locs = validation_locs({field: value})
    assert locs[0][0] == field


@pytest.mark.parametrize("loss", ["NLLLoss", "KLDivLoss", "mseloss", {"type": "CTCLoss"}])
def test_unknown_loss_is_rejected(loss):
    assert validation_locs({"loss": loss})[0][0] == "loss"


@pytest.mark.parametrize("optimizer", ["LBFGS", "Adamax", "sgd", {"type": "SparseAdam", "lr": 0.1}])
def test_unknown_optimizer_is_rejected(optimizer):
    assert validation_locs({"optimizer": optimizer})[0][0] == "optimizer"


def test_layer_without_type_is_rejected():
    assert validation_locs({"model": [{"out_features": 3}]})[0][:2] == ("model", 0)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"model": [linear(3, in_features=2)]}, ("model", 0, "Linear", "in_features")),
        ({"model": [{"type": "ReLU", "inplace": True}]}, ("model", 0, "ReLU", "inplace")),
        ({"loss": {"type": "MSELoss", "reduction": "sum"}}, ("loss", "MSELoss", "reduction")),
        # weight is allowed now (class weights); torch's ignore_index is not.
        ({"loss": {"type": "CrossEntropyLoss", "ignore_index": 0}}, ("loss", "CrossEntropyLoss", "ignore_index")),
        ({"optimizer": {"type": "SGD", "lr": 0.1, "foreach": True}}, ("optimizer", "SGD", "foreach")),
        ({"optimizer": {"type": "Adam", "fused": True}}, ("optimizer", "Adam", "fused")),
        ({"learning_rate": 0.1}, ("learning_rate",)),
    ],
    ids=["layer", "activation", "loss", "loss-weight", "optimizer", "optimizer-fused", "top-level"],
)
def test_unknown_keyword_is_rejected(fields, loc):
    assert loc in validation_locs(fields)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"model": [linear(0)]}, ("model", 0, "Linear", "out_features")),
        ({"model": [linear(-3)]}, ("model", 0, "Linear", "out_features")),
        ({"model": []}, ("model",)),
        ({"epochs": 0}, ("epochs",)),
        ({"epochs": -5}, ("epochs",)),
        ({"batch_size": 0}, ("batch_size",)),
        ({"batch_size": -1}, ("batch_size",)),
        ({"seed": -1}, ("seed",)),
        ({"optimizer": {"type": "SGD", "lr": 0}}, ("optimizer", "SGD", "lr")),
        ({"optimizer": {"type": "Adam", "lr": -0.1}}, ("optimizer", "Adam", "lr")),
        ({"optimizer": {"type": "AdamW", "weight_decay": -1}}, ("optimizer", "AdamW", "weight_decay")),
        ({"model": [{"type": "Dropout", "p": 1.0}]}, ("model", 0, "Dropout", "p")),
        ({"model": [{"type": "Dropout", "p": -0.1}]}, ("model", 0, "Dropout", "p")),
        ({"model": [{"type": "BatchNorm1d", "eps": 0}]}, ("model", 0, "BatchNorm1d", "eps")),
        ({"validation_split": 1.0}, ("validation_split",)),
        ({"validation_split": -0.1}, ("validation_split",)),
    ],
)
def test_zero_or_negative_sizes_are_rejected(fields, loc):
    assert loc in validation_locs(fields)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_non_finite_learning_rate_is_rejected(lr):
    assert ("optimizer", "SGD", "lr") in validation_locs({"optimizer": {"type": "SGD", "lr": lr}})


def test_nesterov_needs_momentum():
    assert ("optimizer", "SGD") in validation_locs({"optimizer": {"type": "SGD", "nesterov": True}})
    spec = make_spec(optimizer={"type": "SGD", "nesterov": True, "momentum": 0.9})
    assert isinstance(spec.optimizer, S.SGD)
    assert spec.optimizer.nesterov is True


@pytest.mark.parametrize("features", [[], ["x0", "x0"]], ids=["empty", "duplicate"])
def test_features_must_be_distinct_and_non_empty(features):
    assert ("features",) in validation_locs({"features": features})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:15", "mps"])
def test_known_devices_are_accepted(device):
    assert make_spec(device=device).device == device


@pytest.mark.parametrize(
    "device", ["", "tpu", "CPU", "cuda:", "cuda:123", "cuda:-1", "cuda:0 ", " cpu", "cpu; rm -rf /", "meta"]
)
def test_unknown_devices_are_rejected(device):
    assert ("device",) in validation_locs({"device": device})


@pytest.mark.parametrize("device", ["cpu\n", "auto\n", "cuda:0\n"])
def test_device_with_trailing_newline_is_rejected(device):
    # torch.device() cannot parse these: they must fail here, not inside a worker.
    assert ("device",) in validation_locs({"device": device})


# -- plan_training: columns ------------------------------------------------------------------------


def test_plan_defaults_target_to_last_column_and_features_to_the_rest():
    plan = plan_training(make_spec(), MOONS, LIMITS)
    assert plan.targets == ["label"]
    assert plan.features == ["x0", "x1"]
    assert plan.in_features == 2
    assert plan.out_features == 2
    assert plan.task == "classification"
    assert plan.classes == [0, 1]
    assert plan.n_parameters == (2 * 8 + 8) + (8 * 2 + 2)


def test_plan_with_explicit_target_and_features():
    spec = make_spec(target="species", features=["height", "age"], model=[linear(3)])
    plan = plan_training(spec, MIXED, LIMITS)
    assert plan.features == ["height", "age"]
    assert plan.targets == ["species"]
    assert plan.in_features == 2
    assert plan.classes == ["ant", "bee", "cat"]


def test_plan_infers_in_features_from_explicit_feature_list():
    spec = make_spec(target="score", features=["age"], model=[linear(5), "ReLU", linear(1)], loss="MSELoss")
    plan = plan_training(spec, MIXED, LIMITS)
    assert plan.in_features == 1
    assert plan.n_parameters == (1 * 5 + 5) + (5 * 1 + 1)


def test_plan_unknown_target_column():
    error = plan_error(make_spec(target="nope"), MOONS)
    assert "'nope'" in error.detail
    assert first_loc(error) == ["target"]


def test_plan_unknown_feature_column():
    error = plan_error(make_spec(features=["x0", "nope"]), MOONS)
    assert "'nope'" in error.detail
    assert first_loc(error) == ["features"]


def test_plan_feature_that_is_also_the_target():
    error = plan_error(make_spec(features=["x0", "label"]), MOONS)
    assert "'label'" in error.detail
    assert first_loc(error) == ["features"]


def test_plan_needs_a_feature_besides_the_target():
    error = plan_error(make_spec(), schema_of(label=[0, 1, 0]))
    assert first_loc(error) == ["features"]


def test_plan_takes_a_text_feature_as_a_category():
    # The old refusal ("features must be numeric") is gone: 'city' is one-hot, one column per level.
    spec = make_spec(target="species", features=["age", "city"], model=[linear(3)])
    plan = plan_training(spec, MIXED, LIMITS)
    assert plan.features == ["age", "city"]
    assert plan.in_features == 1 + 2


def test_plan_default_features_include_string_columns():
    spec = make_spec(model=[linear(3)])  # target "species"; features default to all others, "city" included
    plan = plan_training(spec, MIXED, LIMITS)
    assert "city" in plan.features
    assert plan.in_features == 5 + 1  # four numbers, Oslo and Rome


# -- plan_training: widths and tasks -------------------------------------------------------------


def test_plan_classification_width_mismatch_names_the_last_linear():
    spec = make_spec(model=[linear(8), "Tanh", linear(3), "Tanh"])  # 3 outputs, 2 classes
    error = plan_error(spec, MOONS)
    assert "2 classes" in error.detail
    assert first_loc(error) == ["model", 2, "out_features"]


def test_plan_width_mismatch_without_linear_names_the_model():
    spec = make_spec(model=["Tanh"])  # output width stays 2 (features); the target has 3 classes
    error = plan_error(spec, schema_of(x0=[0.0, 1.0, 2.0], x1=[1.0, 2.0, 3.0], y=[0, 1, 2]))
    assert first_loc(error) == ["model"]


def test_plan_classification_width_follows_string_classes():
    spec = make_spec(target="species", features=["age", "height"], model=[linear(4), "ReLU", linear(3)])
    plan = plan_training(spec, MIXED, LIMITS)
    assert plan.out_features == 3
    assert plan.classes == ["ant", "bee", "cat"]


def test_plan_regression_width_must_match_number_of_targets():
    wide = schema_of(x=[0.0, 1.0, 2.0], a=[0.5, 1.5, 2.5], b=[1.25, 0.75, 3.5])
    ok = make_spec(target=["a", "b"], features=["x"], model=[linear(4), "Tanh", linear(2)], loss="MSELoss")
    plan = plan_training(ok, wide, LIMITS)
    assert plan.task == "regression"
    assert plan.classes is None
    assert plan.targets == ["a", "b"]
    assert plan.out_features == 2

    bad = make_spec(target=["a", "b"], features=["x"], model=[linear(4), "Tanh", linear(1)], loss="MSELoss")
    error = plan_error(bad, wide)
    assert "2 target column(s)" in error.detail
    assert first_loc(error) == ["model", 2, "out_features"]


def test_plan_regression_on_text_target_is_rejected():
    spec = make_spec(target="species", features=["age"], model=[linear(1)], loss="MSELoss")
    error = plan_error(spec, MIXED)
    assert "CrossEntropyLoss" in error.detail
    assert first_loc(error) == ["loss"]


def test_plan_cross_entropy_on_non_integral_float_target_is_rejected():
    spec = make_spec(target="score", features=["age"], model=[linear(2)])
    error = plan_error(spec, MIXED)
    assert "'score'" in error.detail
    assert first_loc(error) == ["target"]


def test_plan_cross_entropy_on_whole_number_float_target_is_accepted():
    spec = make_spec(target="grade", features=["age"], model=[linear(3)])
    plan = plan_training(spec, MIXED, LIMITS)
    assert plan.classes == [1, 2, 3]


def test_plan_cross_entropy_takes_one_target_column():
    spec = make_spec(target=["grade", "age"], features=["height"], model=[linear(3)])
    assert first_loc(plan_error(spec, MIXED)) == ["target"]


def test_plan_single_class_target_is_rejected():
    error = plan_error(make_spec(), schema_of(x0=[0.0, 1.0], x1=[1.0, 0.0], label=[1, 1]))
    assert "single class" in error.detail
    assert first_loc(error) == ["target"]


def test_plan_binary_with_two_classes_and_one_logit():
    plan = plan_training(make_spec(model=[linear(8), "Tanh", linear(1)], loss="BCEWithLogitsLoss"), MOONS, LIMITS)
    assert plan.task == "binary"
    assert plan.out_features == 1
    assert plan.classes == [0, 1]


def test_plan_binary_needs_exactly_two_classes():
    spec = make_spec(target="species", features=["age"], model=[linear(1)], loss="BCEWithLogitsLoss")
    error = plan_error(spec, MIXED)
    assert "exactly 2 classes" in error.detail
    assert first_loc(error) == ["loss"]


def test_plan_binary_needs_width_one():
    error = plan_error(make_spec(model=[linear(8), "Tanh", linear(2)], loss="BCEWithLogitsLoss"), MOONS)
    assert "1 logit" in error.detail
    assert first_loc(error) == ["model", 2, "out_features"]


def test_plan_rejects_model_without_trainable_parameters():
    # One feature in, one target out: the widths fit, but there is nothing for the optimizer to train.
    spec = make_spec(target="y", model=["Tanh"], loss="MSELoss")
    error = plan_error(spec, schema_of(x=[0.0, 1.0, 2.0], y=[0.5, 1.5, 2.5]))
    assert first_loc(error) == ["model"]


# -- plan_training: limits ---------------------------------------------------------------------------


def test_plan_epochs_limit():
    assert plan_training(make_spec(epochs=1_000), MOONS, LIMITS).task == "classification"
    error = plan_error(make_spec(epochs=1_001), MOONS)
    assert "1001" in error.detail
    assert "1000" in error.detail
    assert first_loc(error) == ["epochs"]


def test_plan_layer_width_limit():
    assert plan_training(make_spec(model=[linear(512), "Tanh", linear(2)]), MOONS, LIMITS).out_features == 2
    error = plan_error(make_spec(model=[linear(8), "Tanh", linear(513), "Tanh", linear(2)]), MOONS)
    assert "513" in error.detail
    assert first_loc(error) == ["model", 2, "out_features"]


def test_plan_parameter_limit():
    model = [linear(300), "Tanh", linear(300), "Tanh", linear(2)]  # 900 + 90,300 + 602 = 91,802
    assert plan_training(make_spec(model=model), MOONS, LIMITS).n_parameters == 91_802
    tight = Limits(max_epochs=1_000, max_parameters=91_801, max_layer_width=512)
    error = plan_error(make_spec(model=model), MOONS, tight)
    assert "91,802" in error.detail
    assert first_loc(error) == ["model"]


def test_estimated_memory_counts_table_weights_and_activations():
    spec = make_spec(model=[linear(30), "Tanh", linear(2)], batch_size=4)  # 2*30+30 + 30*2+2 = 152 parameters
    # 4 bytes x (2 x 4 rows x 3 columns + 4 x 152 + 2 x 4 x (3 + 30 + 30 + 2))
    assert estimate_memory_bytes(spec, 4, 3, 152) == 4 * (24 + 608 + 520)


def test_plan_estimated_memory_limit():
    spec = make_spec(model=[linear(512), "Tanh", linear(2)], batch_size=4)
    fits = Limits(max_epochs=1_000, max_parameters=100_000, max_layer_width=512, max_memory_bytes=10**6)
    assert plan_training(spec, MOONS, fits).n_parameters == 2 * 512 + 512 + 512 * 2 + 2
    tight = Limits(max_epochs=1_000, max_parameters=100_000, max_layer_width=512, max_memory_bytes=10_000)
    error = plan_error(spec, MOONS, tight)
    assert "training would need about" in error.detail
    assert "batch_size 4" in error.detail
    assert first_loc(error) == ["batch_size"]


def test_plan_counts_normalisation_parameters():
    model = [linear(8), {"type": "BatchNorm1d"}, {"type": "LayerNorm", "elementwise_affine": True}, linear(2)]
    plan = plan_training(make_spec(model=model), MOONS, LIMITS)
    assert plan.n_parameters == (2 * 8 + 8) + 2 * 8 + 2 * 8 + (8 * 2 + 2)
    no_affine = [linear(8), {"type": "BatchNorm1d", "affine": False}, linear(2)]
    assert plan_training(make_spec(model=no_affine), MOONS, LIMITS).n_parameters == (2 * 8 + 8) + (8 * 2 + 2)


def test_plan_validation_split_leaving_no_validation_rows():
    error = plan_error(make_spec(validation_split=0.2), MOONS)  # 4 rows * 0.2 < 1
    assert first_loc(error) == ["validation_split"]
    five_rows = schema_of(x0=[0.0, 1, 2, 3, 4], x1=[1.0, 0, 1, 0, 1], label=[0, 1, 0, 1, 0])
    assert plan_training(make_spec(validation_split=0.2), five_rows, LIMITS).task == "classification"


def test_a_batch_larger_than_the_training_rows_is_refused_naming_batch_size_and_the_split():
    plan = plan_training(make_spec(batch_size=5), MOONS, LIMITS)
    with pytest.raises(InvalidInput) as no_split:
        S.check_batch(make_spec(batch_size=5), MOONS, plan)
    assert no_split.value.detail == (
        "the dataset has 4 row(s), fewer than one batch (batch_size 5): set batch_size to at most 4"
    )
    assert first_loc(no_split.value) == ["batch_size"]
    five_rows = schema_of(x0=[0.0, 1, 2, 3, 4], x1=[1.0, 0, 1, 0, 1], label=[0, 1, 0, 1, 0])
    held_out = make_spec(batch_size=5, validation_split=0.2)
    with pytest.raises(InvalidInput) as split:
        S.check_batch(held_out, five_rows, plan_training(held_out, five_rows, LIMITS))
    assert "validation_split leaves 4 training row(s) of 5" in split.value.detail
    assert "or hold out a smaller share in validation_split" in split.value.detail
    assert [e["loc"] for e in split.value.errors] == [["batch_size"], ["validation_split"]]
    S.check_batch(make_spec(batch_size=4), MOONS, plan)  # one batch exactly: fine


def test_plan_batchnorm_needs_batches_of_two():
    model = [linear(8), {"type": "BatchNorm1d"}, "ReLU", linear(2)]
    error = plan_error(make_spec(model=model, batch_size=1), MOONS)
    assert "BatchNorm1d" in error.detail
    assert first_loc(error) == ["batch_size"]
    assert plan_training(make_spec(model=model, batch_size=2), MOONS, LIMITS).task == "classification"


@pytest.mark.parametrize(
    ("loss", "task"),
    [
        ("CrossEntropyLoss", "classification"),
        ("BCEWithLogitsLoss", "binary"),
        ("MSELoss", "regression"),
        ("L1Loss", "regression"),
        ("HuberLoss", "regression"),
        ("SmoothL1Loss", "regression"),
    ],
)
def test_task_of_loss(loss, task):
    assert S.task_of(make_spec(loss=loss).loss) == task


# -- loop: which training loop runs (formerly "compile") ------------------------------------------------


@pytest.mark.parametrize(("old", "new"), [("auto", "auto"), ("off", "eager")])
def test_the_old_compile_field_still_means_the_same_loop(old, new):
    spec = make_spec(compile=old)
    assert spec.loop == new
    assert "compile" not in spec.model_dump()
    # A model or job stored with the old name loads as before, and dumps the new one.
    assert TrainSpec.model_validate(spec.model_dump(mode="json")).loop == new


def test_loop_takes_auto_or_eager_and_not_both_names():
    assert make_spec().loop == "auto"
    assert make_spec(loop="eager").loop == "eager"
    with pytest.raises(ValidationError, match="'auto' or 'eager'"):
        make_spec(loop="off")
    with pytest.raises(ValidationError, match=r"loop .* or its old name compile, not both"):
        make_spec(loop="eager", compile="off")


def test_the_checkpoint_fingerprint_ignores_the_loop():
    default = _fingerprint(make_spec(), 10, 2)
    assert _fingerprint(make_spec(loop="eager"), 10, 2) == default
    assert _fingerprint(make_spec(compile="off"), 10, 2) == default
    assert _fingerprint(make_spec(epochs=3), 10, 2) != default  # what the run computes does count


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        ({"type": "Linear", "in_features": 2, "out_features": 2}, "in_features"),
        ({"type": "BatchNorm1d", "num_features": 2}, "num_features"),
        ({"type": "LayerNorm", "normalized_shape": 2}, "normalized_shape"),
    ],
)
def test_an_input_width_in_the_spec_is_refused_saying_it_is_inferred(layer: dict[str, object], name: str) -> None:
    with pytest.raises(ValidationError) as error:
        TrainSpec.model_validate({"model": [layer, {"type": "Linear", "out_features": 1}], "loss": "MSELoss"})
    message = str(error.value)
    assert f"{name} is inferred from the data" in message
    assert "remove it from the spec" in message
    assert "Extra inputs are not permitted" not in message
