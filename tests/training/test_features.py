"""Columns to features (trainserve.training.features): fitted on the training split, the raw
layout and its encoder, the rows that cannot train, reproducibility, and the spec's refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainserve.datasets.tables import Table
from trainserve.errors import InvalidInput
from trainserve.training import features, loop, network
from trainserve.training.spec import Limits, TrainSpec, plan_training

LIMITS = Limits(max_epochs=1000, max_parameters=100_000, max_layer_width=512)
LAYERS: list[Any] = [{"type": "Linear", "out_features": 8}, "ReLU", {"type": "Linear", "out_features": 2}]


def make_spec(**fields: Any) -> TrainSpec:
    base: dict[str, Any] = {"model": LAYERS, "loss": "CrossEntropyLoss", "epochs": 3, "batch_size": 8}
    return TrainSpec.model_validate({**base, **fields})


def mixed_table(n: int = 120, seed: int = 0) -> Table:
    """Numbers with blanks, a clean number, a text category with blanks, a text label (10:1)."""
    rng = np.random.default_rng(seed)
    length = rng.normal(40, 5, n)
    length[rng.random(n) < 0.3] = np.nan
    depth = rng.normal(17, 2, n)
    island = rng.choice(np.array(["Biscoe", "Dream", "Torgersen", ""]), n)
    label = np.where(rng.random(n) < 1 / 11, "rare", "common")
    return Table(["length", "depth", "island", "label"], [length, depth, island, label])


def prepared(table: Table, spec: TrainSpec) -> features.Prepared:
    return features.prepare(table, spec, plan_training(spec, table.schema(), LIMITS), LIMITS)


def refusal(spec: TrainSpec, table: Table) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        prepared(table, spec)
    return info.value


# -- fitting ----------------------------------------------------------------------------------------


def test_fitted_on_the_training_rows_only():
    table = Table(["x", "c", "y"], [np.array([1.0, 2.0, np.nan, 100.0]), np.array(["a", "b", "", "z"]), np.zeros(4)])
    plan = features.fit(table, ["x", "c"], make_spec(), np.array([0, 1, 2]), max_levels=10)
    x, c = plan.columns
    assert (x.kind, x.missing, x.fill_value, x.indicator) == ("number", "median", 1.5, True)  # 100 is not seen
    assert (c.kind, c.levels, c.blank_level) == ("category", ["a", "b"], True)  # nor "z"
    assert plan.width == 2 + 3


def test_raw_layout_and_encoder():
    table = Table(["x", "c", "y"], [np.array([1.0, np.nan, 3.0]), np.array(["b", "", "a"]), np.zeros(3)])
    plan = features.fit(table, ["x", "c"], make_spec(), np.arange(3), max_levels=10)
    raw, unseen = features.raw_matrix(plan, [np.array([np.nan, 5.0]), np.array(["a", "never"])])
    assert np.isnan(raw[0, 0])
    assert raw[1, 0] == 5.0
    assert raw[0, 1] == 0
    assert raw[1, 1] == -1
    assert unseen[1].tolist() == [False, True]
    encoded = network.FeatureEncoder(plan)(torch.from_numpy(raw)).numpy()
    # x filled with its median (2.0), x's indicator, then c's levels a, b and its blank level.
    assert encoded.tolist() == [[2.0, 1.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]]
    blank = network.FeatureEncoder(plan)(torch.tensor([[1.0, float("nan")]])).numpy()
    assert blank.tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]]


def test_overrides_mean_constant_and_category_of_numbers():
    table = Table(
        ["x", "code", "c", "y"],
        [np.array([1.0, 2.0, np.nan, 6.0]), np.array([3, 1, 3, 2]), np.array(["a", "", "b", "a"]), np.zeros(4)],
    )
    spec = make_spec(
        columns={
            "x": {"missing": "mean"},
            "code": {"type": "category"},
            "c": {"missing": "constant", "fill_value": "b"},
        }
    )
    plan = features.fit(table, ["x", "code", "c"], spec, np.arange(4), max_levels=10)
    x, code, c = plan.columns
    assert x.fill_value == 3.0
    assert x.indicator
    assert code.levels == [1.0, 2.0, 3.0]
    assert code.level_type == "number"
    assert c.levels == ["a", "b"]
    assert not c.blank_level
    raw, _ = features.raw_matrix(plan, [table.column(n) for n in plan.features])
    assert raw[:, 1].tolist() == [2, 0, 2, 1]
    assert raw[:, 2].tolist() == [0, 1, 1, 0]  # the blank became "b"


def test_a_clean_numeric_table_needs_no_encoder_and_trains_exactly_as_before():
    rng = np.random.default_rng(1)
    table = Table(["a", "b", "y"], [rng.normal(size=60), rng.normal(size=60), rng.integers(0, 2, 60)])
    spec = make_spec(validation_split=0.2)
    plan = plan_training(spec, table.schema(), LIMITS)
    ready = features.prepare(table, spec, plan, LIMITS)
    assert ready.features.is_identity
    assert ready.plan == plan
    assert ready.notes == []
    np.testing.assert_array_equal(ready.x, table.matrix(["a", "b"]))
    before = loop.train(spec, plan, table.matrix(plan.features), table.column("y"))
    after = loop.train(spec, ready.plan, ready.x, ready.y, split=ready.split)
    for key, value in before.module.state_dict().items():
        assert torch.equal(value, after.module.state_dict()[key]), key


def test_same_seed_data_and_spec_give_the_same_weights_bit_for_bit():
    table = mixed_table()
    spec = make_spec(split={"validation": 0.2, "test": 0.1, "stratify": True}, loss={"type": "CrossEntropyLoss"})
    runs = []
    for _ in range(2):
        ready = prepared(table, spec)
        result = loop.train(spec, ready.plan, ready.x, ready.y, split=ready.split)
        result.module.attach_encoder(network.FeatureEncoder(ready.features))
        runs.append(result.module.state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert any(key.startswith("encoder.") for key in runs[0])
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


# -- rows that cannot train -------------------------------------------------------------------------


def test_blank_targets_and_drop_row_blanks_are_dropped_and_counted():
    table = mixed_table()
    label = table.column("label").copy()
    label[[3, 7]] = ""
    table = Table(table.names, [*table.columns[:3], label])
    ready = prepared(table, make_spec(columns={"length": {"missing": "drop_row"}}))
    blank_length = int(np.isnan(table.column("length")).sum())
    assert ready.notes[0] == "2 row(s) of 120 dropped: blank target"
    assert ready.notes[1].startswith(f"{blank_length - int(np.isnan(table.column('length')[[3, 7]]).sum())} row(s)")
    assert len(ready.y) == len(ready.x) == 120 - 2 - int(ready.notes[1].split()[0])
    assert "" not in set(ready.y.tolist())
    assert not ready.features.columns[0].indicator  # drop_row: no blanks left to indicate


def test_number_asked_of_a_column_with_words_names_the_rows():
    table = Table(["x", "y"], [np.array(["1.5", "2", "n/a?", "4", "oops"]), np.array([0, 1, 0, 1, 0])])
    error = refusal(make_spec(columns={"x": {"type": "number"}}), table)
    assert "rows 3, 5" in error.detail
    assert "'n/a?'" in error.detail
    assert error.errors[0]["loc"] == ["columns", "x", "type"]


def test_missing_error_names_the_blank_rows():
    table = mixed_table()
    error = refusal(make_spec(columns={"island": {"missing": "error"}}), table)
    assert "island" in error.detail
    assert "blank" in error.detail


# -- splits and class weights -----------------------------------------------------------------------


def test_stratified_split_keeps_each_class_in_every_part():
    labels = np.array([0] * 100 + [1] * 10)
    spec = make_spec(split={"validation": 0.2, "test": 0.1, "stratify": True})
    split = loop.split_rows(spec, len(labels), labels)
    for part, rare in ((split.train, 7), (split.validation, 2), (split.test, 1)):
        assert int((labels[part] == 1).sum()) == rare
    together = np.concatenate([split.train, split.validation, split.test])
    assert sorted(together.tolist()) == list(range(110))


def test_validation_split_alone_splits_as_it_always_did():
    spec = make_spec(validation_split=0.25)
    split = loop.split_rows(spec, 40)
    train, val = loop.split_indices(40, 0.25, 0)
    assert split.train.tolist() == train.tolist()
    assert split.validation.tolist() == val.tolist()
    assert len(split.test) == 0


def test_balanced_class_weights_are_counted_on_the_training_labels():
    loss = make_spec(loss={"type": "CrossEntropyLoss", "weight": "balanced"}).loss
    module = loop.build_loss(loss, torch.tensor([0] * 9 + [1] * 3), 2)
    assert isinstance(module, torch.nn.CrossEntropyLoss)
    assert module.weight is not None
    assert module.weight.tolist() == pytest.approx([12 / 18, 12 / 6])
    binary = make_spec(loss={"type": "BCEWithLogitsLoss", "pos_weight": "balanced"}).loss
    weighted = loop.build_loss(binary, torch.tensor([[0.0]] * 9 + [[1.0]] * 3))
    assert isinstance(weighted, torch.nn.BCEWithLogitsLoss)
    assert weighted.pos_weight is not None
    assert weighted.pos_weight.tolist() == [3.0]


def test_a_test_split_is_scored_once_with_the_full_report():
    table = mixed_table(200)
    spec = make_spec(
        split={"validation": 0.2, "test": 0.2, "stratify": True},
        loss={"type": "CrossEntropyLoss", "weight": "balanced"},
    )
    ready = prepared(table, spec)
    result = loop.train(spec, ready.plan, ready.x, ready.y, split=ready.split)
    test = result.evaluation["test"]
    assert test["n"] == len(ready.split.test) == 40
    assert set(test["per_class"]) == {"common", "rare"}
    assert np.array(test["confusion_matrix"]).sum() == 40
    assert {"validation", "test"} == set(result.evaluation)
    assert result.metrics["test_balanced_accuracy"] == test["balanced_accuracy"]


# -- the spec's refusals ----------------------------------------------------------------------------


def plan_refusal(spec: TrainSpec, table: Table, limits: Limits = LIMITS) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        plan_training(spec, table.schema(), limits)
    return info.value


def test_target_listed_twice_is_refused():
    with pytest.raises(ValidationError, match="listed twice"):
        make_spec(target=["label", "label"])


def test_split_and_validation_split_together_are_refused():
    with pytest.raises(ValidationError, match="either validation_split or split"):
        make_spec(validation_split=0.2, split={"validation": 0.2})


def test_fill_value_without_constant_and_constant_without_fill_value_are_refused():
    with pytest.raises(ValidationError, match="fill_value goes with"):
        make_spec(columns={"x": {"fill_value": 0}})
    with pytest.raises(ValidationError, match="needs a fill_value"):
        make_spec(columns={"x": {"missing": "constant"}})


@pytest.mark.parametrize(
    ("fields", "words", "loc"),
    [
        ({"features": ["length", "label"]}, "both a feature and the target", ["features"]),
        ({"columns": {"ghost": {"type": "ignore"}}}, "'ghost' is not in the dataset", ["columns", "ghost"]),
        (
            {"columns": {"length": {"missing": "constant", "fill_value": "zero"}}},
            "fill_value must be a number",
            ["columns", "length", "fill_value"],
        ),
        (
            {"columns": {"island": {"missing": "constant", "fill_value": 3}}},
            "fill_value must be a label",
            ["columns", "island", "fill_value"],
        ),
        ({"columns": {"island": {"missing": "median"}}}, "'median' is for numbers", ["columns", "island", "missing"]),
        ({"validation_split": 0.999}, "training row(s)", ["validation_split"]),
        ({"columns": {"label": {"type": "ignore"}}}, "is the target", ["columns", "label"]),
    ],
    ids=["target-as-feature", "unknown-column", "fill-text", "fill-number", "median-category", "split", "target"],
)
def test_plan_refusals_name_the_field(fields, words, loc):
    error = plan_refusal(make_spec(**fields), mixed_table(100))
    assert words in error.detail
    assert error.errors[0]["loc"] == loc


def test_a_column_missing_in_every_row_is_refused():
    table = Table(["x", "empty", "y"], [np.arange(6.0), np.full(6, np.nan), np.array([0, 1] * 3)])
    error = plan_refusal(make_spec(), table)
    assert "'empty' is missing in every row" in error.detail
    assert '"type": "ignore"' in error.detail


def test_a_category_over_the_level_limit_is_refused():
    table = Table(["id", "y"], [np.array([f"row{i}" for i in range(30)]), np.array([0, 1] * 15)])
    error = plan_refusal(make_spec(), table, Limits(1000, 100_000, 512, max_category_levels=20))
    assert "30 distinct values, the limit is 20" in error.detail


def test_a_target_with_one_class_after_blanks_is_refused():
    table = Table(["x", "y"], [np.arange(4.0), np.array(["yes", "", "yes", "yes"])])
    assert "single class" in plan_refusal(make_spec(), table).detail


def test_ignore_leaves_a_column_out():
    spec = make_spec(columns={"island": {"type": "ignore"}})
    assert plan_training(spec, mixed_table().schema(), LIMITS).features == ["length", "depth"]


# -- embeddings -------------------------------------------------------------------------------------


def test_a_wide_category_is_embedded_trains_and_serves_unknown_levels_as_zero():
    rng = np.random.default_rng(3)
    n = 300
    city = np.array([f"city{i}" for i in rng.integers(0, 60, n)])  # 60 levels: embedded by default
    city[rng.random(n) < 0.1] = ""
    x = rng.normal(size=n)
    label = np.where(x > 0, "up", "down")
    table = Table(["x", "city", "label"], [x, city, label])
    spec = make_spec(columns={"x": {"type": "number"}}, validation_split=0.2, epochs=1)
    plan = plan_training(spec, table.schema(), LIMITS)
    levels = len(set(city.tolist()) - {""})
    assert levels > 50
    assert plan.embeddings == ((levels + 2, 16),)
    ready = features.prepare(table, spec, plan, LIMITS)
    column = ready.features.columns[1]
    assert (column.encoding, column.blank_level) == ("embedding", True)
    assert ready.x.shape[1] == 2  # x, then city's level index
    assert column.embedding_dim is not None
    assert ready.plan.in_features == 1 + column.embedding_dim
    runs = []
    for _ in range(2):
        result = loop.train(spec, ready.plan, ready.x, ready.y, split=ready.split)
        runs.append(result)
    assert "eager PyTorch (category embeddings" in runs[0].notes[0]
    first, second = (r.module.state_dict() for r in runs)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    model = runs[0].module
    model.attach_encoder(network.FeatureEncoder(ready.features))
    assert model.embeddings is not None
    embedding = model.embeddings.tables[0]
    assert isinstance(embedding, torch.nn.Embedding)
    table_weights = embedding.weight
    unknown = len(column.levels)
    assert torch.count_nonzero(table_weights[unknown]) == 0  # never trained: still zero
    raw, _ = features.raw_matrix(ready.features, [np.array([0.5, 0.5]), np.array(["city3", "atlantis"])])
    with torch.inference_mode():
        encoded = model.encoder(torch.from_numpy(raw))  # type: ignore[misc]
        assert encoded[:, 1].tolist() == [column.levels.index("city3"), unknown]
        assert model(torch.from_numpy(raw)).shape == (2, 2)


def test_embedding_dim_is_taken_from_the_spec():
    table = mixed_table()
    spec = make_spec(columns={"island": {"encoding": "embedding", "embedding_dim": 3}})
    ready = prepared(table, spec)
    assert ready.plan.embeddings == ((3 + 2, 3),)
    assert ready.plan.in_features == 3 + 3  # length and its indicator, depth, then island's 3 dims


def test_the_table_encoded_for_training_is_bit_for_bit_what_the_served_encoder_computes():
    table = mixed_table(300)
    city = np.array([f"c{i % 60}" for i in range(300)])
    city[::7] = ""
    city[250:260] = "new"
    table = Table([*table.names[:3], "city", "label"], [*table.columns[:3], city, table.column("label")])
    plan = features.fit(table, ["length", "depth", "island", "city"], make_spec(), np.arange(200), max_levels=100)
    assert plan.columns[3].embedded
    raw, unseen = features.raw_matrix(plan, [table.column(n) for n in plan.features])
    assert unseen  # rows 200.. hold levels the first 200 rows never had
    with torch.inference_mode():
        served = network.FeatureEncoder(plan)(torch.from_numpy(raw)).numpy()
    trained = features.encode_table(plan, table)
    assert served.tobytes() == trained.tobytes()
