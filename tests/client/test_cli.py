"""The CLI's client commands, run as subprocesses against a real server and worker."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, Server, moons_spec, start_server, stop_server
from trainserve.client import TrainserveClient
from trainserve.training.spec import TrainSpec

EXAMPLES = REPO / "examples"
GUIDE_EXPERIMENTS = ["line", "tanh", "moons-linear", "moons-mlp"]


def cli(*args: str | Path, url: str | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    if url is not None:
        environment["TRAINSERVE_URL"] = url
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trainserve", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=240,
    )


@pytest.mark.parametrize("experiment", GUIDE_EXPERIMENTS)
def test_the_guide_experiments_run_from_the_cli_with_a_progress_bar(server: Server, experiment: str) -> None:
    spec_file = EXAMPLES / f"{experiment}.json"
    data = EXAMPLES / ("moons.csv" if experiment.startswith("moons") else "wave.csv")
    result = cli("train", data, "--spec", spec_file, "--epochs", "2", "--follow", url=server.url)
    assert result.returncode == 0, result.stderr
    assert f"guide-{experiment}" in result.stderr  # the bar's label
    assert "2/2" in result.stderr  # the bar reached the last epoch
    assert "epoch" in result.stderr
    assert "loss=" in result.stderr
    assert "succeeded: model " in result.stdout
    assert f"(guide-{experiment} v" in result.stdout


def test_example_specs_are_the_guide_experiments() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import guide_experiments  # type: ignore[import-not-found]  # scripts/ is put on sys.path just above

    for name in GUIDE_EXPERIMENTS:
        shipped = json.loads((EXAMPLES / f"{name}.json").read_text())
        experiment = guide_experiments.BY_NAME[name]
        expected = experiment.spec("x", experiment.epochs, "auto")
        del expected["dataset_id"]
        assert TrainSpec.model_validate({**shipped, "dataset_id": "x"}) == TrainSpec.model_validate(
            {**expected, "name": f"guide-{name}", "dataset_id": "x"}
        )
    moons = (EXAMPLES / "moons.csv").read_text()
    assert moons.startswith("x0,x1,y\n")
    assert len(moons.splitlines()) == 201
    assert len((EXAMPLES / "wave.csv").read_text().splitlines()) == 301


@pytest.fixture(scope="module")
def moons_model(server: Server) -> str:
    """A model named cli-moons, trained through the CLI."""
    spec = moons_spec(epochs=15, name="cli-moons")
    spec["target"] = "y"
    spec_file = server.data_dir / "cli-moons.json"
    spec_file.write_text(json.dumps(spec))
    result = cli("train", EXAMPLES / "moons.csv", "--spec", spec_file, "--follow", "--json", url=server.url)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert model["name"] == "cli-moons"
    return str(model["id"])


def test_predict_writes_the_rows_with_predictions_and_probabilities(
    server: Server, client: TrainserveClient, moons_model: str, tmp_path: Path
) -> None:
    out = tmp_path / "predicted.csv"
    result = cli("predict", moons_model, EXAMPLES / "moons.csv", "-o", out, url=server.url)
    assert result.returncode == 0, result.stderr
    assert "200 rows predicted" in result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["x0", "x1", "y", "predicted_y", "probability_0", "probability_1"]
    assert len(rows) == 200
    answer = client.predict(moons_model, [[float(r["x0"]), float(r["x1"])] for r in rows])
    assert [int(r["predicted_y"]) for r in rows] == answer.predictions
    assert answer.probabilities is not None
    assert [float(r["probability_1"]) for r in rows] == pytest.approx([p[1] for p in answer.probabilities])
    assert sum(r["predicted_y"] == r["y"] for r in rows) > 190

    # by name (the newest version) and by name:version, to standard output
    for reference in ("cli-moons", "cli-moons:1"):
        by_name = cli("predict", reference, EXAMPLES / "moons.csv", url=server.url)
        assert by_name.returncode == 0, by_name.stderr
        assert by_name.stdout.replace("\r\n", "\n") == out.read_text().replace("\r\n", "\n")


def test_predict_reads_a_semicolon_file_with_decimal_commas_as_an_upload_would(
    server: Server, moons_model: str, tmp_path: Path
) -> None:
    # What a European spreadsheet exports: ';' between cells, ',' as the decimal mark.
    lines = (EXAMPLES / "moons.csv").read_text().splitlines()
    european = tmp_path / "moons-eu.csv"
    european.write_text("\n".join(line.replace(",", ";").replace(".", ",") for line in lines) + "\n")
    plain = cli("predict", moons_model, EXAMPLES / "moons.csv", url=server.url)
    sniffed = cli("predict", moons_model, european, url=server.url)
    assert sniffed.returncode == 0, sniffed.stderr
    column = lambda text: [row["predicted_y"] for row in csv.DictReader(io.StringIO(text))]  # noqa: E731
    assert len(column(sniffed.stdout)) == 200
    assert column(sniffed.stdout) == column(plain.stdout)


def test_predict_prints_the_answers_warnings_on_stderr_and_keeps_stdout_the_csv(
    server: Server, client: TrainserveClient, tmp_path: Path
) -> None:
    # A table with a text category (no blanks anywhere): its model answers unseen labels and
    # blanks anyway, with warnings.
    lines = (EXAMPLES / "moons.csv").read_text().splitlines()
    table = [lines[0].replace(",y", ",colour,y")]
    for i, line in enumerate(lines[1:]):
        x0, x1, y = line.split(",")
        table.append(f"{x0},{x1},{('red', 'blue')[i % 2]},{y}")
    dataset = client.upload_dataset("\n".join(table).encode() + b"\n", "coloured.csv")
    job = client.wait(client.train({**moons_spec(dataset.id, epochs=2), "target": "y"}).id)
    assert job.status == "succeeded", job.error
    # More rows than one request carries (5,000): a warning in the second chunk is named by its
    # row in the file too. Row 2: an unseen colour; row 3: a blank x0; row 5,002: unseen again.
    rows = ["x0,x1,colour"] + ["0.5,0.25,red"] * 5_002
    rows[2], rows[3], rows[5_002] = "0.5,0.25,green", ",0.25,blue", "1.0,-0.5,Mauve"
    data = tmp_path / "rows.csv"
    data.write_text("\n".join(rows) + "\n")
    result = cli("predict", str(job.model_id), data, url=server.url)
    assert result.returncode == 0, result.stderr
    predicted = list(csv.reader(io.StringIO(result.stdout)))
    assert predicted[0] == ["x0", "x1", "colour", "predicted_y", "probability_0", "probability_1"]
    assert len(predicted) == 5_003
    assert all(len(r) == 6 for r in predicted)  # the CSV alone: no warning among its lines
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    unseen = "a category never seen in training: answered as the unknown level"
    assert warnings[0] == f"warning: row 2, column 'colour', value 'green': {unseen}"
    assert warnings[1].startswith("warning: row 3, column 'x0': blank, and training had no blanks here: filled with ")
    assert warnings[2] == f"warning: row 5002, column 'colour', value 'Mauve': {unseen}"
    assert len(warnings) == 3

    # A file full of one new label: a hundred lines, then a count per column; -o as well.
    data.write_text("x0,x1,colour\n" + "0.5,0.25,green\n" * 150)
    out = tmp_path / "predicted.csv"
    many = cli("predict", str(job.model_id), data, "-o", out, url=server.url)
    assert many.returncode == 0, many.stderr
    lines = many.stderr.splitlines()
    assert sum(line.startswith("warning: row ") for line in lines) == 100
    assert "warning: 50 more like these, by column: 'colour' 50" in lines
    assert len(list(csv.reader(io.StringIO(out.read_text())))) == 151

    # Cells saying NA or N/A are missing, as the server's CSV /predict reads them (and an
    # upload's defaults): the CLI sends them as null and answers as that endpoint does.
    data.write_text("x0,x1,colour\nNA,0.25,red\n0.5,N/A,blue\n0.5,0.25,NA\n")
    missing = cli("predict", str(job.model_id), data, url=server.url)
    assert missing.returncode == 0, missing.stderr
    served = client.http.post(
        "/predict", params={"model_id": job.model_id}, content=data.read_bytes(), headers={"Content-Type": "text/csv"}
    )
    assert served.status_code == 200, served.text
    by_cli = [row[3:] for row in csv.reader(io.StringIO(missing.stdout))]
    by_server = [row[3:6] for row in csv.reader(io.StringIO(served.text))]
    assert by_cli == by_server
    assert sum("blank, and training had no blanks here" in line for line in missing.stderr.splitlines()) == 3


def test_predict_regression_and_its_errors(server: Server, tmp_path: Path) -> None:
    spec = tmp_path / "line.json"
    spec.write_text(json.dumps({"target": "y", "model": [{"type": "Linear", "out_features": 1}], "loss": "MSELoss"}))
    trained = cli("train", EXAMPLES / "wave.csv", "--spec", spec, "--epochs", "3", "--follow", "--json", url=server.url)
    assert trained.returncode == 0, trained.stderr
    model_id = json.loads(trained.stdout)["id"]

    rows = tmp_path / "rows.csv"
    rows.write_text("x,comment\n1.5,a\n2.5,b\n")
    result = cli("predict", model_id, rows, url=server.url)
    assert result.returncode == 0, result.stderr
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert table[0] == ["x", "comment", "predicted_y"]
    assert [r[:2] for r in table[1:]] == [["1.5", "a"], ["2.5", "b"]]
    assert all(float(r[2]) == float(r[2]) for r in table[1:])  # numbers, not NaN

    rows.write_text("x\n1.0\n2.0\noops\n")
    out = tmp_path / "predicted.csv"
    out.write_text("kept\n")
    bad = cli("predict", model_id, rows, "-o", out, url=server.url)
    assert bad.returncode == 2
    # The file's row by the house convention (data rows from 1), not the request's inputs[2].
    assert "error: 422 row 3, column 'x': 'oops' is not a number" in bad.stderr
    assert "inputs[" not in bad.stderr
    # A failed predict leaves what was there, and no header-only or partial file beside it.
    assert out.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.json", "predicted.csv", "rows.csv"]

    rows.write_text("x\n1.0\nnan\n")  # JSON has no NaN: refused by row, not sent as invalid JSON
    not_finite = cli("predict", model_id, rows, url=server.url)
    assert not_finite.returncode == 2
    assert "error: 422 row 2, column 'x'" in not_finite.stderr

    # `trainserve predict ... | head -1`: the reader stops early; the CLI ends quietly.
    rows.write_text("x\n" + "0.5\n" * 8_000)  # about 200 kB of output: more than a pipe holds
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    command = [sys.executable, "-m", "trainserve", "predict", model_id, str(rows), "--url", server.url]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment) as reader:
        assert reader.stdout is not None
        assert reader.stderr is not None
        assert reader.stdout.readline() == b"x,predicted_y\r\n"
        reader.stdout.close()  # what head does once it has its line
        stderr = reader.stderr.read().decode()
        assert reader.wait(120) == 141, stderr  # 128 + SIGPIPE, as a shell reports it
    assert stderr == ""

    rows.write_text("z\n1.0\n")
    missing = cli("predict", model_id, rows, url=server.url)
    assert missing.returncode == 2
    assert "no column 'x'" in missing.stderr

    unknown = cli("predict", "no-such-model", rows, url=server.url)
    assert unknown.returncode == 2
    assert "no model is named 'no-such-model'" in unknown.stderr


def test_jobs_and_models_list_as_tables_and_json(server: Server, moons_model: str) -> None:
    models = cli("models", "--name", "cli-moons", url=server.url)
    assert models.returncode == 0, models.stderr
    header, *lines = models.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "NAME:VERSION", "TASK"]
    assert any(line.startswith(moons_model) and "cli-moons:1" in line for line in lines)

    as_json = cli("models", "--json", url=server.url)
    assert moons_model in {m["id"] for m in json.loads(as_json.stdout)}

    jobs = cli("jobs", "--name", "cli-moons", "--status", "succeeded", url=server.url)
    assert jobs.returncode == 0, jobs.stderr
    assert jobs.stdout.splitlines()[0].split()[:3] == ["JOB", "STATUS", "NAME"]
    assert "succeeded" in jobs.stdout
    assert moons_model in jobs.stdout
    listed = json.loads(cli("jobs", "--json", "--limit", "3", url=server.url).stdout)
    assert 1 <= len(listed) <= 3
    # --offset pages: the second job of the full list is the first of the page after one.
    everything = json.loads(cli("jobs", "--json", "--limit", "2000", url=server.url).stdout)
    if len(everything) >= 2:
        second = json.loads(cli("jobs", "--json", "--limit", "1", "--offset", "1", url=server.url).stdout)
        assert [j["id"] for j in second] == [everything[1]["id"]]
    refused = cli("models", "--limit", "0", url=server.url)
    assert refused.returncode == 2
    assert "--limit" in refused.stderr


def test_plot_saves_pngs(server: Server, client: TrainserveClient, moons_model: str, tmp_path: Path) -> None:
    regions = tmp_path / "regions.png"
    result = cli("plot", "cli-moons", "-o", regions, "--width", "640", "--height", "480", url=server.url)
    assert result.returncode == 0, result.stderr
    with Image.open(regions) as image:
        assert (image.format, image.size) == ("PNG", (640, 480))
    loss = tmp_path / "loss.png"
    job_id = client.get_model(moons_model).job_id
    assert cli("plot", job_id, "--loss", "-o", loss, url=server.url).returncode == 0
    with Image.open(loss) as image:
        assert (image.format, image.size) == ("PNG", (800, 600))


def test_cancel_and_follow_a_cancelled_job(server: Server, client: TrainserveClient) -> None:
    job = client.train(moons_spec(epochs=100_000, batch_size=1, target="y"), file=(EXAMPLES / "moons.csv").read_bytes())
    deadline = time.monotonic() + 60
    while client.get_job(job.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = cli("cancel", job.id, url=server.url)
    assert result.returncode == 0, result.stderr
    assert f"job {job.id}" in result.stdout
    followed = cli("follow", job.id, url=server.url)
    assert followed.returncode == 1
    assert "cancelled" in followed.stderr
    again = cli("cancel", job.id, url=server.url)
    assert again.returncode == 2
    assert "409" in again.stderr


def test_bad_specs_and_bad_servers_are_reported_in_one_line(server: Server, tmp_path: Path) -> None:
    not_json = tmp_path / "bad.json"
    not_json.write_text("{model: ")
    result = cli("train", EXAMPLES / "moons.csv", "--spec", not_json, url=server.url)
    assert result.returncode == 2
    assert "is not JSON" in result.stderr

    refused = tmp_path / "refused.json"
    refused.write_text(json.dumps({"model": ["Conv2d"], "loss": "MSELoss"}))
    result = cli("train", EXAMPLES / "moons.csv", "--spec", refused, url=server.url)
    assert result.returncode == 2
    assert result.stderr.startswith("error: 422 ")
    assert "Traceback" not in result.stderr

    result = cli("train", "missing.csv", "--spec", refused, url=server.url)
    assert result.returncode == 2
    assert "neither a file nor a dataset id" in result.stderr

    # nothing listens on port 9 (discard) of this machine
    result = cli("jobs", url="http://127.0.0.1:9")
    assert result.returncode == 2
    assert "cannot reach the server at http://127.0.0.1:9" in result.stderr


def test_upload_reads_as_told_and_prints_the_profile(server: Server, tmp_path: Path) -> None:
    table = tmp_path / "eu.csv"
    table.write_text("x;label\n1,5;a\nn/d;b\n2,25;a\n")
    result = cli(
        "upload", table, "--delimiter", "semicolon", "--decimal", ",", "--na-values", '["n/d"]', url=server.url
    )
    assert result.returncode == 0, result.stderr
    first, header, x_line, _ = result.stdout.splitlines()
    assert first.startswith("dataset ")
    assert first.endswith(": 3 rows, 2 columns")
    assert header.split() == ["COLUMN", "KIND", "MISSING", "DISTINCT", "WARNINGS"]
    assert x_line.split()[:4] == ["x", "number", "1", "2"]
    as_json = cli("upload", table, "--delimiter", ";", "--json", url=server.url)  # n/d now a word: text
    assert as_json.returncode == 0, as_json.stderr
    assert [c["kind"] for c in json.loads(as_json.stdout)["columns"]] == ["category", "category"]

    not_a_list = cli("upload", table, "--na-values", "n/d", url=server.url)
    assert not_a_list.returncode == 2
    assert "is not a JSON list of strings" in not_a_list.stderr
    by_id = cli("train", "0" * 32, "--spec", EXAMPLES / "moons-mlp.json", "--delimiter", ";", url=server.url)
    assert by_id.returncode == 2
    assert "--delimiter say how to read a file" in by_id.stderr


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("keyed"), workers=0, env={"TRAINSERVE_API_KEY": "k" * 24})
    yield running
    stop_server(running)


def test_api_key_from_flag_or_environment(keyed_server: Server) -> None:
    without = cli("jobs", url=keyed_server.url)
    assert without.returncode == 2
    assert "401" in without.stderr
    assert cli("jobs", "--api-key", "k" * 24, url=keyed_server.url).returncode == 0
    from_env = cli("models", url=None, env={"TRAINSERVE_URL": keyed_server.url, "TRAINSERVE_API_KEY": "k" * 24})
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.startswith("MODEL")


def test_export_saves_an_archive_torch_loads(
    server: Server, client: TrainserveClient, moons_model: str, tmp_path: Path
) -> None:
    import torch

    archive = tmp_path / "moons.pt2"
    result = cli("export", "cli-moons:1", "--format", "torch.export", "-o", archive, url=server.url)
    assert result.returncode == 0, result.stderr
    module = torch.export.load(archive).module()
    with torch.inference_mode():
        probabilities = module(torch.tensor([[0.0, 1.0], [1.0, -0.5]])).flatten().tolist()
    expected = client.predict(moons_model, [[0.0, 1.0], [1.0, -0.5]]).probabilities or []
    assert probabilities == pytest.approx([p for row in expected for p in row], abs=1e-6)
