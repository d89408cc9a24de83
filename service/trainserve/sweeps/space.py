"""A sweep's request and its search space: which spec fields vary, over what, and whether
every trial the space can produce is a spec ``POST /train`` would accept.

A search path is a dotted path into the base spec as the API shows it (``optimizer.lr``,
``model.0.out_features``, ``batch_size``), list indices included. The four kinds map onto
Optuna's distributions: ``uniform`` and ``log_uniform`` (floats), ``int_uniform``
(integers, both ends included) and ``choice`` (a list of JSON scalars).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainserve.datasets.tables import TableSchema
from trainserve.errors import InvalidInput
from trainserve.training.spec import MODEL_NAME_PATTERN, Limits, TrainSpec, plan_training, task_of

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

KINDS = ("uniform", "log_uniform", "int_uniform", "choice")
# Fields a trial must share with its sweep: the data it trains on, and how its model is named.
_FIXED = frozenset({"dataset_id", "name"})
# Extremes checked together at submit: all corners up to this many, else each path alone.
_MAX_CORNERS = 256


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str | None = Field(
        default=None,
        description="A metric the trained model reports, e.g. val_accuracy; "
        "default val_loss with a validation split, else train_loss.",
    )
    direction: Literal["minimize", "maximize"] = "minimize"


class Pruner(BaseModel):
    """A pruner of Optuna's by name, with its main knobs (Optuna's defaults otherwise)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "median", "none"] = "none"
    startup_trials: int = Field(default=5, ge=0, description="median: trials to complete before any is pruned")
    warmup_epochs: int = Field(default=0, ge=0, description="median: the first epochs, never pruned")
    min_resource: int | None = Field(default=None, ge=1, description="asha: epochs of the first rung; default auto")
    reduction_factor: int = Field(default=4, ge=2, description="asha: 1/reduction_factor go on at each rung")


class SweepRequest(BaseModel):
    """A hyperparameter search over a base spec."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN, description="A label for the sweep.")
    base: dict[str, Any] = Field(description="A TrainSpec (with dataset_id, or upload the file alongside).")
    search: dict[str, dict[str, Any]] = Field(
        min_length=1,
        max_length=64,
        description='Dotted spec path -> one kind: {"uniform": [lo, hi]}, {"log_uniform": [lo, hi]}, '
        '{"int_uniform": [lo, hi]} or {"choice": [a, b, ...]}.',
    )
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    trials: int = Field(default=10, ge=1)
    parallel: int = Field(default=1, ge=1)
    objective: Objective = Field(default_factory=Objective)
    pruner: Pruner = Field(default_factory=Pruner)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    def metric(self) -> str:
        """The objective's metric, its default resolved against the base spec."""
        if self.objective.metric is not None:
            return self.objective.metric
        return "val_loss" if self.base.get("validation_split", 0) > 0 else "train_loss"

    @field_validator("pruner", mode="before")
    @classmethod
    def _accept_bare_pruner(cls, value: Any) -> Any:
        """Let ``"pruner": "median"`` stand for ``{"type": "median"}``."""
        return {"type": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class Param:
    """One searched path."""

    path: str
    kind: str
    values: tuple[Any, ...]  # (low, high) for ranges, the choices for ``choice``

    def distribution(self) -> BaseDistribution:
        # Imported here: Optuna takes 0.4 s to import, and only a sweep's trials need it.
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.values)
        if self.kind == "int_uniform":
            return IntDistribution(self.values[0], self.values[1])
        return FloatDistribution(self.values[0], self.values[1], log=self.kind == "log_uniform")

    def extremes(self) -> tuple[Any, ...]:
        return self.values

    def grid(self) -> list[Any] | None:
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int_uniform" and self.values[1] - self.values[0] < 10_000:
            return list(range(self.values[0], self.values[1] + 1))
        return None


