"""Issue #13, part B, end to end: a real table (numbers with blanks, text categories with blanks,
a 10:1 text label) uploaded as pandas writes it, trained with a spec that names only layers,
loss, optimizer and epochs, scored on a holdout against a scikit-learn pipeline, and predicted
with blanks and unseen categories through JSON, CSV and an export.

One model per server (the session ``server`` runs on SQLite and on PostgreSQL), a table of
1,100 rows and 30 epochs: seconds of training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import Server
from trainserve.client import TrainserveClient

N_ROWS = 1100
HOLDOUT = 0.2
HEADER = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "island", "sex", "species"]
SPEC: dict[str, Any] = {
    "model": [{"type": "Linear", "out_features": 32}, {"type": "ReLU"}, {"type": "Linear", "out_features": 2}],
    "loss": "CrossEntropyLoss",
    "optimizer": {"type": "Adam", "lr": 0.01},
    "epochs": 30,
}


def penguins(seed: int = 0) -> list[list[Any]]:
    """A made-up table in the shape of the Palmer penguins: the label depends on the numbers
    and the island; 30% of two number columns and of island are blank; about 10:1 classes."""
    rng = np.random.default_rng(seed)
    length = np.round(rng.normal(44, 5, N_ROWS), 1)
    depth = np.round(rng.normal(17, 2, N_ROWS), 1)
    flipper = rng.integers(170, 230, N_ROWS)
    island = rng.choice(["Biscoe", "Dream", "Torgersen"], N_ROWS)
    sex = rng.choice(["male", "female"], N_ROWS)
    score = 0.6 * (length - 44) - 0.5 * (depth - 17) + 2.5 * (island == "Dream") + rng.normal(0, 0.8, N_ROWS)
    species = np.where(score > np.quantile(score, 10 / 11), "Chinstrap", "Adelie")
    rows: list[list[Any]] = []
    for i in range(N_ROWS):
        row: list[Any] = [length[i], depth[i], int(flipper[i]), island[i], sex[i], species[i]]
        for j in (0, 1, 3):
            if rng.random() < 0.3:
                row[j] = None
        if rng.random() < 0.05:
            row[4] = None
        rows.append(row)
    return rows


def pandas_csv(rows: list[list[Any]], header: list[str] = HEADER) -> bytes:
    """What ``DataFrame.to_csv(index=False)`` writes: a header, floats as repr, NaN and None as empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else repr(float(v)) if isinstance(v, float) else v for v in row] for row in rows)
    return out.getvalue().encode()


def holdout_split(rows: list[list[Any]]) -> tuple[list[int], list[int]]:
    """A stratified, seeded holdout: the same rows for the service and for scikit-learn."""
    labels = np.array([row[-1] for row in rows])
    rng = np.random.default_rng(42)
    test: list[int] = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        test += rng.permutation(members)[: round(len(members) * HOLDOUT)].tolist()
    held = set(test)
    return [i for i in range(len(rows)) if i not in held], sorted(test)


def sklearn_accuracy(
    rows: list[list[Any]], train: list[int], test: list[int], numbers: int = 3, texts: int = 2
) -> float:
    """SimpleImputer + OneHotEncoder + StandardScaler + MLPClassifier on the same split; the
    first ``numbers`` columns are numbers, the ``texts`` after them categories, the last the label."""
    from sklearn.compose import ColumnTransformer
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.impute import SimpleImputer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    number_values = np.array([[np.nan if v is None else float(v) for v in row[:numbers]] for row in rows])
    text_values = np.array(
        [["" if v is None else v for v in row[numbers : numbers + texts]] for row in rows], dtype=object
    ).reshape(len(rows), texts)
    x = np.concatenate([number_values.astype(object), text_values], axis=1)
    y = np.array([row[-1] for row in rows])
    prepare = ColumnTransformer(
        [
            (
                "numbers",
                make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()),
                list(range(numbers)),
            ),
            # a blank ("") is a level of its own
            ("categories", OneHotEncoder(handle_unknown="ignore"), list(range(numbers, numbers + texts))),
        ]
    )
    model = make_pipeline(prepare, MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x[train], y[train])
    return float((model.predict(x[test]) == y[test]).mean())


