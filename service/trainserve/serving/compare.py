"""Models side by side: the spec fields that differ (only those), every metric, the loss curves."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from trainserve.db import JobRecord, ModelRecord
from trainserve.errors import InvalidInput, NotFound

MAX_COMPARED = 100
_MISSING = object()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A spec as dotted path -> scalar (``optimizer.lr``, ``model.0.out_features``)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        out = {}
        for index, inner in enumerate(value):
            out.update(flatten(inner, f"{prefix}{index}."))
        return out
    return {prefix[:-1]: value}


def _path_order(path: str) -> list[tuple[int, int, str]]:
    return [(0, int(step), "") if step.isdigit() else (1, 0, step) for step in path.split(".")]


def differences(specs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    flat = [flatten(spec) for spec in specs]
    paths = sorted(
        {path for f in flat for path in f}, key=lambda p: [(0, int(s)) if s.isdigit() else (1, s) for s in p.split(".")]
    )
    out: dict[str, list[Any]] = {}
    for path in paths:
        values = [f.get(path, _MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[path] = [None if v is _MISSING else v for v in values]
    return out


def compare(session: Session, model_ids: list[str], *, at_least: int = 2) -> dict[str, Any]:
    """The models named, in the order given; NotFound naming the first unknown id."""
    if len(model_ids) < at_least:
        raise InvalidInput("name at least two models: ids=a,b", errors=[{"loc": ["query", "ids"], "msg": "too few"}])
    if len(model_ids) > MAX_COMPARED:
        raise InvalidInput(
            f"at most {MAX_COMPARED} models at once", errors=[{"loc": ["query", "ids"], "msg": "too many"}]
        )
    found = {m.id: m for m in session.scalars(select(ModelRecord).where(ModelRecord.id.in_(model_ids)))}
    for model_id in model_ids:
        if model_id not in found:
            raise NotFound(f"model {model_id!r} does not exist")
    models = [found[i] for i in model_ids]
    histories: dict[str, list[Any]] = dict(
        session.execute(select(JobRecord.id, JobRecord.history).where(JobRecord.id.in_([m.job_id for m in models])))
        .tuples()
        .all()
    )
    names = sorted({key for m in models for key in m.metrics})
    return {
        "models": [
            {
                "id": m.id,
                "name": m.name,
                "version": m.version,
                "job_id": m.job_id,
                "metrics": m.metrics,
                "history": histories.get(m.job_id) or [],
            }
            for m in models
        ],
        "differences": differences([m.spec for m in models]),
        "metrics": {name: [m.metrics.get(name) for m in models] for name in names},
    }
