"""Pydantic request and response bodies of the HTTP API (apart from the ORM tables).

The client imports these too, so they stay free of FastAPI and SQLAlchemy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

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
    parent_model_id: str | None = Field(
        default=None, description="The model a warm start (init_from) began from, if any"
    )
    preprocessing: list[dict[str, Any]] | None = Field(
        default=None,
        description="Per feature column, in input order: kind, encoding, missing strategy, fill value, "
        "missing indicator, category level count (null: a model from before preprocessing existed)",
    )
    evaluation: dict[str, Any] | None = Field(
        default=None,
        description="The full report on the validation and test rows: accuracy, balanced accuracy, macro F1, "
        "per-class precision/recall/F1, confusion matrix, ROC AUC, log loss; MAE, RMSE, R² for regressors",
    )

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _described(cls, value: Any) -> Any:
        # Stored as the fitted plan (with vocabularies); shown as one summary per column.
        if isinstance(value, dict) and "columns" in value:
            return [_column_summary(c) for c in value["columns"]]
        return value


def _column_summary(column: dict[str, Any]) -> dict[str, Any]:
    """One column of a stored FeaturePlan (trainserve.training.features) as GET /models shows it;
    here rather than there so that the client's schemas need no torch."""
    category = column["kind"] == "category"
    levels = len(column.get("levels") or [])
    return {
        "name": column["name"],
        "kind": column["kind"],
        "encoding": column.get("encoding"),
        "missing": column.get("missing"),
        "fill_value": column.get("fill_value"),
        "indicator": bool(column.get("indicator")),
        "levels": levels if category else None,
        "blank_level": bool(column.get("blank_level")) if category else None,
        "embedding_dim": column.get("embedding_dim"),
        "width": _width(column, levels),
    }


def _width(column: dict[str, Any], levels: int) -> int:
    """Columns the feature takes in the network's input (an embedding: its dimension)."""
    if column["kind"] != "category":
        return 1 + int(bool(column.get("indicator")))
    if column.get("encoding") == "embedding":
        return int(column.get("embedding_dim") or 1)
    return levels + int(bool(column.get("blank_level")))


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
    warnings: list[dict[str, Any]] | None = Field(
        default=None,
        description="Cells answered anyway, each {row, column, value, message}: a category never seen in "
        "training (sent to the unknown slot), a blank where training had none (imputed)",
    )


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
    ignored_columns: list[str] | None = Field(
        default=None,
        description="The training table's columns the model does not use (type 'ignore', or left out of "
        "features): a JSON /predict row may carry them, and the target, and they are disregarded. null: a model "
        "trained before this was recorded, which refuses them",
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
    who: str | None = Field(
        default=None, description="The name of the API key that moved it; null on a server without API keys"
    )
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
    psi: float = Field(
        description="Population stability index against the training split: over its decile bins for a number, "
        "over the levels (blank and unseen each a bin) for a category"
    )
    missing_share: float = Field(description="Share of logged rows where the value was missing")
    drifted: bool = Field(description="psi above the threshold")
    kind: Literal["number", "category"] = Field(
        "number", description="number: PSI over decile bins; category: PSI over the levels, blank and unseen"
    )
    unseen_share: float | None = Field(
        None, description="Categories: share of logged rows holding a level never seen in training; null for numbers"
    )


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
