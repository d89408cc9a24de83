"""Shadow versions: a ``shadow`` alias on a name makes the name's logged requests also go
to that version, after they were answered and off their path (serving/predlog.py runs it
on the log's thread), and both answers are logged under one request id. Here: finding the
shadow from the log's thread, and the agreement report over the logged pairs."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import desc, select
from sqlalchemy.orm import Session, sessionmaker

from trainserve.db import ModelRecord, PredictionLogRecord
from trainserve.errors import NotFound
from trainserve.serving import aliases
from trainserve.serving.predictor import ModelCache, Predictor

SHADOW_ALIAS = "shadow"


class ShadowResolver:
    """name -> the predictor of its ``shadow`` alias's version, or None; re-read from the
    database once ``revalidate_s`` old (it is called off the request path)."""

    def __init__(self, sessions: sessionmaker, models: ModelCache, revalidate_s: float) -> None:  # type: ignore[type-arg]
        self.sessions, self.models, self.revalidate_s = sessions, models, revalidate_s
        self._ids: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> Predictor | None:
        entry = self._ids.get(name)
        if entry is not None and time.monotonic() - entry[1] <= self.revalidate_s:
            if entry[0] is None:
                return None
            cached = self.models.cached(entry[0])
            if cached is not None:
                return cached
        with self.sessions() as session:
            record = _shadow_record(session, name)
            predictor = None if record is None else self.models.get(record)
        with self._lock:
            if len(self._ids) > 4096:
                self._ids.clear()
            self._ids[name] = (None if record is None else record.id, time.monotonic())
        return predictor


def _shadow_record(session: Session, name: str) -> ModelRecord | None:
    pointer = aliases.get_alias(session, name, SHADOW_ALIAS)
    return None if pointer is None else aliases.version_record(session, name, pointer.version)


@dataclass(frozen=True)
class Agreement:
    name: str
    shadow_model_id: str
    shadow_version: int
    pairs: int  # logged requests answered by both
    rows: int
    label_agreement: float | None  # classifiers: share of rows with the same label
    mean_abs_difference: float | None  # regressions: mean |primary - shadow| over values


def agreement(session: Session, name: str, window: int) -> Agreement:
    """How the shadow's answers compare with the answers given, over the newest ``window``
    logged pairs answered by the current shadow version."""
    record = _shadow_record(session, name)
    if record is None:
        raise NotFound(f"model {name!r} has no {SHADOW_ALIAS!r} alias")
    shadows = list(
        session.scalars(
            select(PredictionLogRecord)
            .where(PredictionLogRecord.model_id == record.id, PredictionLogRecord.role == "shadow")
            .order_by(desc(PredictionLogRecord.id))
            .limit(window)
        )
    )
    request_ids = [s.request_id for s in shadows if s.request_id]
    primaries: dict[str, PredictionLogRecord] = {}
    for chunk in range(0, len(request_ids), 500):
        query = select(PredictionLogRecord).where(
            PredictionLogRecord.request_id.in_(request_ids[chunk : chunk + 500]),
            PredictionLogRecord.role == "primary",
        )
        primaries.update({p.request_id: p for p in session.scalars(query) if p.request_id})
    given: list[Any] = []
    shadowed: list[Any] = []
    pairs = 0
    for shadow in shadows:
        primary = primaries.get(shadow.request_id or "")
        if primary is None or len(primary.outputs) != len(shadow.outputs):
            continue
        pairs += 1
        given.extend(primary.outputs)
        shadowed.extend(shadow.outputs)
    labels = mad = None
    if given:
        if record.task == "regression":
            a, b = np.asarray(given, dtype=np.float64), np.asarray(shadowed, dtype=np.float64)
            mad = float(np.abs(a - b).mean())
        else:
            labels = float(np.mean([x == y for x, y in zip(given, shadowed, strict=True)]))
    return Agreement(name, record.id, record.version or 0, pairs, len(given), labels, mad)