@pytest.fixture(scope="module")
def trained(server: Server) -> dict[str, Any]:
    rows = penguins()
    train, test = holdout_split(rows)
    training_rows = [rows[i] for i in train]
    for i in (5, 50, 500):  # a few blank labels: dropped, and counted in the job's notes
        training_rows[i] = [*training_rows[i][:-1], None]
    with TrainserveClient(server.url, timeout=60) as ts:
        dataset = ts.upload_dataset(pandas_csv(training_rows), "penguins.csv")
        job = ts.wait(ts.train({**SPEC, "dataset_id": dataset.id, "name": "penguins"}).id, timeout=300)
        assert job.status == "succeeded", job.error
    return {"rows": rows, "train": train, "test": test, "job": job, "model_id": job.model_id}


def test_a_real_table_trains_with_no_preprocessing_and_matches_scikit_learn(
    client: TrainserveClient, trained: dict[str, Any]
) -> None:
    rows, test = trained["rows"], trained["test"]
    assert "3 row(s) of 880 dropped: blank target" in trained["job"].notes
    model = client.http.get(f"/models/{trained['model_id']}").json()
    assert model["classes"] == ["Adelie", "Chinstrap"]
    by_name = {c["name"]: c for c in model["preprocessing"]}
    assert by_name["bill_length_mm"]["indicator"] is True
    assert by_name["flipper_length_mm"]["indicator"] is False
    assert (by_name["island"]["kind"], by_name["island"]["levels"], by_name["island"]["blank_level"]) == (
        "category",
        3,
        True,
    )
    assert by_name["sex"]["encoding"] == "one_hot"
    # The holdout through CSV /predict, blanks and all, as pandas would write it.
    holdout = [rows[i] for i in test]
    answer = client.http.post(
        "/predict",
        params={"model_id": trained["model_id"]},
        content=pandas_csv(holdout),
        headers={"content-type": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    predicted = [line["predicted_species"] for line in csv.DictReader(io.StringIO(answer.text))]
    accuracy = float(np.mean([p == row[-1] for p, row in zip(predicted, holdout, strict=True)]))
    reference = sklearn_accuracy(rows, trained["train"], test)
    assert accuracy >= reference - 0.02, (accuracy, reference)
    assert accuracy > 10 / 11 + 0.02  # better than always answering the common class
    # POST /models/{id}/evaluate on the same holdout, text categories and blanks included,
    # scores exactly what /predict answered.
    scored = client.evaluate_model(trained["model_id"], client.upload_dataset(pandas_csv(holdout), "holdout.csv").id)
    assert scored.metrics["accuracy"] == pytest.approx(accuracy)


UNSEEN: list[dict[str, Any]] = [
    {"bill_length_mm": 39.1, "bill_depth_mm": 18.7, "flipper_length_mm": 181, "island": "Torgersen", "sex": "male"},
    {"bill_length_mm": None, "bill_depth_mm": None, "flipper_length_mm": 200, "island": None, "sex": None},
    {"bill_length_mm": 50.0, "bill_depth_mm": 15.0, "flipper_length_mm": 210, "island": "Atlantis", "sex": "female"},
]


def test_blanks_and_unseen_categories_answer_200_with_warnings_through_json_csv_and_export(
    client: TrainserveClient, trained: dict[str, Any]
) -> None:
    model_id = trained["model_id"]
    body = client.http.post("/predict", json={"model_id": model_id, "inputs": UNSEEN}).json()
    assert len(body["predictions"]) == 3, body
    assert body["warnings"] == [
        {
            "row": 2,
            "column": "island",
            "value": "Atlantis",
            "message": "a category never seen in training: answered as the unknown level",
        }
    ]
    names = HEADER[:-1]
    as_csv = pandas_csv([[row[n] for n in names] for row in UNSEEN], names)
    answer = client.http.post(
        "/predict", params={"model_id": model_id}, content=as_csv, headers={"content-type": "text/csv"}
    )
    assert answer.status_code == 200, answer.text
    lines = list(csv.DictReader(io.StringIO(answer.text)))
    assert lines[2]["warnings"] == "island: a category never seen in training: answered as the unknown level"
    probability_columns = ["probability_Adelie", "probability_Chinstrap"]
    csv_probabilities = np.array([[float(line[c]) for c in probability_columns] for line in lines])
    np.testing.assert_allclose(csv_probabilities, body["probabilities"], rtol=1e-5, atol=1e-6)

    exported = client.http.get(f"/models/{model_id}/export", params={"format": "torch.export"})
    assert exported.status_code == 200, exported.text
    extra = {"trainserve.json": ""}
    program = torch.export.load(io.BytesIO(exported.content), extra_files=extra).module()
    layout = json.loads(extra["trainserve.json"])["preprocessing"]["raw_layout"]
    assert [c["column"] for c in layout] == names

    def code(column: dict[str, Any], value: Any) -> float:
        if value is None:
            return math.nan
        if column["kind"] != "category":
            return float(value)
        return float(column["levels"].index(value)) if value in column["levels"] else -1.0

    x = torch.tensor([[code(c, row[c["column"]]) for c in layout] for row in UNSEEN], dtype=torch.float32)
    with torch.no_grad():
        exported_probabilities = program(x).numpy()
    np.testing.assert_allclose(exported_probabilities, body["probabilities"], rtol=1e-5, atol=1e-6)


def whole_rows_model(client: TrainserveClient, header: list[str], rows: list[list[Any]]) -> str:
    """A model trained on ``rows`` whose ``row_id`` column is declared ignored; its id."""
    dataset = client.upload_dataset(pandas_csv(rows, header), "whole.csv")
    spec = {**SPEC, "dataset_id": dataset.id, "epochs": 2, "columns": {"row_id": {"type": "ignore"}}}
    job = client.wait(client.train(spec).id, timeout=120)
    assert job.status == "succeeded", job.error
    return str(job.model_id)


@pytest.mark.parametrize("categories", [True, False], ids=["preprocessed", "numbers-only"])
def test_whole_rows_as_uploaded_predict_with_their_ignored_and_target_columns_disregarded(
    client: TrainserveClient, categories: bool
) -> None:
    # A table with an id column declared ignored: with text categories (the preprocessed path)
    # and of numbers alone (a model that takes its features as they are).
    header = ["row_id", *HEADER] if categories else ["row_id", "bill_length_mm", "bill_depth_mm", "species"]
    table = [[i, *row] for i, row in enumerate(penguins(seed=1)[:300])]
    if not categories:
        table = [[i, 40.0 + i % 9, 15.0 + i % 4, row[-1]] for i, row in enumerate(penguins(seed=1)[:300])]
    model_id = whole_rows_model(client, header, table)
    detail = client.get_model(model_id)
    features = header[1:-1]
    assert (detail.features, detail.targets, detail.ignored_columns) == (features, ["species"], ["row_id"])

    # The rows sent back whole, as uploaded (id, features and label): the same answer as the
    # features alone.
    whole = [dict(zip(header, row, strict=True)) for row in table[:20]]
    just_features = [{k: v for k, v in row.items() if k in features} for row in whole]
    answer = client.http.post("/predict", json={"model_id": model_id, "inputs": whole})
    assert answer.status_code == 200, answer.text
    expected = client.predict(model_id, just_features)
    assert answer.json()["predictions"] == expected.predictions
    assert answer.json()["probabilities"] == expected.probabilities
    # The same rows as CSV: extra columns were always accepted there (and are echoed back).
    as_csv = client.predict_csv(pandas_csv(table[:20], header), model_id=model_id)
    lines = list(csv.DictReader(io.StringIO(as_csv.decode())))
    assert [line["predicted_species"] for line in lines] == expected.predictions
    assert [line["row_id"] for line in lines] == [str(row[0]) for row in table[:20]]

    # A column the model never saw is still refused, naming it and what the model takes.
    stray = [{**whole[0], "row_idd": 1}]
    refused = client.http.post("/predict", json={"model_id": model_id, "inputs": stray})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == (
        f"inputs[0]: unknown feature 'row_idd' (the model takes {features}; it disregards ['row_id', 'species'])"
    )
    # ... and so is a row that has the ignored columns but lacks a feature.
    short = [{k: v for k, v in whole[0].items() if k != "bill_depth_mm"}]
    lacking = client.http.post("/predict", json={"model_id": model_id, "inputs": short})
    assert lacking.status_code == 422, lacking.text
    assert lacking.json()["detail"] == "inputs[0]: feature 'bill_depth_mm' is missing"


def test_class_weights_a_stratified_test_split_and_the_confusion_plot(
    client: TrainserveClient, trained: dict[str, Any]
) -> None:
    model = client.get_model(trained["model_id"])
    spec = {
        **SPEC,
        "dataset_id": model.dataset_id,
        "epochs": 5,
        "loss": {"type": "CrossEntropyLoss", "weight": "balanced"},
        "split": {"validation": 0.2, "test": 0.1, "stratify": True},
        "columns": {"flipper_length_mm": {"type": "ignore"}, "sex": {"missing": "drop_row"}},
    }
    job = client.wait(client.train(spec).id, timeout=300)
    assert job.status == "succeeded", job.error
    detail = client.http.get(f"/models/{job.model_id}").json()
    assert [c["name"] for c in detail["preprocessing"]] == ["bill_length_mm", "bill_depth_mm", "island", "sex"]
    test = detail["evaluation"]["test"]
    assert set(test) >= {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "per_class"}
    assert test["per_class"]["Chinstrap"]["support"] >= 1  # stratified: the rare class is in the test rows
    assert detail["metrics"]["test_balanced_accuracy"] == test["balanced_accuracy"]
    assert "validation" in detail["evaluation"]
    assert client.confusion_plot(job.model_id or "", part="validation").startswith(b"\x89PNG")
    assert client.http.get(f"/models/{trained['model_id']}/confusion.png").status_code == 409


def breast_cancer() -> tuple[list[str], list[list[Any]]]:
    """scikit-learn's bundled Wisconsin breast cancer table (569 rows, 30 measurements; no
    network), its label as the class names, and a blank knocked into 3% of three columns."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = np.random.default_rng(3)
    rows: list[list[Any]] = []
    for features, target in zip(data.data.tolist(), data.target.tolist(), strict=True):
        row: list[Any] = [*features, str(data.target_names[target])]
        for j in (0, 7, 21):
            if rng.random() < 0.03:
                row[j] = None
        rows.append(row)
    return [*data.feature_names.tolist(), "diagnosis"], rows


# Training and scoring check the engine and the preprocessing, not the database: the embedded
# backend suffices (CI time), as in tests/test_guide_parity.py.
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_a_table_a_package_ships_trains_as_pandas_writes_it_and_matches_scikit_learn(
    client: TrainserveClient, server: Server
) -> None:
    header, rows = breast_cancer()
    train, test = holdout_split(rows)
    dataset = client.upload_dataset(pandas_csv([rows[i] for i in train], header), "breast_cancer.csv")
    by_name = {c.name: c for c in dataset.columns}
    assert (by_name["mean radius"].kind, by_name["diagnosis"].classes) == ("number", ["benign", "malignant"])
    assert by_name["mean radius"].missing > 0
    job = client.wait(client.train({**SPEC, "dataset_id": dataset.id}).id, timeout=300)
    assert job.status == "succeeded", job.error
    holdout = [rows[i] for i in test]
    answer = client.http.post(
        "/predict",
        params={"model_id": job.model_id},
        content=pandas_csv(holdout, header),
        headers={"content-type": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    predicted = [line["predicted_diagnosis"] for line in csv.DictReader(io.StringIO(answer.text))]
    accuracy = float(np.mean([p == row[-1] for p, row in zip(predicted, holdout, strict=True)]))
    reference = sklearn_accuracy(rows, train, test, numbers=len(header) - 1, texts=0)
    assert accuracy >= reference - 0.02, (accuracy, reference)
    assert accuracy > 0.9, accuracy
