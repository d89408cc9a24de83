"""The CLI's client commands: ``trainserve train | follow | predict | jobs | models | cancel | plot | export``,
and for shipping: ``promote | aliases | predictions | retrain``; for experiments:
``trainserve sweep | sweeps``.

They talk to a running server through the typed client: ``--url`` / ``TRAINSERVE_URL``
and ``--api-key`` / ``TRAINSERVE_API_KEY``. Exit status: 0 done, 1 a followed job did
not succeed, 2 a refused request or an unreachable server.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import httpx
from tqdm import tqdm

from trainserve.api.schemas import Job, Model, SweepDetail
from trainserve.client.events import shown_status
from trainserve.client.http import ApiError, TrainserveClient, sweep_done
from trainserve.datasets.tables import SNIFF_BYTES, sniff_decimal, sniff_delimiter
from trainserve.jobs.status import JobStatus
from trainserve.training.spec import TrainSpec
from trainserve.wire import EXPORT_FORMATS, MISSING_TOKENS, prediction_columns

DEFAULT_URL = "http://127.0.0.1:8000"
_ID = re.compile(r"^[0-9a-f]{32}$")
# Rows sent in one POST /predict: well under the server's default limit of 100,000.
PREDICT_CHUNK_ROWS = 5_000
# Warnings printed one line each; past this, a count per column.
PREDICT_WARNINGS_SHOWN = 100

Command = Callable[[TrainserveClient, argparse.Namespace], int]


class CommandError(Exception):
    """A problem to report in one line (exit status 2)."""


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--url",
        default=os.environ.get("TRAINSERVE_URL", DEFAULT_URL),
        help=f"server URL (default: $TRAINSERVE_URL or {DEFAULT_URL})",
    )
    flags.add_argument(
        "--api-key", default=os.environ.get("TRAINSERVE_API_KEY"), help="API key (default: $TRAINSERVE_API_KEY)"
    )
    return flags


def _reading_flags() -> argparse.ArgumentParser:
    """How the server is to read a CSV given as a file (default: it sniffs)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--delimiter", help="CSV column separator: one character, or comma, semicolon, tab, pipe")
    flags.add_argument("--decimal", choices=[".", ","], help="CSV decimal separator")
    flags.add_argument(
        "--na-values",
        type=_na_values,
        help='cells read as missing, a JSON list such as \'["NA", "?"]\' (replaces the server\'s list)',
    )
    return flags


def _na_values(raw: str) -> list[str]:
    try:
        values = json.loads(raw)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise argparse.ArgumentTypeError(f'{raw!r} is not a JSON list of strings, such as \'["NA", "?"]\'')
    return values


def _reading(args: argparse.Namespace) -> dict[str, Any]:
    return {"delimiter": args.delimiter, "decimal": args.decimal, "na_values": args.na_values}


def _refuse_reading_without_file(args: argparse.Namespace) -> None:
    given = [f"--{k.replace('_', '-')}" for k, v in _reading(args).items() if v is not None]
    if given:
        raise CommandError(f"{', '.join(given)} say how to read a file: {args.data} is a dataset id, already read")


