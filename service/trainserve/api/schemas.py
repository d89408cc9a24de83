"""Pydantic request and response bodies of the HTTP API (apart from the ORM tables).

The client imports these too, so they stay free of FastAPI and SQLAlchemy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from trainserve.jobs.status import JobStatus


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Column(_Out):
    name: str
    dtype: str = Field(description="int64, float64 or string")
    classes: list[Any] | None = Field(description="Distinct values, when the column can be a class label")


class Dataset(_Out):
    id: str
    filename: str | None
    format: str
    n_rows: int
    columns: list[Column]
    size_bytes: int
    sha256: str = Field(description="sha256 of the uploaded bytes")
    created_at: UTCDateTime


class Job(_Out):
    id: str
    name: str | None = Field(default=None, description="The spec's model name, if it gave one")
    status: JobStatus
    dataset_id: str | None
    model_id: str | None
    epoch: int
    epochs: int
    train_loss: float | None
    val_loss: float | None
    val_metrics: dict[str, float] | None
    device: str | None
    error: str | None
    cancel_requested: bool
    attempts: int = Field(description="How many times a worker claimed it (a worker that died costs one)")
    worker: str | None = Field(description="host:pid of the worker process that ran it")
    lease_expires_at: UTCDateTime | None = Field(
        default=None, description="While running: when the job goes back to the queue unless its worker renews"
    )
    heartbeat_at: UTCDateTime | None = Field(default=None, description="The worker's last lease renewal")
    checkpoint_epoch: int | None = Field(default=None, description="Epoch of the last checkpoint saved to resume from")
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    spec: dict[str, Any]
    notes: list[str] = Field(
        default_factory=list,
        description="How it ran: which training loop, re-queued, resumed, handed back, stopped early",
    )
    sweep_id: str | None = Field(default=None, description="The sweep this job is a trial of, if any")
    trial_number: int | None = Field(default=None, description="Its trial number in that sweep (0, 1, ...)")


class JobDetail(Job):
    history: list[list[Any]] = Field(description="[epoch, train_loss, val_loss] rows, at most ~1000")


class Model(_Out):
    id: str
    name: str | None = Field(default=None, description="The model name its spec gave, if any")
    version: int | None = Field(default=None, description="1, 2, ... among the models of that name")
    job_id: str = Field(description="The training job that made it")
    dataset_id: str | None = Field(description="The dataset it was trained on (null once that is deleted)")
    dataset_sha256: str = Field(description="sha256 of the uploaded bytes it was trained on")
    task: str = Field(description="classification, binary or regression")
    features: list[str]
    targets: list[str]
    classes: list[Any] | None
    input_mean: list[float] | None
    input_std: list[float] | None
    metrics: dict[str, float]
    n_parameters: int
    weights_sha256: str
    weights_bytes: int
    torch_version: str
    code_version: str | None = Field(default=None, description="The trainserve release that trained it")
    device: str
    train_seconds: float
    created_at: UTCDateTime
    spec: dict[str, Any]
    notes: list[str] = Field(default_factory=list, description="How it was trained: training loop, early stopping")


_INPUTS_SCHEMA = {
    "oneOf": [
        {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "number"}}},
    ],
    "description": "Rows as lists of numbers in feature order, or as objects keyed by feature name.",
    "examples": [[[0.5, -0.2]], [{"x0": 0.5, "x1": -0.2}]],
}


class PredictRequest(BaseModel):
    """Name the model by ``model_id``, or by ``name`` (the newest version) and optionally ``version``."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = None
    name: str | None = None
    version: int | None = Field(default=None, ge=1)
    # Read by trainserve.serving.formats, checked by serving.predictor.inputs_to_matrix with numpy: faster
    # than per-element pydantic validation, and its errors name the row and column.
    inputs: Annotated[list[Any], WithJsonSchema(_INPUTS_SCHEMA)]


class PredictResponse(BaseModel):
    model_id: str
    name: str | None = None
    version: int | None = None
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    classes: list[Any] | None = Field(default=None, description="Labels of the probability columns")


class JobEvent(BaseModel):
    """One Server-Sent Event of ``GET /jobs/{id}/events``."""

    event: str = Field(description="status, epoch or end")
    id: int | None = Field(default=None, description="The last epoch sent so far (resume with Last-Event-ID)")
    data: dict[str, Any]


class Error(BaseModel):
    type: str
    detail: str
    errors: list[dict[str, Any]] = []


class Trial(BaseModel):
    """One trial of a sweep: a job training the base spec with ``params`` set."""

    number: int
    job_id: str | None
    model_id: str | None
    params: dict[str, Any] = Field(description="Search path -> the value this trial trains with")
    state: str = Field(description="queued, running, complete, pruned, failed or cancelled")
    value: float | None = Field(description="The objective: the model's metric, or a pruned trial's last value")
    pruned_at: int | None = Field(description="The epoch after which the pruner stopped it")
    reason: str | None = Field(description="Why it was pruned or failed")
    epochs_run: int
    epochs: int | None


class Sweep(BaseModel):
    id: str
    name: str | None
    status: str = Field(description="running, succeeded, failed (no trial completed) or cancelled")
    dataset_id: str | None
    n_trials: int = Field(description="How many trials the sweep runs in all")
    parallel: int
    sampler: str
    pruner: str
    objective: dict[str, Any]
    seed: int
    search: dict[str, Any]
    created_at: UTCDateTime
    finished_at: UTCDateTime | None
    counts: dict[str, int] = Field(description="Trials by state")
    best: Trial | None = Field(description="The complete trial with the best objective value")


class SweepDetail(Sweep):
    trials: list[Trial]
    base: dict[str, Any] = Field(description="The base spec, complete, as validated")


class ComparedModel(BaseModel):
    id: str
    name: str | None
    version: int | None
    job_id: str
    metrics: dict[str, float]
    history: list[list[Any]] = Field(description="Its job's [epoch, train_loss, val_loss] rows")


class Comparison(BaseModel):
    """Models side by side: only the spec fields that differ, every metric, the loss curves."""

    models: list[ComparedModel]
    differences: dict[str, list[Any]] = Field(description="Dotted spec path -> each model's value, in order")
    metrics: dict[str, list[float | None]] = Field(description="Metric -> each model's value, in order")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(description="A labelled dataset holding the model's feature and target columns")


class Evaluation(_Out):
    """A model's metrics on a labelled dataset; draw them at ``.../evaluations/{id}/{kind}.png``."""

    id: str
    model_id: str
    dataset_id: str | None
    dataset_sha256: str
    n_rows: int
    task: str
    metrics: dict[str, Any] = Field(
        description="classifiers: accuracy, balanced_accuracy, macro_f1, per_class, confusion_matrix, roc_auc, "
        "log_loss, expected_calibration_error; regressors: mae, rmse, mse, r2, residuals"
    )
    created_at: UTCDateTime


class NameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="The model name to give")
