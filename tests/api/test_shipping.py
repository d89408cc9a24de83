"""Shipping safely, end to end on real processes: aliases (promote, predict by alias, roll
back, history, a move through one API process seen by another), warm starts and retrain,
and the prediction log.

One API process with its worker, and a second API process (``--workers 0``) on the same
SQLite database, queue and store, as two replicas behind a load balancer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from playwright.sync_api import sync_playwright
from safetensors.torch import load

from tests.api.test_dashboard import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS
from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.api.schemas import DriftReport
from trainserve.client import TrainserveClient
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv

REVALIDATE_S = 0.3
DRIFT_WINDOW = 200


@dataclass
class Pair:
    a: Server  # API + worker
    b: Server  # API only, same database
    moons_csv: bytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, moons: tuple[bytes, int]) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("shipping")
    shared = {
        "TRAINSERVE_DATABASE_URL": f"sqlite:///{root / 'shared.db'}",
        "TRAINSERVE_QUEUE_URL": f"sqlite:///{root / 'queue.db'}",
        "TRAINSERVE_STORE_DIR": str(root / "store"),
        "TRAINSERVE_MODEL_CACHE_REVALIDATE_S": str(REVALIDATE_S),
        "TRAINSERVE_PREDICTION_LOG_SAMPLE": "1",
        "TRAINSERVE_DRIFT_WINDOW": str(DRIFT_WINDOW),
    }
    a = start_server(root / "a", env=shared)
    try:
        b = start_server(root / "b", workers=0, env=shared)
    except BaseException:
        stop_server(a)
        raise
    try:
        yield Pair(a, b, moons[0])
    finally:
        stop_server(b)
        stop_server(a)


def _train(client: TrainserveClient, dataset_id: str, **spec: object) -> str:
    job = client.train(moons_spec(dataset_id, **spec))
    done = client.wait(job.id, timeout=120)
    assert done.status == "succeeded", done.error
    assert done.model_id is not None
    return done.model_id


def _predict(server: Server, **selector: object) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json={**selector, "inputs": [[0.0, 0.5]]}, timeout=30)


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trainserve", *args, "--url", server.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_promote_predict_by_alias_roll_back_and_history(pair: Pair) -> None:
    with TrainserveClient(pair.a.url, timeout=60) as client:
        dataset = client.upload_dataset(pair.moons_csv, "moons.csv")
        first = _train(client, dataset.id, name="moons", seed=1, epochs=3)
        second = _train(client, dataset.id, name="moons", seed=2, epochs=2)

        # Without a production alias, the name answers from its newest version, and says so.
        answer = _predict(pair.a, name="moons")
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == "2"
        assert answer.json()["version"] == 2
        assert _predict(pair.b, name="moons").json()["version"] == 2  # B caches the name too

        # promote v1 through API A: A answers from it at once, B within its revalidation interval
        promoted = _cli(pair.a, "promote", "moons:1", "production", "--note", "v1 is better")
        assert promoted.returncode == 0, promoted.stderr
        assert _predict(pair.a, name="moons").headers["X-Model-Version"] == "1"
        moved_at = time.monotonic()
        while _predict(pair.b, name="moons").json()["version"] != 1:
            assert time.monotonic() - moved_at < 10 * REVALIDATE_S + 5, "API B never saw the alias move"
            time.sleep(0.05)
        answer = _predict(pair.b, name="moons", alias="production")
        assert (answer.json()["model_id"], answer.headers["X-Model-Version"]) == (first, "1")
        assert _predict(pair.b, name="moons", version=2).json()["model_id"] == second

        # bad input: nothing is created
        refused = httpx.put(f"{pair.a.url}/models/by-name/moons/aliases/Prod!", json={"version": 1})
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["loc"] == ["path", "alias"]
        refused = httpx.put(f"{pair.a.url}/models/by-name/moons/aliases/canary", json={"version": 9})
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["loc"] == ["body", "version"]
        assert _predict(pair.a, name="moons", alias="canary").status_code == 404
        assert _predict(pair.a, name="moons", alias="Canary!").status_code == 422
        held = httpx.delete(f"{pair.a.url}/models/{first}")
        assert held.status_code == 409
        assert "moons@production" in held.json()["detail"]

        # roll forward, then back; the history keeps every move, newest first
        client.set_alias("moons", "production", 2, note="try v2")
        assert _predict(pair.a, name="moons").json()["version"] == 2
        client.set_alias("moons", "production", 1, note="roll back")
        assert _predict(pair.a, name="moons").json()["version"] == 1
        named = client.get_model_name("moons")
        assert named.serving_version == 1
        assert [(a.alias, a.version) for a in named.aliases] == [("production", 1)]
        moves = [(e.from_version, e.to_version, e.note) for e in named.history]
        assert moves == [(2, 1, "roll back"), (1, 2, "try v2"), (None, 1, "v1 is better")]
        assert {e.who for e in named.history} == {None}  # a server without keys knows nobody
        listed = _cli(pair.a, "aliases", "moons")
        assert listed.returncode == 0, listed.stderr
        assert "production" in listed.stdout
        assert "roll back" in listed.stdout
        by_alias = _cli(pair.a, "predictions", "moons@production", "--json")
        assert by_alias.returncode == 0, by_alias.stderr

        # without the alias, the name follows its newest version again
        client.delete_alias("moons", "production", note="done")
        assert _predict(pair.a, name="moons").json()["version"] == 2
        assert client.get_model_name("moons").history[0].to_version is None


ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef"
DEFAULT_KEY = "default-key-0123456789abcdef"


def test_the_alias_history_records_which_named_key_moved_it(pair: Pair, tmp_path: Path) -> None:
    # A third API process on the pair's database, with two named keys and the single key.
    env = {
        **pair.a.env,
        "TRAINSERVE_API_KEYS": f"alice:{ALICE_KEY}, bob:{BOB_KEY}",
        "TRAINSERVE_API_KEY": DEFAULT_KEY,
    }
    keyed = start_server(tmp_path / "keyed", workers=0, env=env)
    try:
        with TrainserveClient(pair.a.url, timeout=60) as open_client:
            dataset = open_client.upload_dataset(pair.moons_csv, "moons.csv")
            _train(open_client, dataset.id, name="audited", epochs=1)
            _train(open_client, dataset.id, name="audited", epochs=1)
        url = f"{keyed.url}/models/by-name/audited/aliases"

        def as_(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}

        moved = httpx.put(f"{url}/production", json={"version": 1, "note": "first"}, headers=as_(ALICE_KEY))
        assert moved.status_code == 200, moved.text
        with TrainserveClient(keyed.url, api_key=BOB_KEY, timeout=60) as bob:
            bob.set_alias("audited", "production", 2, note="bob's turn")
        refused = httpx.put(f"{url}/canary", json={"version": 1}, headers=as_(ALICE_KEY + "x"))
        assert refused.status_code == 401
        deleted = httpx.delete(f"{url}/production", params={"note": "gone"}, headers=as_(DEFAULT_KEY))
        assert deleted.status_code == 204, deleted.text

        named = httpx.get(f"{keyed.url}/models/by-name/audited", headers=as_(BOB_KEY)).json()
        moves = [(e["from_version"], e["to_version"], e["who"]) for e in named["history"]]
        assert moves == [(2, None, "default"), (1, 2, "bob"), (None, 1, "alice")]  # the 401 left nothing
        listed = subprocess.run(
            [sys.executable, "-m", "trainserve", "aliases", "audited", "--url", keyed.url],
            env={**os.environ, "TRAINSERVE_API_KEY": ALICE_KEY},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        (row,) = [line.split() for line in listed.stdout.splitlines() if "bob's turn" in line]
        assert "bob" in row, listed.stdout  # the WHO column
        assert "WHO" in listed.stdout

        # /ui: the pill of an alias says who moved it there (the page uses the key typed in)
        with TrainserveClient(keyed.url, api_key=BOB_KEY, timeout=60) as bob:
            bob.set_alias("audited", "canary", 2, note="canary run")
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"{keyed.url}/ui")
                page.fill("#api-key", ALICE_KEY)
                page.click("#key-form button[type=submit]")
                pill = page.locator('article.model[data-model-name="audited"] [data-alias="canary"]')
                pill.wait_for()
                assert pill.get_attribute("title") == "canary run — moved here by bob"
            finally:
                browser.close()
    finally:
        stop_server(keyed)
    assert not any(key in keyed.log() for key in (ALICE_KEY, BOB_KEY, DEFAULT_KEY))


def test_the_prediction_log_records_requests_off_the_request_path(pair: Pair) -> None:
    with TrainserveClient(pair.b.url, timeout=60) as client, TrainserveClient(pair.a.url, timeout=60) as trainer:
        dataset = client.upload_dataset(pair.moons_csv, "moons.csv")
        model_id = _train(trainer, dataset.id, name="logged", epochs=3)
        rows = [[0.1, 0.2], [1.5, -0.3]]
        sent = [client.predict(None, rows, name="logged") for _ in range(3)]
        deadline = time.monotonic() + 10
        while len(logged := client.list_predictions(model_id, limit=10)) < 3:
            assert time.monotonic() < deadline, "the sampled requests never reached the log"
            time.sleep(0.05)
        assert all(entry.inputs == [pytest.approx(r) for r in rows] for entry in logged)
        assert logged[0].outputs == sent[0].predictions
        assert {(e.model_id, e.name, e.version) for e in logged} == {(model_id, "logged", 1)}
        shown = _cli(pair.b, "predictions", "logged", "--limit", "2")
        assert shown.returncode == 0, shown.stderr
        assert len(shown.stdout.strip().splitlines()) == 3  # header and two entries
        assert httpx.get(f"{pair.b.url}/models/{'0' * 32}/predictions").status_code == 404
        assert httpx.get(f"{pair.b.url}/models/{model_id}/predictions?limit=0").status_code == 422
        metrics = httpx.get(f"{pair.b.url}/metrics").text
        assert "trainserve_prediction_log_written_total" in metrics


def test_warm_start_retrain_and_what_they_refuse(pair: Pair, tmp_path: Path) -> None:
    with TrainserveClient(pair.a.url, timeout=60) as client:
        dataset = client.upload_dataset(pair.moons_csv, "moons.csv")
        parent_id = _train(client, dataset.id, name="warm", epochs=20)
        client.set_alias("warm", "production", 1)
        parent_job = client.get_job(client.get_model(parent_id).job_id)

        jobs_before = len(client.list_jobs(limit=1000))
        wider = [{"type": "Linear", "out_features": 31}, *MOONS_MLP_LAYERS[1:]]
        cases: list[tuple[dict[str, Any], list[Any]]] = [
            ({"init_from": "warm@canary"}, ["init_from"]),
            ({"init_from": "0" * 32}, ["init_from"]),  # no such (or a deleted) model
            ({"init_from": "warm", "freeze": [0, 2, 4]}, ["freeze"]),  # every layer with parameters
            ({"init_from": "warm", "model": wider}, ["model", 0]),
        ]
        for change, loc in cases:
            refused = client.http.post("/train", json=moons_spec(dataset.id, name="warm", **change))
            assert refused.status_code == 422, refused.text
            assert refused.json()["errors"][0]["loc"] == loc
        assert len(client.list_jobs(limit=1000)) == jobs_before

        child_id = _train(client, dataset.id, name="warm", init_from="warm@production", freeze=[0], epochs=3)
        child = client.get_model(child_id)
        assert child.parent_model_id == parent_id
        assert child.spec["init_from"] == parent_id  # pinned: a later alias move changes nothing
        assert [link.id for link in child.chain] == [parent_id]
        parent_weights = load(client.download_weights(parent_id))
        child_weights = load(client.download_weights(child_id))
        assert torch.equal(parent_weights["net.0.weight"], child_weights["net.0.weight"])
        assert not torch.equal(parent_weights["net.4.weight"], child_weights["net.4.weight"])
        first_epoch_loss = client.get_job(child.job_id).history[0][1]
        assert first_epoch_loss < parent_job.history[-1][1] * 2 + 0.05
        assert first_epoch_loss < parent_job.history[0][1] / 2

        # retrain: the model's spec on a new table, warm from production, a new version not promoted
        x, y = make_moons(120, noise=0.1, seed=7)
        new_table = tmp_path / "new.csv"
        new_table.write_text(to_csv(x, y))
        retrained = _cli(pair.a, "retrain", "warm", str(new_table), "--from", "production", "--follow")
        assert retrained.returncode == 0, retrained.stderr
        named = client.get_model_name("warm")
        assert [v.version for v in named.versions] == [3, 2, 1]
        assert named.serving_version == 1
        assert named.versions[0].parent_model_id == parent_id
        assert named.versions[0].dataset_id != dataset.id

        # a table smaller than the spec's batch (16): refused naming batch_size, then retrained
        # with a smaller one given on the command line
        x, y = make_moons(10, noise=0.1, seed=8)
        small = tmp_path / "small.csv"
        small.write_text(to_csv(x, y))
        too_small = _cli(pair.a, "retrain", "warm", str(small))
        assert too_small.returncode == 2
        assert "batch_size" in too_small.stderr
        smaller_batch = _cli(pair.a, "retrain", "warm", str(small), "--batch-size", "4", "--follow")
        assert smaller_batch.returncode == 0, smaller_batch.stderr
        assert client.get_model_name("warm").versions[0].spec["batch_size"] == 4

        # a table without the model's columns: refused, nothing uploaded
        datasets_before = len(client.list_datasets())
        wrong = tmp_path / "wrong.csv"
        wrong.write_text("a,b,label\n0.1,0.2,0\n0.3,0.4,1\n")
        refused_cli = _cli(pair.a, "retrain", "warm", str(wrong))
        assert refused_cli.returncode == 2
        assert "x0" in refused_cli.stderr
        assert len(client.list_datasets()) == datasets_before


def test_the_dashboard_shows_aliases_on_model_cards_and_moves_them(pair: Pair) -> None:
    with TrainserveClient(pair.a.url, timeout=60) as client:
        dataset = client.upload_dataset(pair.moons_csv, "moons.csv")
        model_id = _train(client, dataset.id, name="shown", epochs=2)
        client.set_alias("shown", "production", 1, note="from the test")
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{pair.a.url}/ui")
                card = page.locator(f'article.model[data-model-id="{model_id}"]')
                card.locator('[data-alias="production"]').wait_for()
                assert card.locator(".pill.serving").count() == 1
                card.locator('input[aria-label="alias"]').fill("staging")
                card.get_by_role("button", name="point here").click()
                card.locator('[data-alias="staging"]').wait_for()
                card.locator('input[aria-label="alias"]').fill("Not An Alias")
                card.get_by_role("button", name="point here").click()
                card.locator(".alias-form .result.error").wait_for()

                # the drift panel marks the feature the logged requests moved
                x, _ = make_moons(100, noise=0.05, seed=13)
                client.predict(None, (x + np.array([3.0, 0.0])).tolist(), name="shown")
                _drift_after(client, model_id, 100)
                card.get_by_role("button", name="drift").click()
                card.locator('.drift-table tr.drifted[data-feature="x0"]').wait_for()
                assert card.locator('.drift-table tr.drifted[data-feature="x1"]').count() == 0
                assert not errors, errors
            finally:
                browser.close()
        named = client.get_model_name("shown")
        assert {(a.alias, a.version) for a in named.aliases} == {("production", 1), ("staging", 1)}
        assert named.history[0].note == "from the dashboard"


def test_drift_rises_when_the_inputs_shift(pair: Pair) -> None:
    with TrainserveClient(pair.a.url, timeout=60) as client:
        dataset = client.upload_dataset(pair.moons_csv, "moons.csv")
        model_id = _train(client, dataset.id, name="drifty", epochs=2)
        x, _ = make_moons(DRIFT_WINDOW, noise=0.05, seed=11)  # the training table's distribution
        for start in range(0, DRIFT_WINDOW, 100):
            client.predict(None, x[start : start + 100].tolist(), name="drifty")
        steady = _drift_after(client, model_id, DRIFT_WINDOW)
        assert max(f.psi for f in steady.features) < 0.2
        assert not any(f.drifted for f in steady.features)

        shifted = x + np.array([2.5, 0.0])  # x0 moves, x1 does not
        for start in range(0, DRIFT_WINDOW, 100):
            client.predict(None, shifted[start : start + 100].tolist(), name="drifty")
        moved = {f.feature: f for f in _drift_after(client, model_id, DRIFT_WINDOW, newest=shifted[-1]).features}
        assert moved["x0"].drifted
        assert moved["x0"].psi > 1.0
        assert not moved["x1"].drifted
        assert moved["x0"].missing_share == 0.0

        deadline = time.monotonic() + 30  # /metrics reuses its drift figures for 10 s
        while 'trainserve_feature_drifted{feature="x0",model="drifty"} 1.0' not in (
            text := httpx.get(f"{pair.a.url}/metrics").text
        ):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.5)
        assert 'trainserve_feature_drift_psi{feature="x1",model="drifty"}' in text
        assert model_id not in text  # names as labels, never ids


def _colours(n: int, seed: int, levels: list[str], shares: list[float]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n)
    colour = rng.choice(np.array(levels), n, p=shares)
    return [{"x": float(x[i]), "colour": str(colour[i])} for i in range(n)]


def test_category_drift_counts_unseen_levels(pair: Pair) -> None:
    """A text category: PSI over its levels and the share of levels never seen in training,
    through GET /models/{id}/drift and /metrics."""
    rows = _colours(200, 3, ["red", "green", "blue", ""], [0.55, 0.3, 0.1, 0.05])  # "" a blank
    for row in rows:
        row["label"] = "warm" if row["colour"] == "red" or row["x"] > 1 else "cold"
    body = "x,colour,label\n" + "".join(f"{r['x']!r},{r['colour']},{r['label']}\n" for r in rows)
    with TrainserveClient(pair.a.url, timeout=60) as client:
        dataset = client.upload_dataset(body.encode(), "colours.csv")
        model_id = _train(client, dataset.id, name="colours", target="label", epochs=2)
        # Blue took over, and a quarter of the rows are colours the model never saw.
        moved = _colours(DRIFT_WINDOW, 4, ["red", "blue", "purple", "teal", ""], [0.15, 0.5, 0.15, 0.1, 0.1])
        for row in moved:
            row["colour"] = row["colour"] or None  # a blank, as JSON sends one
        for start in range(0, DRIFT_WINDOW, 100):
            client.predict(None, moved[start : start + 100], name="colours")
        deadline = time.monotonic() + 10
        while (report := client.model_drift(model_id)).window_rows < DRIFT_WINDOW:
            assert time.monotonic() < deadline, "the log never caught up"
            time.sleep(0.05)
        features = {f.feature: f for f in report.features}
        colour, x = features["colour"], features["x"]
        assert colour.kind == "category"
        assert colour.drifted
        assert colour.psi > 1.0
        unseen = sum(r["colour"] in ("purple", "teal") for r in moved) / DRIFT_WINDOW
        assert colour.unseen_share == pytest.approx(unseen)
        assert 0.15 < unseen < 0.35
        assert colour.missing_share == pytest.approx(sum(r["colour"] is None for r in moved) / DRIFT_WINDOW)
        assert colour.missing_share > 0
        assert (x.kind, x.unseen_share, x.drifted) == ("number", None, False)

        # The second API process has scraped nothing yet: its /metrics measures now.
        line = f'trainserve_feature_unseen_share{{feature="colour",model="colours"}} {colour.unseen_share}'
        deadline = time.monotonic() + 15  # /metrics reuses its figures for 10 s if scraped just before
        while line not in (text := httpx.get(f"{pair.b.url}/metrics").text):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.5)
        assert 'trainserve_feature_unseen_share{feature="x"' not in text  # numbers have no unseen share


def _drift_after(
    client: TrainserveClient, model_id: str, rows: int, newest: Sequence[float] | None = None
) -> DriftReport:
    """The drift report once the log holds ``rows`` rows, the newest of them ``newest``."""
    deadline = time.monotonic() + 10
    while True:
        # The log first: a report computed after the newest row was seen includes it (the
        # other order let a write land between the two and pass a stale report).
        logged = client.list_predictions(model_id, limit=1)
        report = client.model_drift(model_id)
        last = logged[0].inputs[-1] if logged else None
        if report.window_rows == rows and (newest is None or last == pytest.approx(list(newest))):
            return report
        assert time.monotonic() < deadline, "the log never caught up"
        time.sleep(0.05)


def test_a_shadow_version_answers_logged_requests_and_its_agreement_is_reported(pair: Pair) -> None:
    with TrainserveClient(pair.b.url, timeout=60) as client, TrainserveClient(pair.a.url, timeout=60) as trainer:
        dataset = trainer.upload_dataset(pair.moons_csv, "moons.csv")
        live = _train(trainer, dataset.id, name="shadowed", epochs=10)
        candidate = _train(trainer, dataset.id, name="shadowed", epochs=1, seed=5)  # barely trained
        client.set_alias("shadowed", "production", 1)
        client.set_alias("shadowed", "shadow", 2)
        x, _ = make_moons(100, noise=0.05, seed=12)
        answers = [client.predict(None, x[i : i + 20].tolist(), name="shadowed") for i in range(0, 100, 20)]
        assert {a.model_id for a in answers} == {live}  # the shadow never answers the client
        deadline = time.monotonic() + 10
        while (report := client.shadow_agreement("shadowed")).pairs < 5:
            assert time.monotonic() < deadline, report
            time.sleep(0.05)
        assert (report.shadow_model_id, report.shadow_version, report.rows) == (candidate, 2, 100)
        assert report.label_agreement is not None
        assert 0.0 <= report.label_agreement < 1.0  # one epoch against twenty: they disagree somewhere
        assert report.mean_abs_difference is None
        shadow_log = client.list_predictions(candidate, limit=10)
        assert len(shadow_log) == 5
        logged_inputs = np.array([e.inputs for e in shadow_log][::-1])  # oldest first, as sent
        assert np.allclose(logged_inputs, x.reshape(5, 20, 2), rtol=1e-6, atol=1e-6)

        client.delete_alias("shadowed", "shadow")
        missing = httpx.get(f"{pair.b.url}/models/by-name/shadowed/shadow")
        assert missing.status_code == 404