def add_client_commands(commands: Any) -> None:
    """Register the client commands on ``trainserve``'s subparsers."""
    common = [_connection_flags()]
    reading = [_reading_flags()]

    upload = commands.add_parser("upload", parents=common + reading, help="upload a table; print its id and profile")
    upload.add_argument("data", type=Path, help="a CSV, TSV, Parquet or .npz file")
    upload.add_argument("--json", action="store_true", help="print the dataset (with every column's profile) as JSON")
    upload.set_defaults(run=_with_client(_upload))

    train = commands.add_parser("train", parents=common + reading, help="upload a table and train a model on it")
    train.add_argument("data", help="a CSV or .npz file, or the id of an uploaded dataset")
    train.add_argument("--spec", required=True, type=Path, help="the training spec, a JSON file")
    train.add_argument("--name", help="model name: the model becomes that name's next version")
    train.add_argument("--epochs", type=int, help="override the spec's epochs")
    train.add_argument("--device", help="override the spec's device (auto, cpu, cuda, cuda:N)")
    train.add_argument("--follow", "-f", action="store_true", help="show a progress bar until the job ends")
    train.add_argument("--json", action="store_true", help="print the job (or, with --follow, the model) as JSON")
    train.set_defaults(run=_with_client(_train))

    follow = commands.add_parser("follow", parents=common, help="show a job's progress until it ends")
    follow.add_argument("job", help="job id")
    follow.add_argument("--json", action="store_true", help="print the model as JSON at the end")
    follow.set_defaults(run=_with_client(_follow))

    predict = commands.add_parser("predict", parents=common, help="predict every row of a CSV, write CSV")
    predict.add_argument("model", help="model id, NAME (production, else newest), NAME:VERSION or NAME@ALIAS")
    predict.add_argument("data", type=Path, help="CSV with a header row holding the model's feature columns")
    predict.add_argument("--output", "-o", type=Path, help="write here instead of standard output")
    predict.set_defaults(run=_with_client(_predict))

    jobs = commands.add_parser("jobs", parents=common, help="list training jobs, newest first")
    jobs.add_argument("--status", type=JobStatus, choices=list(JobStatus))
    jobs.add_argument("--name", help="only jobs training this model name")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--offset", type=int, default=0, help="skip this many newer jobs (paging)")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(run=_with_client(_jobs))

    models = commands.add_parser("models", parents=common, help="list trained models, newest first")
    models.add_argument("--name", help="only this model's versions")
    models.add_argument("--limit", type=int, default=20)
    models.add_argument("--offset", type=int, default=0, help="skip this many newer models (paging)")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=_with_client(_models))

    cancel = commands.add_parser("cancel", parents=common, help="cancel a queued or running job")
    cancel.add_argument("job", help="job id")
    cancel.set_defaults(run=_with_client(_cancel))

    plot = commands.add_parser("plot", parents=common, help="save a model's plot, or a job's loss curve, as PNG")
    plot.add_argument("target", help="model id, NAME, NAME:VERSION or NAME@ALIAS; or a job id with --loss")
    plot.add_argument("--loss", action="store_true", help="the job's loss curve instead of a model's plot")
    plot.add_argument("--output", "-o", type=Path, required=True)
    plot.add_argument("--width", type=int, default=800)
    plot.add_argument("--height", type=int, default=600)
    plot.set_defaults(run=_with_client(_plot))

    export = commands.add_parser("export", parents=common, help="download a model as TorchScript or torch.export")
    export.add_argument("model", help="model id, NAME, NAME:VERSION or NAME@ALIAS")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript")
    export.add_argument("--output", "-o", type=Path, required=True)
    export.set_defaults(run=_with_client(_export))
    _add_sweep_commands(commands, common)

    promote = commands.add_parser("promote", parents=common, help="point an alias (default production) at a version")
    promote.add_argument("model", help="NAME:VERSION, or a model id, NAME or NAME@ALIAS (its version)")
    promote.add_argument("alias", nargs="?", default="production", help="the alias to move (default: production)")
    promote.add_argument("--note", help="why: kept in the alias history")
    promote.set_defaults(run=_with_client(_promote))

    aliases = commands.add_parser("aliases", parents=common, help="a model name's versions, aliases and history")
    aliases.add_argument("name", help="model name")
    aliases.add_argument("--json", action="store_true")
    aliases.set_defaults(run=_with_client(_aliases))

    predictions = commands.add_parser("predictions", parents=common, help="a model's logged (sampled) predictions")
    predictions.add_argument("model", help="model id, NAME, NAME:VERSION or NAME@ALIAS")
    predictions.add_argument("--limit", type=int, default=20)
    predictions.add_argument("--json", action="store_true")
    predictions.set_defaults(run=_with_client(_predictions))

    retrain = commands.add_parser(
        "retrain", parents=common + reading, help="train a named model's spec again on a new table"
    )
    retrain.add_argument("model", help="NAME (or NAME:VERSION, NAME@ALIAS): whose spec, features and target")
    retrain.add_argument("data", help="a CSV or .npz file holding the model's columns")
    retrain.add_argument(
        "--from",
        dest="source",
        help="warm start from this version or alias of the name (e.g. production or 3); default: from scratch",
    )
    retrain.add_argument("--epochs", type=int, help="override the spec's epochs")
    retrain.add_argument("--batch-size", type=int, help="override the spec's batch_size (a smaller table may need one)")
    retrain.add_argument("--follow", "-f", action="store_true", help="show a progress bar until the job ends")
    retrain.set_defaults(run=_with_client(_retrain))


