"""The training spec: a JSON description of a model that mirrors PyTorch's own names.

A spec is data, never code. Every layer, loss and optimizer is one of a fixed allow-list
of pydantic models (``extra="forbid"``), so an unknown name or keyword argument is
rejected when the spec is parsed, long before a worker sees it. ``plan_training`` then
checks the spec against a dataset's schema: columns exist, widths fit the labels,
sizes stay under the configured limits.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from trainserve.datasets.tables import ColumnInfo, TableSchema
from trainserve.errors import InvalidInput
from trainserve.examples import MOONS_MLP_LAYERS

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


def _is_none(value: Any) -> bool:
    """Fields added after specs were first stored are left out of a dump while unset, so that
    older specs dump (and fingerprint their checkpoints) as they always did."""
    return value is None


class _Strict(BaseModel):
    # strict: a JSON "10" or true is not the number 10 or 1; a spec says what it means.
    model_config = ConfigDict(extra="forbid", strict=True)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the torch class of the same name."""
        return self.model_dump(exclude={"type"})


# -- layers -------------------------------------------------------------------------------


def _inferred_error(name: str, layer: str) -> ValueError:
    # A layer's input width comes from the data. The field is declared only so that a spec
    # that sets it hears why, at its own loc, instead of pydantic's bare "Extra inputs are
    # not permitted"; it is never dumped (exclude) and not in the JSON schema.
    return ValueError(
        f"{name} is inferred from the data (the number of feature columns, or the width of the "
        f"layer before this {layer}): remove it from the spec"
    )


class Linear(_Strict):
    type: Literal["Linear"]
    out_features: int = Field(ge=1)
    bias: bool = True
    in_features: SkipJsonSchema[None] = Field(default=None, exclude=True)

    @field_validator("in_features", mode="before")
    @classmethod
    def _no_in_features(cls, value: Any) -> None:
        raise _inferred_error("in_features", "Linear")


class BatchNorm1d(_Strict):
    type: Literal["BatchNorm1d"]
    eps: Positive = 1e-5
    momentum: Annotated[float, Field(gt=0, le=1)] | None = 0.1
    affine: bool = True
    num_features: SkipJsonSchema[None] = Field(default=None, exclude=True)

    @field_validator("num_features", mode="before")
    @classmethod
    def _no_num_features(cls, value: Any) -> None:
        raise _inferred_error("num_features", "BatchNorm1d")


class LayerNorm(_Strict):
    type: Literal["LayerNorm"]
    eps: Positive = 1e-5
    elementwise_affine: bool = True
    normalized_shape: SkipJsonSchema[None] = Field(default=None, exclude=True)

    @field_validator("normalized_shape", mode="before")
    @classmethod
    def _no_normalized_shape(cls, value: Any) -> None:
        raise _inferred_error("normalized_shape", "LayerNorm")


class Dropout(_Strict):
    type: Literal["Dropout"]
    p: Fraction = 0.5


class ReLU(_Strict):
    type: Literal["ReLU"]


class Tanh(_Strict):
    type: Literal["Tanh"]


class Sigmoid(_Strict):
    type: Literal["Sigmoid"]


class GELU(_Strict):
    type: Literal["GELU"]
    approximate: Literal["none", "tanh"] = "none"


class SiLU(_Strict):
    type: Literal["SiLU"]


class Mish(_Strict):
    type: Literal["Mish"]


class ELU(_Strict):
    type: Literal["ELU"]
    alpha: Positive = 1.0


class LeakyReLU(_Strict):
    type: Literal["LeakyReLU"]
    negative_slope: NonNegative = 0.01


class Softplus(_Strict):
    type: Literal["Softplus"]
    beta: Positive = 1.0
    threshold: Positive = 20.0


class Identity(_Strict):
    type: Literal["Identity"]


Layer = Annotated[
    Linear
    | BatchNorm1d
    | LayerNorm
    | Dropout
    | ReLU
    | Tanh
    | Sigmoid
    | GELU
    | SiLU
    | Mish
    | ELU
    | LeakyReLU
    | Softplus
    | Identity,
    Field(discriminator="type"),
]

# -- losses -------------------------------------------------------------------------------


class MSELoss(_Strict):
    type: Literal["MSELoss"]