def _fail(message: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(message, errors=[{"loc": loc, "msg": message}])


def _parts(spec: dict[str, Any], path: str) -> list[str | int]:
    """The path's steps into ``spec``; InvalidInput naming the path if it leads nowhere."""
    loc: list[str | int] = ["body", "search", path]
    node: Any = spec
    parts: list[str | int] = []
    for step in path.split("."):
        if isinstance(node, list) and step.isdigit() and int(step) < len(node):
            parts.append(int(step))
            node = node[int(step)]
        elif isinstance(node, dict) and step in node and step != "type":
            parts.append(step)
            node = node[step]
        else:
            raise _fail(f"search path {path!r} is not a field of the base spec (at {step!r})", loc)
    if isinstance(node, dict | list):
        raise _fail(f"search path {path!r} names a group of fields; name one value inside it", loc)
    if parts[0] in _FIXED:
        raise _fail(f"{parts[0]} is the same for every trial of a sweep; it cannot be searched", loc)
    return parts


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    node: Any = spec
    steps = path.split(".")
    for step in steps[:-1]:
        node = node[int(step)] if isinstance(node, list) else node[step]
    last = steps[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(spec: dict[str, Any], path: str, kind_and_values: dict[str, Any]) -> Param:
    _parts(spec, path)
    loc: list[str | int] = ["body", "search", path]
    if len(kind_and_values) != 1 or next(iter(kind_and_values)) not in KINDS:
        raise _fail(f"search {path!r} must be one of {{{', '.join(KINDS)}: ...}}, e.g. {{'choice': [16, 32]}}", loc)
    kind, values = next(iter(kind_and_values.items()))
    loc = [*loc, kind]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise _fail(f"search {path!r}: choice needs a non-empty list of values", loc)
        if any(v is not None and not isinstance(v, str | bool | int | float) for v in values):
            raise _fail(f"search {path!r}: choices must be numbers, strings, booleans or null", loc)
        if len({repr(v) for v in values}) != len(values):
            raise _fail(f"search {path!r}: a choice is listed twice", loc)
        return Param(path, kind, tuple(values))
    if not isinstance(values, list) or len(values) != 2 or not all(_number(v) for v in values):
        raise _fail(f"search {path!r}: {kind} needs [low, high], two finite numbers", loc)
    low, high = values
    if not low < high:
        raise _fail(f"search {path!r}: {kind} needs low < high, got [{low}, {high}]", loc)
    if kind == "log_uniform" and low <= 0:
        raise _fail(f"search {path!r}: log_uniform needs low > 0 (a logarithm of {low} does not exist)", loc)
    if kind == "int_uniform":
        if not all(isinstance(v, int) for v in values):
            raise _fail(f"search {path!r}: int_uniform needs two integers", loc)
        return Param(path, kind, (int(low), int(high)))
    return Param(path, kind, (float(low), float(high)))


def trial_spec(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base spec with the trial's parameters set at their paths."""
    spec = copy.deepcopy(base)
    for path, value in params.items():
        set_path(spec, path, value)
    return spec


def objective_metrics(base: TrainSpec) -> list[str]:
    """The metrics a model trained from ``base`` reports, which an objective may name."""
    task = task_of(base.loss)
    names = ["loss", "accuracy"] if task != "regression" else ["loss", "mse", "mae", "r2"]
    splits = ["train", "val"] if base.validation_split > 0 else ["train"]
    return [f"{split}_{name}" for split in splits for name in names]


@dataclass(frozen=True)
class Space:
    params: list[Param]

    def distributions(self) -> dict[str, BaseDistribution]:
        return {p.path: p.distribution() for p in self.params}

    def grid(self) -> dict[str, list[Any]] | None:
        grids = {p.path: p.grid() for p in self.params}
        if any(g is None for g in grids.values()):
            return None
        return {k: g for k, g in grids.items() if g is not None}


def check_request(
    request: SweepRequest,
    base: TrainSpec,
    schema: TableSchema,
    limits: Limits,
    *,
    max_trials: int,
    max_parallel: int,
) -> Space:
    """Every check of a sweep that needs no database: InvalidInput naming the field."""
    if request.trials > max_trials:
        raise _fail(
            f"trials is {request.trials}, the limit is {max_trials} (TRAINSERVE_MAX_SWEEP_TRIALS)", ["body", "trials"]
        )
    if request.parallel > max_parallel:
        raise _fail(
            f"parallel is {request.parallel}, the limit is {max_parallel} (TRAINSERVE_MAX_SWEEP_PARALLEL)",
            ["body", "parallel"],
        )
    metrics = objective_metrics(base)
    if request.metric() not in metrics:
        hint = "" if base.validation_split > 0 else "; val_ metrics need a validation_split > 0 in the base spec"
        raise _fail(
            f"objective metric {request.metric()!r} is not one this spec's model reports "
            f"(it reports {', '.join(metrics)}{hint})",
            ["body", "objective", "metric"],
        )
    spec = base.model_dump(mode="json")
    space = Space([parse_param(spec, path, kinds) for path, kinds in request.search.items()])
    if request.sampler == "grid":
        grid = space.grid()
        if grid is None:
            raise _fail("the grid sampler needs choice or int_uniform for every path", ["body", "sampler"])
        size = math.prod(len(values) for values in grid.values())
        if size != request.trials:
            raise _fail(
                f"the grid has {size} points and trials is {request.trials}: set trials to {size} "
                "to try each point once",
                ["body", "trials"],
            )
    _check_extremes(space, spec, schema, limits)
    return space


def _check_extremes(space: Space, spec: dict[str, Any], schema: TableSchema, limits: Limits) -> None:
    """Validate the trial specs at the space's extremes (every corner, or each path's ends
    alone when there are too many corners) exactly as POST /train would."""
    extremes = [[(p.path, v) for v in p.extremes()] for p in space.params]
    if math.prod(len(e) for e in extremes) <= _MAX_CORNERS:
        combinations: Any = itertools.product(*extremes)
    else:
        combinations = ([one] for each in extremes for one in each)
    for combination in combinations:
        params = dict(combination)
        candidate = trial_spec(spec, params)
        try:
            plan_training(TrainSpec.model_validate(candidate), schema, limits)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            path = next((p for p in params if where.startswith(p) or p.startswith(where)), next(iter(params)))
            raise _fail(
                f"search {path!r}: at {_show(params)} the spec is invalid: {where}: {first['msg']}",
                [
                    "body",
                    "search",
                    path,
                ],
            ) from None
        except InvalidInput as exc:
            where = ".".join(str(p) for p in exc.errors[0]["loc"]) if exc.errors else ""
            path = next((p for p in params if p == where or where.startswith(p) or p.startswith(where)), None)
            path = path or next(iter(params))
            raise _fail(
                f"search {path!r}: at {_show(params)} the spec is invalid: {exc.detail}",
                [
                    "body",
                    "search",
                    path,
                ],
            ) from None


def _show(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def space_of(request: SweepRequest) -> Space:
    """The space of a stored sweep (its base spec is stored complete, as validated)."""
    return Space([parse_param(request.base, path, kinds) for path, kinds in request.search.items()])