def _with_client(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request on stderr
        try:
            with TrainserveClient(args.url, api_key=args.api_key) as client:
                return command(client, args)
        except ApiError as exc:
            print(f"error: {_explain(exc)}", file=sys.stderr)
            return 2
        except httpx.TransportError as exc:
            print(f"error: cannot reach the server at {args.url}: {exc}", file=sys.stderr)
            return 2
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            # `trainserve predict ... | head`: the reader has all it wants. Python would
            # print a traceback, then fail again flushing stdout at exit; point stdout at
            # /dev/null and end like a program that SIGPIPE stopped (128 + 13), quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141

    return run


def _explain(exc: ApiError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    lines = [f"{exc.status_code} {body.get('detail', exc.body)}"]
    for error in body.get("errors", [])[1:5]:
        where = ".".join(str(part) for part in error.get("loc", []))
        lines.append(f"  {where}: {error.get('msg', '')}")
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- train and follow ----------------------------------------------------------------------------


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise CommandError(f"cannot read the spec {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise CommandError(f"{path} must hold a JSON object (the training spec)")
    return spec


def _train(client: TrainserveClient, args: argparse.Namespace) -> int:
    spec = _read_spec(args.spec)
    for key in ("name", "epochs", "device"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    data = Path(args.data)
    if data.is_file():
        spec.pop("dataset_id", None)  # the file given here is the data
        job = client.train(spec, file=data, **_reading(args))
    elif _ID.match(args.data):
        _refuse_reading_without_file(args)
        job = client.train({**spec, "dataset_id": args.data})
    else:
        raise CommandError(f"{args.data} is neither a file nor a dataset id")
    if not args.follow:
        if args.json:
            _print_json(job.model_dump(mode="json"))
        else:
            print(f"job {job.id} {job.status}; follow it with: trainserve follow {job.id}")
        return 0
    print(f"job {job.id} {job.status}", file=sys.stderr)
    return _follow_job(client, job.id, as_json=args.json)


def _upload(client: TrainserveClient, args: argparse.Namespace) -> int:
    if not args.data.is_file():
        raise CommandError(f"{args.data} is not a file")
    dataset = client.upload_dataset(args.data, **_reading(args))
    if args.json:
        _print_json(dataset.model_dump(mode="json"))
        return 0
    print(f"dataset {dataset.id}: {dataset.n_rows} rows, {len(dataset.columns)} columns")
    rows = []
    for column in dataset.columns:
        profile = column.profile
        distinct = str(profile.distinct) if profile is not None else "-"
        warnings = "; ".join(profile.warnings) if profile is not None else ""
        rows.append([column.name, column.kind, str(column.missing), distinct, warnings])
    _table(rows, ["COLUMN", "KIND", "MISSING", "DISTINCT", "WARNINGS"])
    return 0


def _follow(client: TrainserveClient, args: argparse.Namespace) -> int:
    return _follow_job(client, args.job, as_json=args.json)


def _loss_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def _follow_job(client: TrainserveClient, job_id: str, *, as_json: bool) -> int:
    """A progress bar fed by the job's events; the outcome printed when it ends."""
    job = client.get_job(job_id)
    label = job.name or job.id[:8]
    end: dict[str, Any] = {}
    showing: str | None = None  # the status in the bar's label
    with tqdm(total=job.epochs, desc=label, unit="epoch", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for event in client.events(job_id):
                data = event.data
                status = shown_status(showing, event)
                if status != showing:
                    showing = status
                    bar.set_description(f"{label} {status}", refresh=event.event == "status")
                if event.event == "epoch":
                    shown = {"loss": _loss_text(data["train_loss"])}
                    if data.get("val_loss") is not None:
                        shown["val_loss"] = _loss_text(data["val_loss"])
                    for key, value in (data.get("val_metrics") or {}).items():
                        shown[f"val_{key}"] = _loss_text(value)
                    bar.set_postfix(shown, refresh=False)
                    bar.update(data["epoch"] - bar.n)  # draws the bar with the losses above
                elif event.event == "end":
                    end = data
        except KeyboardInterrupt:
            bar.close()
            print(f"stopped following; the job goes on (trainserve cancel {job_id} stops it)", file=sys.stderr)
            return 130
    status = end.get("status", "unknown")
    if status != JobStatus.SUCCEEDED:
        print(f"job {job_id} {status}: {end.get('error') or ''}".rstrip(": "), file=sys.stderr)
        return 1
    model = client.get_model(end["model_id"])
    if as_json:
        _print_json(model.model_dump(mode="json"))
    else:
        metrics = ", ".join(f"{k} {_loss_text(v)}" for k, v in model.metrics.items())
        print(f"job {job_id} succeeded: {_describe(model)} ({metrics})")
    return 0


def _describe(model: Model) -> str:
    return f"model {model.id} ({model.name} v{model.version})" if model.name else f"model {model.id}"


# -- models by id or name -------------------------------------------------------------------------


def resolve_model(client: TrainserveClient, reference: str) -> Model:
    """A model id, a NAME (its ``production`` alias's version, else its newest), NAME:VERSION
    or NAME@ALIAS."""
    if _ID.match(reference):
        return client.get_model(reference)
    name, at, alias = reference.partition("@")
    version = ""
    if not at:
        name, _, version = reference.partition(":")
        if version and not version.isdigit():
            raise CommandError(f"{reference!r}: the version after ':' must be a number")
    try:
        named = client.get_model_name(name)
    except ApiError as exc:
        if exc.status_code in (404, 422):
            raise CommandError(f"no model is named {name!r}") from None
        raise
    if at:
        wanted = next((a.version for a in named.aliases if a.alias == alias), None)
        if wanted is None:
            known = ", ".join(a.alias for a in named.aliases) or "none"
            raise CommandError(f"model {name!r} has no alias {alias!r} (aliases: {known})")
    else:
        wanted = int(version) if version else named.serving_version
    for model in named.versions:
        if model.version == wanted:
            return model
    raise CommandError(f"model {name!r} has no version {wanted} (newest: {named.versions[0].version})")


# -- predict --------------------------------------------------------------------------------------


def _number(text: str, decimal: str = ".") -> Any:
    if text.strip() in MISSING_TOKENS:
        return None  # a blank cell or NA is a missing value, as the server reads a CSV (JSON null)
    try:
        value = float(text.replace(",", ".") if decimal == "," else text)
    except ValueError:
        return text  # the server names the row and column it cannot use
    # JSON has no NaN or infinity: send the text, which the server refuses by row and column.
    return value if math.isfinite(value) else text


def _chunks(rows: Iterator[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    chunk: list[dict[str, str]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _predict(client: TrainserveClient, args: argparse.Namespace) -> int:
    model = resolve_model(client, args.model)
    try:
        source = open(args.data, newline="")  # noqa: SIM115 - closed below, after streaming
    except OSError as exc:
        raise CommandError(f"cannot read {args.data}: {exc.strerror}") from None
    with source:
        # The file read as an upload would be: the delimiter and a decimal comma sniffed from
        # its head (a semicolon file from a European spreadsheet, a TSV).
        head = source.read(SNIFF_BYTES)
        source.seek(0)
        delimiter = sniff_delimiter(head, str(args.data))
        decimal = sniff_decimal(head, delimiter)
        reader = csv.DictReader(source, delimiter=delimiter)
        header = list(reader.fieldnames or [])
        missing = [f for f in model.features if f not in header]
        if missing:
            raise CommandError(f"{args.data} has no column {missing[0]!r}; the model takes {model.features}")
        warned = _Warnings(sys.stderr)
        try:
            if args.output is None:
                written = _write_predictions(client, model, reader, header, decimal, sys.stdout, warned)
            else:
                with _replaced_on_success(args.output) as out:
                    written = _write_predictions(client, model, reader, header, decimal, out, warned)
        finally:  # the count of warnings not shown one by one, even when a later chunk fails
            warned.summarise()
    if args.output:
        print(f"{written} rows predicted by {_describe(model)} -> {args.output}", file=sys.stderr)
    return 0


class _Warnings:
    """The answers' ``warnings`` (cells answered anyway: an unseen category, an unexpected
    blank) on stderr, one line each, by the file's row (data rows from 1) and column: stdout
    stays the CSV alone. Past ``PREDICT_WARNINGS_SHOWN`` lines, a count per column instead,
    so that a file full of one new category does not bury the terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = 0
        self.unshown: dict[str, int] = {}

    def report(self, warnings: Sequence[dict[str, Any]], offset: int) -> None:
        # The server lists them column by column; a reader goes through the file row by row.
        for warning in sorted(warnings, key=lambda w: int(w.get("row", 0))):
            column = str(warning.get("column"))
            if self.shown >= PREDICT_WARNINGS_SHOWN:
                self.unshown[column] = self.unshown.get(column, 0) + 1
                continue
            value = warning.get("value")
            cell = f", value {value!r}" if value is not None else ""
            row = offset + int(warning.get("row", 0)) + 1
            print(f"warning: row {row}, column {column!r}{cell}: {warning.get('message', '')}", file=self.out)
            self.shown += 1

    def summarise(self) -> None:
        if self.unshown:
            counts = ", ".join(f"{column!r} {n}" for column, n in self.unshown.items())
            print(f"warning: {sum(self.unshown.values())} more like these, by column: {counts}", file=self.out)


@contextmanager
def _replaced_on_success(path: Path) -> Iterator[TextIO]:
    """A file beside ``path`` that becomes ``path`` only if the block ends without an error:
    a failed predict leaves neither a half-written file nor a header-only one, and keeps
    whatever ``path`` held before."""
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with open(handle, "w", newline="") as out:
            yield out
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _write_predictions(
    client: TrainserveClient,
    model: Model,
    reader: csv.DictReader[str],
    header: list[str],
    decimal: str,
    out: TextIO,
    warned: _Warnings,
) -> int:
    writer = csv.writer(out)
    writer.writerow([*header, *prediction_columns(model.targets, model.classes)])
    written = 0
    for chunk in _chunks(iter(reader), PREDICT_CHUNK_ROWS):
        inputs = [{f: _number(row[f], decimal) for f in model.features} for row in chunk]
        try:
            answer = client.predict(model.id, inputs)
        except ApiError as exc:
            _shift_rows(exc, written, model.features)
            raise
        warned.report(answer.warnings or [], written)
        for i, row in enumerate(chunk):
            predicted = answer.predictions[i]
            extra = predicted if isinstance(predicted, list) else [predicted]
            if answer.probabilities is not None:
                extra = [predicted, *answer.probabilities[i]]
            writer.writerow([*(row[h] for h in header), *extra])
        written += len(chunk)
    return written


def _shift_rows(exc: ApiError, offset: int, features: list[str]) -> None:
    """Name the file's row (the house convention: data rows from 1, the header is not a row),
    not the chunk's ``inputs[i]`` the server named."""
    if not isinstance(exc.body, dict):
        return
    for error in exc.body.get("errors", []):
        loc = error.get("loc", [])
        if len(loc) >= 2 and loc[0] == "inputs" and isinstance(loc[1], int):
            error["loc"] = ["row", offset + loc[1] + 1, *loc[2:]]
    detail = str(exc.body.get("detail", ""))
    match = re.match(r"inputs\[(\d+)\](?:\[(\d+)\])?", detail)
    if match:
        row = f"row {offset + int(match.group(1)) + 1}"
        if match.group(2) is not None and int(match.group(2)) < len(features):  # the column by its name
            row += f", column {features[int(match.group(2))]!r}"
        exc.body["detail"] = f"{row}{detail[match.end() :]}"


# -- jobs, models, cancel --------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _jobs(client: TrainserveClient, args: argparse.Namespace) -> int:
    found = _paged(
        lambda limit, offset: client.list_jobs(args.status, name=args.name, limit=limit, offset=offset), args
    )
    if args.json:
        _print_json([j.model_dump(mode="json") for j in found])
        return 0
    _table([_job_row(j) for j in found], ["JOB", "STATUS", "NAME", "EPOCH", "LOSS", "VAL LOSS", "MODEL", "CREATED"])
    return 0


def _job_row(job: Job) -> list[str]:
    return [
        job.id,
        job.status,
        job.name or "-",
        f"{job.epoch}/{job.epochs}",
        _loss_text(job.train_loss),
        _loss_text(job.val_loss),
        job.model_id or "-",
        job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
    ]


def _models(client: TrainserveClient, args: argparse.Namespace) -> int:
    found = _paged(lambda limit, offset: client.list_models(name=args.name, limit=limit, offset=offset), args)
    if args.json:
        _print_json([m.model_dump(mode="json") for m in found])
        return 0
    rows = []
    for model in found:
        metric = next((f"{k} {v:.3f}" for k, v in model.metrics.items() if k in ("train_accuracy", "train_r2")), "-")
        name = f"{model.name}:{model.version}" if model.name else "-"
        rows.append([model.id, name, model.task, metric, model.created_at.strftime("%Y-%m-%d %H:%M:%S")])
    _table(rows, ["MODEL", "NAME:VERSION", "TASK", "METRIC", "CREATED"])
    return 0


def _cancel(client: TrainserveClient, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.job)
    state = "cancel requested" if job.status == JobStatus.RUNNING else job.status
    print(f"job {job.id} {state}")
    return 0


# -- plot and export -------------------------------------------------------------------------------


def _save(path: Path, content: bytes, what: str) -> None:
    path.write_bytes(content)
    print(f"{what} -> {path} ({len(content):,} bytes)", file=sys.stderr)


def _plot(client: TrainserveClient, args: argparse.Namespace) -> int:
    size = {"width": args.width, "height": args.height}
    if args.loss:
        png = client.loss_plot(args.target, **size)
        _save(args.output, png, f"loss curve of job {args.target}")
    else:
        model = resolve_model(client, args.target)
        _save(args.output, client.model_plot(model.id, **size), f"plot of {_describe(model)}")
    return 0


def _export(client: TrainserveClient, args: argparse.Namespace) -> int:
    model = resolve_model(client, args.model)
    _save(args.output, client.export_model(model.id, args.format), f"{args.format} of {_describe(model)}")
    return 0


# -- aliases ---------------------------------------------------------------------------------------


def _promote(client: TrainserveClient, args: argparse.Namespace) -> int:
    model = resolve_model(client, args.model)
    if model.name is None or model.version is None:
        raise CommandError(f"{_describe(model)} has no name: only named models have aliases")
    alias = client.set_alias(model.name, args.alias, model.version, note=args.note)
    print(f"{model.name}@{alias.alias} -> version {alias.version} ({_describe(model)})")
    return 0


def _aliases(client: TrainserveClient, args: argparse.Namespace) -> int:
    named = client.get_model_name(args.name)
    if args.json:
        _print_json(named.model_dump(mode="json"))
        return 0
    pointers: dict[int, list[str]] = {}
    for alias in named.aliases:
        pointers.setdefault(alias.version, []).append(alias.alias)
    rows = []
    for model in named.versions:
        served = "*" if model.version == named.serving_version else ""
        rows.append([f"{served}{model.version}", ", ".join(pointers.get(model.version or 0, [])) or "-", model.id])
    _table(rows, ["VERSION", "ALIASES", "MODEL"])
    if named.history:
        print()
        history = []
        for event in named.history:
            moved = f"{event.from_version or '-'} -> {event.to_version or '-'}"
            when = event.created_at.strftime("%Y-%m-%d %H:%M:%S")
            history.append([when, event.alias, moved, event.who or "-", event.note or ""])
        _table(history, ["WHEN", "ALIAS", "VERSION", "WHO", "NOTE"])
    return 0


def _predictions(client: TrainserveClient, args: argparse.Namespace) -> int:
    model = resolve_model(client, args.model)
    found = client.list_predictions(model.id, limit=args.limit)
    if args.json:
        _print_json([entry.model_dump(mode="json") for entry in found])
        return 0
    rows = []
    for entry in found:
        when = entry.created_at.strftime("%Y-%m-%d %H:%M:%S")
        first_in = json.dumps(entry.inputs[0]) if entry.inputs else "-"
        first_out = json.dumps(entry.outputs[0]) if entry.outputs else "-"
        rows.append([when, str(entry.version or "-"), str(len(entry.inputs)), first_in, first_out])
    _table(rows, ["WHEN", "VERSION", "ROWS", "FIRST INPUT", "FIRST OUTPUT"])
    return 0


def _retrain(client: TrainserveClient, args: argparse.Namespace) -> int:
    """The named model's spec again, on a new table: a new version, not promoted."""
    model = resolve_model(client, args.model)
    if model.name is None:
        raise CommandError(f"{_describe(model)} has no name: retrain makes a new version of a named model")
    data = Path(args.data)
    if not data.is_file():
        raise CommandError(f"{args.data} is not a file")
    spec = {k: v for k, v in model.spec.items() if k not in ("dataset_id", "init_from", "freeze", "refit")}
    # The model's own columns, by name: a new table must hold them, whatever else it holds.
    spec.update(name=model.name, features=model.features)
    spec["target"] = model.targets[0] if len(model.targets) == 1 else model.targets
    if args.source is not None:
        source = args.source
        spec["init_from"] = f"{model.name}:{source}" if source.isdigit() else f"{model.name}@{source}"
    if args.epochs is not None:
        spec["epochs"] = args.epochs
    # A stored spec holds every default; the default batch was never the user's choice, and
    # sent, the server would hold it against a smaller table (a 422 asking for a batch size).
    if spec.get("batch_size") == TrainSpec.model_fields["batch_size"].default:
        del spec["batch_size"]
    if args.batch_size is not None:
        spec["batch_size"] = args.batch_size
    job = client.train(spec, file=data, **_reading(args))
    if not args.follow:
        print(f"job {job.id} {job.status}; follow it with: trainserve follow {job.id}")
        return 0
    print(f"job {job.id} {job.status}", file=sys.stderr)
    return _follow_job(client, job.id, as_json=False)


# The server answers at most this many items per request (GET /jobs, GET /models).
PAGE_LIMIT = 1000
Item = TypeVar("Item")


def _paged(fetch: Callable[[int, int], list[Item]], args: argparse.Namespace) -> list[Item]:
    """``--limit`` items from ``--offset`` on, a page of at most PAGE_LIMIT per request."""
    if args.limit < 1 or args.offset < 0:
        raise CommandError("--limit must be at least 1 and --offset at least 0")
    found: list[Item] = []
    while len(found) < args.limit:
        want = min(PAGE_LIMIT, args.limit - len(found))
        page = fetch(want, args.offset + len(found))
        found.extend(page)
        if len(page) < want:
            break
    return found


# -- sweeps --------------------------------------------------------------------------------------


def _add_sweep_commands(commands: Any, common: list[argparse.ArgumentParser]) -> None:
    sweep = commands.add_parser(
        "sweep", parents=[*common, _reading_flags()], help="search hyperparameters: many trials of a base spec"
    )
    sweep.add_argument("data", help="a CSV or .npz file, or the id of an uploaded dataset")
    sweep.add_argument("--spec", required=True, type=Path, help="the base training spec, a JSON file")
    sweep.add_argument(
        "--search",
        required=True,
        type=Path,
        help='the search space, a JSON file: {"optimizer.lr": {"log_uniform": ...}}',
    )
    sweep.add_argument("--trials", type=int, default=10)
    sweep.add_argument("--parallel", type=int, default=1, help="trials queued or running at once")
    sweep.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    sweep.add_argument("--pruner", choices=["asha", "median", "none"], default="none")
    sweep.add_argument("--metric", default="val_loss", help="the objective: a metric the model reports")
    sweep.add_argument("--direction", choices=["minimize", "maximize"], default="minimize")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--name", help="a label for the sweep")
    sweep.add_argument("--follow", "-f", action="store_true", help="show progress, then the leaderboard")
    sweep.add_argument("--json", action="store_true", help="print the sweep as JSON")
    sweep.set_defaults(run=_with_client(_sweep))

    sweeps = commands.add_parser("sweeps", parents=common, help="list sweeps, newest first; or show one")
    sweeps.add_argument("sweep", nargs="?", help="a sweep id: show its leaderboard")
    sweeps.add_argument("--limit", type=int, default=50)
    sweeps.add_argument("--json", action="store_true")
    sweeps.set_defaults(run=_with_client(_sweeps))


def _sweep(client: TrainserveClient, args: argparse.Namespace) -> int:
    base = _read_spec(args.spec)
    search = _read_spec(args.search)
    request: dict[str, Any] = {
        "name": args.name,
        "base": base,
        "search": search,
        "sampler": args.sampler,
        "trials": args.trials,
        "parallel": args.parallel,
        "objective": {"metric": args.metric, "direction": args.direction},
        "pruner": args.pruner,
        "seed": args.seed,
    }
    data = Path(args.data)
    if data.is_file():
        base.pop("dataset_id", None)
        sweep = client.create_sweep(request, file=data, **_reading(args))
    elif _ID.match(args.data):
        _refuse_reading_without_file(args)
        sweep = client.create_sweep({**request, "base": {**base, "dataset_id": args.data}})
    else:
        raise CommandError(f"{args.data} is neither a file nor a dataset id")
    if not args.follow:
        if args.json:
            _print_json(sweep.model_dump(mode="json"))
        else:
            print(f"sweep {sweep.id} {sweep.status}; follow it with: trainserve sweeps {sweep.id}")
        return 0
    print(f"sweep {sweep.id} {sweep.status}", file=sys.stderr)
    with tqdm(total=sweep.n_trials, desc=sweep.name or sweep.id[:8], unit="trial", file=sys.stderr) as bar:
        try:
            while True:
                sweep = client.get_sweep(sweep.id)
                ended = sum(t.state not in ("queued", "running") for t in sweep.trials)
                best = sweep.best.value if sweep.best is not None else None
                bar.set_postfix({"best": _loss_text(best), "running": sweep.counts.get("running", 0)}, refresh=False)
                bar.update(ended - bar.n)
                if sweep_done(sweep):
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            bar.close()
            print(f"stopped following; the sweep goes on (trainserve sweeps {sweep.id})", file=sys.stderr)
            return 130
    if args.json:
        _print_json(sweep.model_dump(mode="json"))
    else:
        _leaderboard(sweep)
    return 0 if sweep.best is not None else 1


def _leaderboard(sweep: SweepDetail) -> None:
    direction = sweep.objective.get("direction", "minimize")
    metric = sweep.objective.get("metric", "value")
    ranked = sorted(
        sweep.trials,
        key=lambda t: (
            t.value is None or t.state != "complete",
            (-1 if direction == "maximize" else 1) * (t.value or 0.0),
            t.number,
        ),
    )
    rows = []
    for rank, t in enumerate(ranked, 1):
        params = " ".join(f"{k}={_param_text(v)}" for k, v in t.params.items())
        how = f"pruned@{t.pruned_at}" if t.state == "pruned" else t.state
        rows.append([str(rank), str(t.number), how, _loss_text(t.value), f"{t.epochs_run}", params, t.model_id or "-"])
    print(f"sweep {sweep.id} {sweep.status}: {metric} ({direction})")
    _table(rows, ["RANK", "TRIAL", "STATE", metric.upper(), "EPOCHS", "PARAMS", "MODEL"])


def _param_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sweeps(client: TrainserveClient, args: argparse.Namespace) -> int:
    if args.sweep is not None:
        sweep = client.get_sweep(args.sweep)
        if args.json:
            _print_json(sweep.model_dump(mode="json"))
        else:
            _leaderboard(sweep)
        return 0
    found = client.list_sweeps(limit=args.limit)
    if args.json:
        _print_json([s.model_dump(mode="json") for s in found])
        return 0
    rows = []
    for s in found:
        done = sum(n for state, n in s.counts.items() if state not in ("queued", "running"))
        best = _loss_text(s.best.value) if s.best is not None else "-"
        rows.append([s.id, s.name or "-", s.status, f"{done}/{s.n_trials}", s.objective["metric"], best])
    _table(rows, ["SWEEP", "NAME", "STATUS", "TRIALS", "OBJECTIVE", "BEST"])
    return 0
