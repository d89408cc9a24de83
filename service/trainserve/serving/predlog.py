"""The prediction log: a sampled share of /predict requests, written off the request's path.

The request path pays for one random draw and, for a sampled request, one ``put_nowait``
on a bounded queue; a background thread turns the arrays into JSON rows and writes them in
batches. When the database falls behind and the queue is full, entries are dropped and
counted (``dropped``), never waited for. Retention is by age and by count per model,
enforced by the same thread every ``prune_interval_s``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, desc, insert, select
from sqlalchemy.orm import Session, sessionmaker

from trainserve.db import PredictionLogRecord, rows_changed, utcnow
from trainserve.serving.predictor import Predictor
from trainserve.storage.base import new_id

log = logging.getLogger(__name__)

# A logged request keeps at most this many of its rows: a 100,000-row batch would make one
# JSON value of megabytes, and drift needs many requests more than many rows of one.
MAX_ROWS_PER_ENTRY = 100
_BATCH = 256
# After the first entry of a batch, the writer waits this long for more: one transaction per
# batch instead of per entry took the log's CPU per entry (with a shadow) from 0.32 ms to
# 0.06 ms at 64 entries a batch (bench/predlog_writer.py), CPU that a busy API process
# takes from requests. Entries reach the database up to this much later.
_LINGER_S = 0.5
# Inserted through Core, one executemany per batch: the ORM's bulk insert ran one statement
# per row here (2.6x the CPU per entry with a shadow, measured).
_TABLE = PredictionLogRecord.metadata.tables[PredictionLogRecord.__tablename__]


@dataclass(frozen=True)
class _Entry:
    model_id: str
    name: str | None
    version: int | None
    x: np.ndarray
    predictions: np.ndarray
    at: float  # time.time() when answered
    by_name: bool  # the request named the model by name: its name's shadow answers it too


# name -> the shadow version's predictor, or None; called on the log's own thread.
ShadowLookup = Callable[[str], Predictor | None]


@dataclass(frozen=True)
class LogSettings:
    sample: float
    buffer: int
    max_rows: int
    max_age_s: float
    prune_interval_s: float


class PredictionLog:
    """Sample, buffer and write predictions; one per API process."""

    def __init__(
        self,
        sessions: sessionmaker,  # type: ignore[type-arg]
        settings: LogSettings,
        shadow: ShadowLookup | None = None,
    ) -> None:
        self.sessions, self.settings, self.shadow = sessions, settings, shadow
        self.shadow_failures = 0
        self.sample = settings.sample
        self.dropped = 0  # sampled but the buffer was full
        self.written = 0
        self._queue: queue.Queue[_Entry | None] = queue.Queue(maxsize=settings.buffer)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._next_prune = time.monotonic() + settings.prune_interval_s
        self._random = random.random
        # How many flush() calls are waiting: while any is, write what there is, do not linger.
        # A count, not an Event: the first of two flushes to finish must not clear it for the other.
        self._flushing = 0
        self._flushing_lock = threading.Lock()

    def offer(
        self,
        model_id: str,
        name: str | None,
        version: int | None,
        x: np.ndarray,
        predictions: Any,
        *,
        by_name: bool = False,
    ) -> None:
        """Maybe log this answer (with probability ``sample``); never blocks. ``by_name``: the
        request named the model by name, so a ``shadow`` alias on the name answers it too
        (on the log's thread, after the answer went out) and both answers are logged."""
        if self.sample <= 0 or self._random() >= self.sample:
            return
        if self._thread is None:
            self._start()
        rows = slice(0, MAX_ROWS_PER_ENTRY)
        entry = _Entry(model_id, name, version, x[rows], predictions[rows], time.time(), by_name and name is not None)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every entry queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._flushing_lock:
            self._flushing += 1
        try:
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            with self._flushing_lock:
                self._flushing -= 1

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def _next_batch(self) -> list[_Entry | None]:
        """The first entry to come, and what follows within ``_LINGER_S`` (up to ``_BATCH``);
        a ``None`` (close) or a waiting ``flush()`` ends the wait."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + _LINGER_S
        while len(batch) < _BATCH and batch[-1] is not None:
            try:
                if self._flushing:
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            stop = any(entry is None for entry in batch)
            entries = [entry for entry in batch if entry is not None]
            try:
                if entries:
                    self._write(entries)
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + self.settings.prune_interval_s
                    self.prune()
            except Exception:  # the log must never take the API down; the entries are lost
                log.exception("writing %d prediction log entries failed", len(entries))
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _write(self, entries: list[_Entry]) -> None:
        # Plain dicts through one executemany INSERT (see _TABLE); nothing reads them back here.
        rows: list[dict[str, Any]] = []
        now, wall = utcnow(), time.time()
        for e in entries:
            at = now - timedelta(seconds=max(0.0, wall - e.at))
            shadow = self._shadow_of(e)
            request_id = new_id() if shadow is not None else None
            inputs = _json_rows(e.x)
            row = {"model_id": e.model_id, "name": e.name, "version": e.version, "created_at": at, "inputs": inputs}
            rows.append(
                {
                    **row,
                    "outputs": e.predictions.tolist(),
                    "request_id": request_id,
                    "role": "primary" if shadow is not None else None,
                }
            )
            if shadow is not None:
                predictor, answer = shadow
                rows.append(
                    {
                        **row,
                        "model_id": predictor.model_id,
                        "name": predictor.name,
                        "version": predictor.version,
                        "outputs": answer.tolist(),
                        "request_id": request_id,
                        "role": "shadow",
                    }
                )
        with self.sessions.begin() as session:
            session.connection().execute(insert(_TABLE), rows)
        self.written += len(rows)

    def _shadow_of(self, entry: _Entry) -> tuple[Predictor, np.ndarray] | None:
        """The shadow version and its answer to the entry's rows, if its name has one."""
        if not entry.by_name or self.shadow is None or entry.name is None:
            return None
        try:
            predictor = self.shadow(entry.name)
            if predictor is None or predictor.model_id == entry.model_id:
                return None
            return predictor, predictor.infer(entry.x).predictions
        except Exception:  # a shadow that cannot answer must not cost the primary's log entry
            self.shadow_failures += 1
            log.warning("the shadow of %r could not answer a logged request", entry.name, exc_info=True)
            return None

    def prune(self) -> int:
        """Delete entries older than the age limit, and each model's beyond its newest ``max_rows``."""
        cutoff = utcnow() - timedelta(seconds=self.settings.max_age_s)
        removed = 0
        with self.sessions.begin() as session:
            removed += rows_changed(session, delete(PredictionLogRecord).where(PredictionLogRecord.created_at < cutoff))
            for model_id in list(session.scalars(select(PredictionLogRecord.model_id).distinct())):
                oldest_kept = session.scalar(
                    select(PredictionLogRecord.id)
                    .where(PredictionLogRecord.model_id == model_id)
                    .order_by(desc(PredictionLogRecord.id))
                    .offset(self.settings.max_rows - 1)
                    .limit(1)
                )
                if oldest_kept is not None:
                    removed += rows_changed(
                        session,
                        delete(PredictionLogRecord).where(
                            PredictionLogRecord.model_id == model_id, PredictionLogRecord.id < oldest_kept
                        ),
                    )
        return removed


def recent(session: Session, model_id: str, limit: int) -> list[PredictionLogRecord]:
    """A model's logged predictions, newest first."""
    query = (
        select(PredictionLogRecord)
        .where(PredictionLogRecord.model_id == model_id)
        .order_by(desc(PredictionLogRecord.id))
        .limit(limit)
    )
    return list(session.scalars(query))


def _json_rows(x: np.ndarray) -> list[Any]:
    """Rows as JSON can hold them: a blank (NaN in a preprocessed model's raw layout) as
    null, since PostgreSQL's json type refuses the NaN token (numpy reads null back as NaN)."""
    blank = np.isnan(x) if x.dtype.kind == "f" else None
    if blank is None or not blank.any():
        rows: list[Any] = x.tolist()
        return rows
    cells = x.astype(object)
    cells[blank] = None
    return list(cells.tolist())