class L1Loss(_Strict):
    type: Literal["L1Loss"]


class HuberLoss(_Strict):
    type: Literal["HuberLoss"]
    delta: Positive = 1.0


class SmoothL1Loss(_Strict):
    type: Literal["SmoothL1Loss"]
    beta: NonNegative = 1.0


class CrossEntropyLoss(_Strict):
    type: Literal["CrossEntropyLoss"]
    label_smoothing: Fraction = 0.0
    weight: Literal["balanced"] | list[Positive] | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Per-class weights in the model's class order, or 'balanced': n / (classes x count), "
        "counted on the training split.",
    )

    def kwargs(self) -> dict[str, Any]:
        return {"label_smoothing": self.label_smoothing}  # the weight becomes a tensor in training.loop


class BCEWithLogitsLoss(_Strict):
    type: Literal["BCEWithLogitsLoss"]
    pos_weight: Literal["balanced"] | Positive | None = Field(
        default=None,
        exclude_if=_is_none,
        description="Weight of the positive class, or 'balanced': negatives / positives in training.",
    )

    def kwargs(self) -> dict[str, Any]:
        return {}  # pos_weight becomes a tensor in training.loop


Loss = Annotated[
    MSELoss | L1Loss | HuberLoss | SmoothL1Loss | CrossEntropyLoss | BCEWithLogitsLoss,
    Field(discriminator="type"),
]

CLASSIFICATION_LOSSES = frozenset({"CrossEntropyLoss"})
BINARY_LOSSES = frozenset({"BCEWithLogitsLoss"})

# -- optimizers (defaults are torch's own) -------------------------------------------------


class SGD(_Strict):
    type: Literal["SGD"]
    lr: Positive = 0.001
    momentum: NonNegative = 0.0
    dampening: NonNegative = 0.0
    weight_decay: NonNegative = 0.0
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGD:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")
        return self


# JSON has no tuples: a pair arrives as a list (and comes back from the database as one).
Betas = Annotated[tuple[Fraction, Fraction], Field(strict=False)]


class Adam(_Strict):
    type: Literal["Adam"]
    lr: Positive = 0.001
    betas: Betas = (0.9, 0.999)
    eps: Positive = 1e-8
    weight_decay: NonNegative = 0.0
    amsgrad: bool = False


class AdamW(_Strict):
    type: Literal["AdamW"]
    lr: Positive = 0.001
    betas: Betas = (0.9, 0.999)
    eps: Positive = 1e-8
    weight_decay: NonNegative = 0.01
    amsgrad: bool = False


class RMSprop(_Strict):
    type: Literal["RMSprop"]
    lr: Positive = 0.01
    alpha: Fraction = 0.99
    eps: Positive = 1e-8
    weight_decay: NonNegative = 0.0
    momentum: NonNegative = 0.0
    centered: bool = False


class Adagrad(_Strict):
    type: Literal["Adagrad"]
    lr: Positive = 0.01
    lr_decay: NonNegative = 0.0
    weight_decay: NonNegative = 0.0
    eps: Positive = 1e-10


Optimizer = Annotated[SGD | Adam | AdamW | RMSprop | Adagrad, Field(discriminator="type")]


# -- learning-rate schedulers (stepped once per epoch) and early stopping --------------------


class StepLR(_Strict):
    type: Literal["StepLR"]
    step_size: int = Field(ge=1)
    gamma: Positive = 0.1


class MultiStepLR(_Strict):
    type: Literal["MultiStepLR"]
    milestones: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=1_000)
    gamma: Positive = 0.1

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("milestones must be strictly increasing")
        return value


class ExponentialLR(_Strict):
    type: Literal["ExponentialLR"]
    gamma: Positive


class CosineAnnealingLR(_Strict):
    type: Literal["CosineAnnealingLR"]
    T_max: int = Field(ge=1)
    eta_min: NonNegative = 0.0


class LinearLR(_Strict):
    type: Literal["LinearLR"]
    start_factor: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0 / 3
    end_factor: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    total_iters: int = Field(default=5, ge=1)


