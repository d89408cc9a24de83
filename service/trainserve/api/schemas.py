"""Pydantic request and response bodies of the HTTP API (apart from the ORM tables).

The client imports these too, so they stay free of FastAPI and SQLAlchemy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from trainserve.jobs.status import JobStatus


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TopValue(BaseModel):
    value: Any = Field(description="A category (or true/false for a boolean column)")
    count: int


class ColumnProfile(BaseModel):
    kind: Literal["number", "integer", "boolean", "category"]
    missing: int = Field(description="Rows where the column is blank or a null token")
    missing_share: float = Field(description="missing / rows, 0 to 1")
    distinct: int = Field(description="Distinct non-missing values")
    min: float | None = Field(default=None, description="numbers, integers and booleans")
    max: float | None = Field(default=None, description="numbers, integers and booleans")
    mean: float | None = Field(default=None, description="numbers, integers and booleans")
    top: list[TopValue] | None = Field(
        default=None, description="categories and booleans: the most frequent values, at most 10"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What to look at before training: constant, looks like an id, very high cardinality, "
        "missing in most rows, a rare class, a mixed column",
    )


_KIND_OF_DTYPE = {"string": "category", "int64": "integer", "float64": "number"}


class Column(_Out):
    name: str
    dtype: str = Field(description="int64, float64 or string")
    classes: list[Any] | None = Field(description="Distinct non-missing values, when the column can be a class label")
    kind: Literal["number", "integer", "boolean", "category"] = Field(
        description="The inferred type; a boolean is stored as float64 0/1, a blank number as NaN, a blank text as ''"
    )
    missing: int = Field(default=0, description="Rows where the column is missing")
    profile: ColumnProfile | None = Field(default=None, description="None for datasets uploaded before profiles")

    @model_validator(mode="before")
    @classmethod
    def _old_records(cls, data: Any) -> Any:
        # Datasets stored before kinds and profiles existed carry only name, dtype and classes.
        if isinstance(data, dict) and not data.get("kind"):
            data = {**data, "kind": _KIND_OF_DTYPE.get(data.get("dtype", ""), "number")}
        if isinstance(data, dict) and not data.get("profile"):
            data = {**data, "profile": None}
        return data


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
    parent_model_id: str | None = Field(
        default=None, description="The model a warm start (init_from) began from, if any"
    )


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
    alias: str | None = Field(default=None, description="With name: the version this alias points to (e.g. production)")
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


class ModelLink(_Out):
    """One model of a warm-start chain."""

    id: str
    name: str | None = None
    version: int | None = None
    created_at: UTCDateTime


class ModelDetail(Model):
    chain: list[ModelLink] = Field(
        default_factory=list,
        description="Warm-start ancestry, parent first, back to the first version (ends early at a deleted model)",
    )


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, lt=2**31, description="The version of the model this alias points to")
    note: str | None = Field(default=None, max_length=1000, description="Why: kept in the alias history")


class Alias(_Out):
    alias: str
    version: int
    note: str | None = None
    updated_at: UTCDateTime


class AliasEvent(_Out):
    alias: str
    from_version: int | None = Field(description="null: the alias was created")
    to_version: int | None = Field(description="null: the alias was deleted")
    note: str | None = None
    who: str | None = Field(default=None, description="Who moved it, where the API knows an identity")
    created_at: UTCDateTime


class ModelName(BaseModel):
    """A model name: its versions (newest first), its aliases and their history (newest first)."""

    name: str
    serving_version: int = Field(description="The version that answers requests naming only the model")
    versions: list[Model]
    aliases: list[Alias]
    history: list[AliasEvent]


class PredictionLogEntry(_Out):
    id: int
    model_id: str
    name: str | None = None
    version: int | None = None
    created_at: UTCDateTime
    inputs: list[Any] = Field(description="The rows as the model received them (feature order)")
    outputs: list[Any] = Field(description="Its predictions for those rows")


class FeatureDrift(_Out):
    feature: str
    psi: float = Field(description="Population stability index over the training split's decile bins")
    missing_share: float = Field(description="Share of logged rows where the value was missing")
    drifted: bool = Field(description="psi above the threshold")


class DriftReport(_Out):
    model_id: str
    name: str | None = None
    version: int | None = None
    window_rows: int = Field(description="Logged input rows compared (the newest, at most TRAINSERVE_DRIFT_WINDOW)")
    threshold: float
    features: list[FeatureDrift]


class ShadowAgreement(_Out):
    """The shadow version's answers against the answers given, over the logged pairs."""

    name: str
    shadow_model_id: str
    shadow_version: int
    pairs: int = Field(description="Logged requests that both answered (the newest, at most TRAINSERVE_DRIFT_WINDOW)")
    rows: int
    label_agreement: float | None = Field(description="Classifiers: share of rows given the same label")
    mean_abs_difference: float | None = Field(description="Regressions: mean absolute difference of the values")


class Worker(_Out):
    name: str = Field(description="host:pid of the worker process")
    devices: list[str] = Field(description="What it can train on: cpu, cuda:N, mps")
    heartbeat_at: UTCDateTime = Field(description="When it last said it was alive (every rescue interval)")
    started_at: UTCDateTime
    live: bool = Field(default=False, description="Its heartbeat is recent: a job for one of its devices will be taken")
