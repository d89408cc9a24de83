"""Serving a model trained with preprocessing (trainserve.training.features): JSON rows with
strings and nulls, CSV with blanks, unseen categories answered with warnings, the row-wise and
torch paths agreeing, and exports that take the raw layout. In-process, CPU, a tiny model."""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from trainserve.datasets.tables import Table
from trainserve.errors import InvalidInput
from trainserve.serving.export import Exporter
from trainserve.serving.formats import CsvTable, csv_rows_to_raw, encode_csv, encode_json
from trainserve.serving.predictor import Predictor, inputs_to_raw
from trainserve.training import features, loop, network
from trainserve.training.native import RowwiseForward
from trainserve.training.spec import Limits, TrainSpec, plan_training

LIMITS = Limits(max_epochs=100, max_parameters=100_000, max_layer_width=512)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    rng = np.random.default_rng(0)
    n = 90
    size = rng.normal(10, 3, n)
    size[rng.random(n) < 0.3] = np.nan
    color = rng.choice(np.array(["red", "green", "blue", ""]), n)
    label = np.where((color == "red") | (np.nan_to_num(size, nan=10) > 12), "yes", "no")
    table = Table(["size", "color", "label"], [size, color, label])
    spec = TrainSpec.model_validate(
        {
            "model": [{"type": "Linear", "out_features": 8}, "Tanh", {"type": "Linear", "out_features": 2}],
            "loss": "CrossEntropyLoss",
            "optimizer": {"type": "Adam", "lr": 0.05},
            "epochs": 5,
        }
    )
    ready = features.prepare(table, spec, plan_training(spec, table.schema(), LIMITS), LIMITS)
    result = loop.train(spec, ready.plan, ready.x, ready.y, split=ready.split)
    result.module.attach_encoder(network.FeatureEncoder(ready.features))
    return Predictor(
        "m1",
        ready.plan.features,
        ready.plan.targets,
        "classification",
        ready.plan.classes,
        result.module,
        preprocessing=ready.features,
        rowwise=RowwiseForward(result.module, spec.model, ready.features.width, "classification"),
    )


ROWS: list[Any] = [
    {"size": 9.5, "color": "red"},
    {"size": None, "color": "green"},  # a blank number: imputed, with its indicator (training had blanks)
    {"size": 14.0, "color": None},  # a blank category: its own level (training had blanks)
    {"size": 11, "color": "purple"},  # never seen: the unknown level, and a warning
]


def test_json_rows_with_strings_and_nulls_answer_with_warnings(predictor: Predictor):
    raw = inputs_to_raw(ROWS, predictor.preprocessing, max_rows=100)  # type: ignore[arg-type]
    assert np.isnan(raw.matrix[1, 0])
    assert raw.matrix[3, 1] == -1
    assert raw.warnings == [
        {
            "row": 3,
            "column": "color",
            "value": "purple",
            "message": "a category never seen in training: answered as the unknown level",
        }
    ]
    body = orjson.loads(encode_json(predictor, predictor.infer(raw.matrix), raw.warnings))
    assert len(body["predictions"]) == 4
    assert set(body["predictions"]) <= {"yes", "no"}
    assert body["warnings"][0]["row"] == 3
    as_lists = inputs_to_raw([[r["size"], r["color"]] for r in ROWS], predictor.preprocessing, max_rows=100)  # type: ignore[arg-type]
    np.testing.assert_array_equal(as_lists.matrix, raw.matrix)


def test_rowwise_and_torch_paths_agree(predictor: Predictor):
    raw = inputs_to_raw(ROWS * 50, predictor.preprocessing, max_rows=1000).matrix  # type: ignore[arg-type]
    assert predictor.rowwise is not None
    rowwise = predictor.infer_rowwise(raw).probabilities
    assert rowwise is not None
    with torch.inference_mode():
        torch_path = torch.softmax(predictor.forward(torch.from_numpy(raw)), dim=1).numpy()
    np.testing.assert_allclose(rowwise, torch_path, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"size": 1e308, "color": "red"}, "out of float32 range"),
        ({"size": "big", "color": "red"}, "is not a number or null"),
        ({"size": 1.0, "color": 3}, "is not a string"),
        ({"size": True, "color": "red"}, "is not a number or null"),
    ],
    ids=["1e308", "text-number", "number-category", "boolean"],
)
def test_bad_cells_are_named(predictor: Predictor, row: dict[str, Any], words: str):
    with pytest.raises(InvalidInput) as info:
        inputs_to_raw([{"size": 1.0, "color": "red"}, row], predictor.preprocessing, max_rows=100)  # type: ignore[arg-type]
    assert words in info.value.detail
    assert info.value.detail.startswith("inputs[1], column")
    assert info.value.errors[0]["loc"][:2] == ["inputs", 1]


def test_csv_with_blanks_and_unseen_levels(predictor: Predictor):
    header = ["id", "color", "size"]
    rows = [["1", "red", "9.5"], ["2", "green", ""], ["3", "", "14"], ["4", "purple", "NA"]]
    raw = csv_rows_to_raw(header, rows, predictor.preprocessing)  # type: ignore[arg-type]
    assert raw.warnings[0]["row"] == 4  # rows of a file count from 1
    json_raw = inputs_to_raw(ROWS, predictor.preprocessing, max_rows=100).matrix  # type: ignore[arg-type]
    np.testing.assert_array_equal(raw.matrix[:3], json_raw[:3])
    table = CsvTable(header, rows, raw.matrix, raw.warnings)
    text = encode_csv(table, predictor, predictor.infer(raw.matrix)).decode()
    lines = text.splitlines()
    assert lines[0].endswith(",warnings")
    assert "color: a category never seen in training" in lines[4]
    with pytest.raises(InvalidInput, match="row 2, column 'size': 'huge' is not a number"):
        csv_rows_to_raw(header, [["1", "red", "1"], ["2", "red", "huge"]], predictor.preprocessing)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["torchscript", "torch.export"])
def test_export_takes_the_raw_layout_and_answers_as_predict(predictor: Predictor, fmt: str):
    info = {
        "task": "classification",
        "features": predictor.features,
        "targets": predictor.targets,
        "classes": predictor.classes,
        "preprocessing": predictor.preprocessing.export_layout(),  # type: ignore[union-attr]
    }
    exported = Exporter().export(predictor.module, fmt, model_id="m1", info=info)  # type: ignore[arg-type]
    extra = {"trainserve.json": ""}
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(exported.content), _extra_files=extra)
    else:
        module = torch.export.load(io.BytesIO(exported.content), extra_files=extra).module()
    metadata = json.loads(extra["trainserve.json"])
    layout = metadata["preprocessing"]["raw_layout"]
    assert [c["column"] for c in layout] == ["size", "color"]
    # Text to the raw layout with the vocabulary shipped in trainserve.json, as a user would.
    levels = layout[1]["levels"]
    codes = [
        float(levels.index(r["color"])) if r["color"] in levels else (np.nan if r["color"] is None else -1.0)
        for r in ROWS
    ]
    sizes = [np.nan if r["size"] is None else float(r["size"]) for r in ROWS]
    x = torch.tensor(np.column_stack([sizes, codes]), dtype=torch.float32)
    with torch.no_grad():
        exported_probabilities = module(x).numpy()
    served = predictor.infer(inputs_to_raw(ROWS, predictor.preprocessing, max_rows=100).matrix)  # type: ignore[arg-type]
    assert served.probabilities is not None
    np.testing.assert_allclose(exported_probabilities, served.probabilities, rtol=1e-5, atol=1e-6)