class ReduceLROnPlateau(_Strict):
    """Watches the validation loss when there is a validation split, else the training loss."""

    type: Literal["ReduceLROnPlateau"]
    factor: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.1
    patience: int = Field(default=10, ge=0)
    threshold: NonNegative = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(default=0, ge=0)
    min_lr: NonNegative = 0.0
    eps: NonNegative = 1e-8


Scheduler = Annotated[
    StepLR | MultiStepLR | ExponentialLR | CosineAnnealingLR | LinearLR | ReduceLROnPlateau,
    Field(discriminator="type"),
]


class EarlyStopping(_Strict):
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = Field(default=5, ge=1)
    min_delta: NonNegative = 0.0
    restore_best_weights: bool = Field(
        default=True, description="Keep the weights of the best epoch rather than the last one."
    )


# -- per-column preprocessing and the split ---------------------------------------------------

ColumnType = Literal["number", "boolean", "category", "ignore"]
MissingStrategy = Literal["median", "mean", "constant", "drop_row", "error"]


class ColumnSpec(_Strict):
    """How one column becomes features; anything left out keeps the default of its inferred kind."""

    type: ColumnType | None = Field(default=None, description="Override the inferred kind; 'ignore' drops it.")
    encoding: Literal["one_hot", "embedding"] | None = Field(default=None, description="Categories only.")
    embedding_dim: int | None = Field(default=None, ge=1, le=1024, description="With encoding 'embedding'.")
    missing: MissingStrategy | None = Field(
        default=None,
        description="Blanks: numbers default to 'median' plus a missing-indicator column; categories to "
        "a level of their own. 'constant' takes fill_value.",
    )
    fill_value: Annotated[float, Field(allow_inf_nan=False)] | int | str | None = Field(
        default=None, description="With missing 'constant': a number for numbers, a label for categories."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        if self.fill_value is not None and self.missing != "constant":
            raise ValueError("fill_value goes with missing 'constant'")
        if self.missing == "constant" and self.fill_value is None:
            raise ValueError("missing 'constant' needs a fill_value")
        if self.embedding_dim is not None and self.encoding != "embedding":
            raise ValueError("embedding_dim goes with encoding 'embedding'")
        return self


class Split(_Strict):
    """Held-out rows: ``validation`` is watched during training, ``test`` only scored at the end."""

    validation: Fraction = 0.0
    test: Fraction = 0.0
    stratify: bool = Field(default=False, description="Keep each class's share in every part (classifiers).")

    @model_validator(mode="after")
    def _leaves_training(self) -> Split:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must leave rows to train on (their sum must be below 1)")
        return self


def _named(value: Any) -> Any:
    """Let ``"loss": "MSELoss"`` stand for ``{"type": "MSELoss"}``."""
    return {"type": value} if isinstance(value, str) else value


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2}|mps)$")
# A model name is a slug: it appears in URLs, file names the CLI writes and log lines.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_COLUMN_LIMIT = 10_000


# The guide's make_moons experiment, shown on the docs page: "Try it out" trains it on the
# shipped examples/moons.csv (x0, x1, y) once that table's id is put in dataset_id.
_EXAMPLE: dict[str, Any] = {
    "dataset_id": "3f2c9a0e6b1d4c5e8f7a9b0c1d2e3f40",
    "target": "y",
    "model": MOONS_MLP_LAYERS,
    "loss": "CrossEntropyLoss",
    "optimizer": {"type": "SGD", "lr": 0.001},
    "epochs": 300,
    "batch_size": 1,
}


class TrainSpec(BaseModel):
    """What to train, on which data, and how."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [_EXAMPLE]})

    dataset_id: str | None = Field(
        default=None, description="An uploaded dataset; omit when the file travels in the same request."
    )
    name: str | None = Field(
        default=None,
        pattern=MODEL_NAME_PATTERN,
        description="Model name: each successful job under a name adds its next version (1, 2, ...). "
        "Letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters.",
        examples=["moons-classifier"],
    )
    target: str | list[str] | None = Field(default=None, description="Label column(s); default: the last column.")
    features: list[str] | None = Field(
        default=None, max_length=_COLUMN_LIMIT, description="Input columns; default: every other column."
    )
    model: list[Layer] = Field(min_length=1, max_length=256, description="nn.Sequential's layers, in order.")
    loss: Loss
    optimizer: Optimizer = Field(default_factory=lambda: SGD(type="SGD"))
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    shuffle: bool = True
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Same seed, same data, same CPU: same weights.")
    standardize: bool = Field(default=True, description="Scale inputs with training-set mean and std.")
    validation_split: Fraction = Field(default=0.0, description="Short for split: {validation: x}.")
    split: Split | None = Field(
        default=None, exclude_if=_is_none, description="Validation and test shares, optionally stratified."
    )
    columns: dict[str, ColumnSpec] | None = Field(
        default=None,
        exclude_if=_is_none,
        max_length=_COLUMN_LIMIT,
        description="Per-column overrides of type and missing values.",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    scheduler: Scheduler | None = Field(
        default=None, description="A torch.optim.lr_scheduler by name, stepped once per epoch."
    )
    early_stopping: EarlyStopping | None = Field(
        default=None, description="Stop on a validation-loss plateau; needs validation_split > 0."
    )
    clip_grad_norm: Positive | None = Field(
        default=None, description="max_norm for torch.nn.utils.clip_grad_norm_, applied every step."
    )
    loop: Literal["auto", "eager"] = Field(
        default="auto",
        description="auto: run the whole training step as generated native code where the spec allows "
        "and it pays off; eager: always the eager PyTorch loop. (The old name, compile: auto | off, "
        "is still accepted.)",
    )
    autocast: Literal["bf16"] | None = Field(
        default=None, description="Mixed precision on CUDA: forward and loss under torch.autocast(bfloat16)."
    )
    max_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Fail the job if it trains longer than this; at most the server's TRAINSERVE_MAX_JOB_SECONDS.",
    )

    init_from: str | None = Field(
        default=None,
        max_length=200,
        description="Warm start: begin from this trained model's weights (a model id, name, name:3 or "
        "name@alias). Same features, classes and layer shapes; its preprocessing statistics are kept "
        "unless refit is true.",
        examples=["moons@production"],
    )
    freeze: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        max_length=256,
        description="With init_from: indices (0-based, in model) of layers whose parameters stay fixed.",
    )
    refit: bool = Field(
        default=False,
        description="With init_from: fit the preprocessing statistics (input scaler) on this data "
        "instead of keeping the parent's.",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_the_old_loop_name(cls, data: Any) -> Any:
        # Specs (and stored models and jobs) from before the field was renamed said
        # compile: "auto" | "off"; "off" meant the eager loop.
        if isinstance(data, dict) and "compile" in data:
            data = dict(data)
            old = data.pop("compile")
            if "loop" in data:
                raise ValueError("give loop (auto or eager) or its old name compile, not both")
            data["loop"] = {"off": "eager"}.get(old, old) if isinstance(old, str) else old
        return data

    @field_validator("loss", "optimizer", "scheduler", mode="before")
    @classmethod
    def _accept_bare_name(cls, value: Any) -> Any:
        return _named(value)

    @field_validator("model", mode="before")
    @classmethod
    def _accept_bare_layer_names(cls, value: Any) -> Any:
        return [_named(layer) for layer in value] if isinstance(value, list) else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("features")
    @classmethod
    def _distinct_features(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("features must name at least one column")
            seen: set[str] = set()
            for name in value:
                if name in seen:
                    raise ValueError(f"feature {name!r} is listed twice")
                seen.add(name)
        return value

    @field_validator("target")
    @classmethod
    def _distinct_targets(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("target must name at least one column")
            for i, name in enumerate(value):
                if name in value[:i]:
                    raise ValueError(f"target {name!r} is listed twice: name each target column once")
        return value

    @model_validator(mode="after")
    def _one_split(self) -> TrainSpec:
        # A stored spec is dumped with every field, validation_split 0.0 included: only a share counts.
        if self.split is not None and self.validation_split > 0:
            raise ValueError("give either validation_split or split, not both (split: {validation, test, stratify})")
        return self

    @property
    def target_names(self) -> list[str] | None:
        return [self.target] if isinstance(self.target, str) else self.target

    @property
    def validation_share(self) -> float:
        return self.split.validation if self.split is not None else self.validation_split

    @property
    def test_share(self) -> float:
        return self.split.test if self.split is not None else 0.0


# -- checking a spec against its data --------------------------------------------------------

Task = Literal["classification", "binary", "regression"]


@dataclass(frozen=True)
class Limits:
    max_epochs: int
    max_parameters: int
    max_layer_width: int
    max_job_seconds: float = math.inf
    # A rough upper bound on what one job may allocate (see estimate_memory_bytes).
    max_memory_bytes: int = 8 * 1024**3
    # A category column with more distinct values than this is refused (one-hot width).
    max_category_levels: int = 1000


@dataclass(frozen=True)
class TrainingPlan:
    """A spec resolved against its dataset: everything a worker needs besides the arrays."""

    features: list[str]
    targets: list[str]
    task: Task
    classes: list[Any] | None
    in_features: int  # the network's input width: encoded columns, embedded categories at their dims
    out_features: int
    n_parameters: int  # embeddings included
    # Category columns trained as embeddings, last in the encoded layout: (table rows, dim) each.
    embeddings: tuple[tuple[int, int], ...] = ()


def task_of(loss: Loss) -> Task:
    if loss.type in CLASSIFICATION_LOSSES:
        return "classification"
    if loss.type in BINARY_LOSSES:
        return "binary"
    return "regression"


def _fail(msg: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])


def _column(schema: TableSchema, name: str, field: str) -> ColumnInfo:
    column = schema.column(name)
    if column is None:
        names = ", ".join(repr(c.name) for c in schema.columns[:20])
        raise _fail(f"{field} column {name!r} is not in the dataset (columns: {names})", [field])
    return column


def count_parameters(layers: list[Any], in_features: int) -> tuple[int, int]:
    """(parameter count, output width) of the network the layers describe."""
    width, params = in_features, 0
    for layer in layers:
        if isinstance(layer, Linear):
            params += width * layer.out_features + (layer.out_features if layer.bias else 0)
            width = layer.out_features
        elif isinstance(layer, BatchNorm1d | LayerNorm) and (
            layer.affine if isinstance(layer, BatchNorm1d) else layer.elementwise_affine
        ):
            params += 2 * width
    return params, width


def estimate_memory_bytes(spec: TrainSpec, n_rows: int, n_columns: int, n_parameters: int) -> int:
    """An upper-bound guess of a job's float32 memory: the table on the device plus the
    shuffled copy the engine gathers each epoch, weights with their gradients and up to two
    optimizer slots (Adam's moments), and each layer's activations and their gradients for
    one batch."""
    data = 2 * n_rows * n_columns
    parameters = 4 * n_parameters
    width, outputs = n_columns, n_columns
    for layer in spec.model:
        width = layer.out_features if isinstance(layer, Linear) else width
        outputs += width
    activations = 2 * min(spec.batch_size, n_rows) * outputs
    return 4 * (data + parameters + activations)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.2f} GiB"


def plan_training(spec: TrainSpec, schema: TableSchema, limits: Limits) -> TrainingPlan:
    """Check ``spec`` against the dataset it names; raise InvalidInput naming the field."""
    if spec.epochs > limits.max_epochs:
        raise _fail(f"epochs is {spec.epochs}, the limit is {limits.max_epochs}", ["epochs"])
    if spec.max_seconds is not None and spec.max_seconds > limits.max_job_seconds:
        raise _fail(
            f"max_seconds is {spec.max_seconds:g}, the server's limit (TRAINSERVE_MAX_JOB_SECONDS) is "
            f"{limits.max_job_seconds:g}",
            ["max_seconds"],
        )
    for i, layer in enumerate(spec.model):
        if isinstance(layer, Linear) and layer.out_features > limits.max_layer_width:
            raise _fail(
                f"out_features is {layer.out_features}, the limit is {limits.max_layer_width}",
                ["model", i, "out_features"],
            )
        if isinstance(layer, BatchNorm1d) and spec.batch_size < 2:
            raise _fail("BatchNorm1d needs batch_size >= 2", ["batch_size"])

    if spec.early_stopping is not None and spec.validation_share <= 0:
        raise _fail(
            "early_stopping watches the validation loss: set validation_split > 0 (e.g. 0.2)",
            ["early_stopping"],
        )

    targets = spec.target_names or [schema.columns[-1].name]
    for name in targets:
        _column(schema, name, "target")
    features = _plan_columns(spec, schema, targets, limits)
    task = task_of(spec.loss)
    classes: list[Any] | None = None
    if task == "regression":
        for name in targets:
            if _column(schema, name, "target").dtype == "string":
                raise _fail(
                    f"{spec.loss.type} needs a numeric target, column {name!r} holds text labels; "
                    "use CrossEntropyLoss for classification",
                    ["loss"],
                )
        expected_width = len(targets)
    else:
        if len(targets) != 1:
            raise _fail(f"{spec.loss.type} takes exactly one target column", ["target"])
        column = _column(schema, targets[0], "target")
        if column.classes is None:
            raise _fail(
                f"{spec.loss.type} needs class labels, but column {column.name!r} holds "
                "non-integer numbers or too many distinct values",
                ["target"],
            )
        # A blank target is no label: such rows are dropped before training.
        classes = [c for c in column.classes if c != ""]
        if len(classes) < 2:
            raise _fail(f"target column {column.name!r} has a single class", ["target"])
        if task == "binary" and len(classes) != 2:
            raise _fail(
                f"BCEWithLogitsLoss needs exactly 2 classes, column {column.name!r} has {len(classes)}",
                ["loss"],
            )
        expected_width = len(classes) if task == "classification" else 1
        weight = getattr(spec.loss, "weight", None)
        if isinstance(weight, list) and len(weight) != len(classes):
            raise _fail(
                f"loss.weight has {len(weight)} values, column {column.name!r} has {len(classes)} classes "
                f"({classes[:10]}): give one weight per class, in that order, or 'balanced'",
                ["loss", "weight"],
            )

    encodings = [encoding_of(_column(schema, name, "features"), spec) for name in features]
    embeddings = tuple(table for _, table in encodings if table is not None)
    in_features = sum(width for width, _ in encodings)
    n_parameters, out_width = count_parameters(spec.model, in_features)
    n_parameters += sum(rows * dim for rows, dim in embeddings)
    if out_width != expected_width:
        what = {
            "classification": f"{expected_width} classes in {targets[0]!r}",
            "binary": "1 logit for BCEWithLogitsLoss",
            "regression": f"{expected_width} target column(s)",
        }[task]
        last = max((i for i, layer in enumerate(spec.model) if isinstance(layer, Linear)), default=None)
        loc: list[str | int] = ["model", last, "out_features"] if last is not None else ["model"]
        raise _fail(f"the model's output width is {out_width}, the data needs {what}", loc)
    if n_parameters == 0:
        raise _fail("the model has no trainable parameters: add a Linear layer", ["model"])
    if n_parameters > limits.max_parameters:
        raise _fail(f"the model has {n_parameters:,} parameters, the limit is {limits.max_parameters:,}", ["model"])
    memory = estimate_memory_bytes(spec, schema.n_rows, in_features + len(targets), n_parameters)
    if memory > limits.max_memory_bytes:
        raise _fail(
            f"training would need about {_gib(memory)} (table, weights with optimizer state, and "
            f"activations for batch_size {spec.batch_size}), the limit is {_gib(limits.max_memory_bytes)}",
            ["batch_size"] if spec.batch_size > 1 else ["model"],
        )
    _check_split(spec, schema, targets, classes)
    return TrainingPlan(
        features=features,
        targets=targets,
        task=task,
        classes=classes,
        in_features=in_features,
        out_features=out_width,
        n_parameters=n_parameters,
        embeddings=embeddings,
    )


# -- columns --------------------------------------------------------------------------------


def column_kind(column: ColumnInfo, override: ColumnSpec | None = None) -> str:
    """number, boolean, category or ignore: the spec's word first, else what the upload inferred."""
    if override is not None and override.type is not None:
        return override.type
    inferred = getattr(column, "kind", None)
    if inferred in ("number", "integer"):
        return "number"
    if inferred in ("boolean", "category"):
        return str(inferred)
    return "category" if column.dtype == "string" else "number"


def _missing_of(column: ColumnInfo) -> int:
    return int(getattr(column, "missing", 0) or 0)


def _levels_of(column: ColumnInfo) -> int | None:
    """Distinct non-blank values, when the schema knows them (None: more than it lists)."""
    if column.classes is None:
        return None
    return sum(1 for c in column.classes if c != "")


# A category with more levels than this is embedded rather than one-hot by default.
EMBED_ABOVE_LEVELS = 50


def embedding_dim(levels: int) -> int:
    """The default width of a category's embedding: grows slowly with its levels (fastai's
    rule of thumb, 1.6 * levels ** 0.56), at most 16."""
    return int(min(16, max(2, round(1.6 * levels**0.56))))


def wants_embedding(override: ColumnSpec | None, levels: int) -> bool:
    if override is not None and override.encoding is not None:
        return override.encoding == "embedding"
    return levels > EMBED_ABOVE_LEVELS


def encoding_of(column: ColumnInfo, spec: TrainSpec) -> tuple[int, tuple[int, int] | None]:
    """(network input columns, embedding table or None) a feature becomes (an upper bound: levels
    are refitted on the training split): a number 1, plus 1 for its missing indicator; a
    one-hot category one per level, plus one for blanks; an embedded one its dimension."""
    override = (spec.columns or {}).get(column.name)
    kind = column_kind(column, override)
    missing = _missing_of(column) > 0
    if kind == "category":
        levels = _levels_of(column) or 1
        if wants_embedding(override, levels):
            dim = override.embedding_dim if override is not None and override.embedding_dim else embedding_dim(levels)
            return dim, (levels + 2, dim)
        blank_level = missing and (override is None or override.missing is None)
        return levels + int(blank_level), None
    indicator = missing and (override is None or override.missing in (None, "median", "mean", "constant"))
    return 1 + int(indicator), None


def _plan_columns(spec: TrainSpec, schema: TableSchema, targets: list[str], limits: Limits) -> list[str]:
    """The feature columns, with each column override checked against the data it names."""
    overrides = spec.columns or {}
    for name in overrides:
        if schema.column(name) is None:
            names = ", ".join(repr(c.name) for c in schema.columns[:20])
            raise _fail(f"columns: {name!r} is not in the dataset (columns: {names})", ["columns", name])
        if name in targets:
            raise _fail(f"columns: {name!r} is the target; columns describes feature columns only", ["columns", name])
    ignored = {name for name, o in overrides.items() if o.type == "ignore"}
    if spec.features is None:
        features = [c.name for c in schema.columns if c.name not in targets and c.name not in ignored]
    else:
        features = list(spec.features)
        overlap = set(features) & set(targets)
        if overlap:
            raise _fail(
                f"column {sorted(overlap)[0]!r} is both a feature and the target: remove it from features",
                ["features"],
            )
        both = set(features) & ignored
        if both:
            raise _fail(f"column {sorted(both)[0]!r} is in features and has type 'ignore'", ["features"])
    if not features:
        raise _fail("there are no feature columns left besides the target", ["features"])
    for name in features:
        column = _column(schema, name, "features")
        _check_column(column, overrides.get(name), schema.n_rows, limits)
    return features


def _check_column(column: ColumnInfo, override: ColumnSpec | None, n_rows: int, limits: Limits) -> None:
    name = column.name
    kind = column_kind(column, override)
    loc: list[str | int] = ["columns", name] if override is not None else ["features"]
    missing = _missing_of(column)
    if n_rows and missing >= n_rows:
        raise _fail(
            f"column {name!r} is missing in every row: leave it out with "
            f'"columns": {{"{name}": {{"type": "ignore"}}}} or list the features to use',
            loc,
        )
    if override is None:
        if kind == "category":
            _check_levels(column, limits, loc)
        return
    # A text column asked to be a number is checked against the data itself, to name the
    # rows that hold words (training.features.check_numbers).
    if kind == "boolean" and column.dtype == "string":
        raise _fail(f"columns.{name}: a text column cannot be 'boolean'; use 'category'", [*loc, "type"])
    if override.encoding is not None and kind != "category":
        raise _fail(f"columns.{name}: encoding is for category columns, this one is {kind!r}", [*loc, "encoding"])
    if kind == "category":
        _check_levels(column, limits, loc)
        if override.missing in ("median", "mean"):
            raise _fail(
                f"columns.{name}: {override.missing!r} is for numbers; a category's blanks are a level of "
                "their own by default, or use 'constant' with a fill_value label, 'drop_row' or 'error'",
                [*loc, "missing"],
            )
    if override.missing == "error" and missing:
        raise _fail(
            f"columns.{name}: missing is 'error' and the column has {missing} blank row(s); "
            "choose another strategy or fill them in",
            [*loc, "missing"],
        )
    if override.fill_value is not None:
        text_levels = kind == "category" and column.dtype == "string"
        if text_levels and not isinstance(override.fill_value, str):
            msg = f"columns.{name}: fill_value must be a label (a string) for this text column"
            raise _fail(msg, [*loc, "fill_value"])
        if not text_levels and isinstance(override.fill_value, str):
            raise _fail(f"columns.{name}: fill_value must be a number for this {kind} column", [*loc, "fill_value"])


def _check_levels(column: ColumnInfo, limits: Limits, loc: list[str | int]) -> None:
    levels = _levels_of(column)
    if levels is None or levels > limits.max_category_levels:
        count = "more than 1000" if levels is None else str(levels)
        raise _fail(
            f"column {column.name!r} is a category with {count} distinct values, the limit is "
            f"{limits.max_category_levels} (TRAINSERVE_CATEGORY_LIMIT): ignore it with "
            f'"columns": {{"{column.name}": {{"type": "ignore"}}}}, or treat it as a number',
            loc,
        )


def split_sizes(n_rows: int, validation: float, test: float) -> tuple[int, int, int]:
    """(train, validation, test) row counts of a split of ``n_rows`` (stratified splits round per class)."""
    n_test = math.floor(n_rows * test)
    n_val = math.floor(n_rows * validation)
    return n_rows - n_val - n_test, n_val, n_test


def _check_split(spec: TrainSpec, schema: TableSchema, targets: list[str], classes: list[Any] | None) -> None:
    field = "split" if spec.split is not None else "validation_split"
    blank_targets = max(_missing_of(_column(schema, name, "target")) for name in targets)
    n_rows = schema.n_rows - blank_targets
    n_train, n_val, n_test = split_sizes(n_rows, spec.validation_share, spec.test_share)
    if spec.validation_share and n_val < 1:
        raise _fail(f"{field} leaves no validation rows for this dataset ({n_rows} rows)", [field])
    if spec.test_share and n_test < 1:
        raise _fail(f"{field} leaves no test rows for this dataset ({n_rows} rows)", [field])
    needed = max(len(classes) if classes is not None else 1, 2 if spec.validation_share or spec.test_share else 1)
    if n_train < needed:
        what = f"the {len(classes)} classes" if classes is not None else "training"
        raise _fail(
            f"{field} leaves {n_train} training row(s) of {n_rows}, too few for {what}: hold out a smaller share",
            [field],
        )
    if spec.split is not None and spec.split.stratify and classes is None:
        raise _fail("split.stratify is for classifiers (CrossEntropyLoss, BCEWithLogitsLoss)", ["split", "stratify"])


def check_batch(spec: TrainSpec, schema: TableSchema, plan: TrainingPlan) -> None:
    """A batch_size the user asked for must fit in the rows the split leaves to train on: a
    batch larger than the training set would silently train full-batch, not as asked.

    Checked where a spec is submitted with its batch_size set (``spec.model_fields_set``); the
    default (32) on a smaller table trains on every row at once, as it always has."""
    field = "split" if spec.split is not None else "validation_split"
    blank_targets = max(_missing_of(_column(schema, name, "target")) for name in plan.targets)
    n_rows = schema.n_rows - blank_targets
    n_train, _, _ = split_sizes(n_rows, spec.validation_share, spec.test_share)
    if n_train >= spec.batch_size:
        return
    held_out = spec.validation_share or spec.test_share
    where = f"{field} leaves {n_train} training row(s) of {n_rows}" if held_out else f"the dataset has {n_rows} row(s)"
    fix = f"set batch_size to at most {n_train}" + (f" or hold out a smaller share in {field}" if held_out else "")
    raise InvalidInput(
        f"{where}, fewer than one batch (batch_size {spec.batch_size}): {fix}",
        errors=[
            {"loc": ["batch_size"], "msg": f"larger than the {n_train} training row(s)"},
            *([{"loc": [field], "msg": f"leaves {n_train} training row(s)"}] if held_out else []),
        ],
    )
