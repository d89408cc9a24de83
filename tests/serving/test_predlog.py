"""The prediction log on a real SQLite database: sampled, never blocking the caller (a full
buffer drops and counts), written in the background, pruned by count and by age."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import event, func, select, text, update

from trainserve.db import PredictionLogRecord, make_engine, make_session_factory, upgrade_to_head, utcnow
from trainserve.serving.predlog import LogSettings, PredictionLog, recent


def _log(tmp_path: Path, **changes: float) -> PredictionLog:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    upgrade_to_head(url)
    settings = {"sample": 1.0, "buffer": 100, "max_rows": 1000, "max_age_s": 3600.0, "prune_interval_s": 3600.0}
    return PredictionLog(make_session_factory(make_engine(url)), LogSettings(**{**settings, **changes}))  # type: ignore[arg-type]


def _offer(log: PredictionLog, model_id: str, value: float) -> None:
    x = np.full((2, 2), value, dtype=np.float32)
    log.offer(model_id, "m", 1, x, np.array([0, 1]))


def test_entries_are_written_in_the_background_and_pruned_by_count_and_age(tmp_path: Path) -> None:
    log = _log(tmp_path, max_rows=3)
    for i in range(5):
        _offer(log, "a" * 32, float(i))
    _offer(log, "b" * 32, 9.0)
    log.flush()
    assert log.written == 6
    with log.sessions() as session:
        assert [e.inputs[0][0] for e in recent(session, "a" * 32, 10)] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert log.prune() == 2  # model a keeps its newest 3; b is under the limit
    with log.sessions.begin() as session:
        assert [e.inputs[0][0] for e in recent(session, "a" * 32, 10)] == [4.0, 3.0, 2.0]
        session.execute(update(PredictionLogRecord).values(created_at=utcnow() - timedelta(hours=2)))
    assert log.prune() == 4  # older than max_age_s
    log.close()


def test_a_full_buffer_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    log = _log(tmp_path, buffer=2)
    _offer(log, "a" * 32, 0.0)
    log.flush()
    blocker = make_engine(f"sqlite:///{tmp_path / 'log.db'}").connect()
    blocker.execute(text("BEGIN IMMEDIATE"))  # holds the write lock: the log's writer waits
    try:
        started = time.perf_counter()
        for i in range(50):
            _offer(log, "a" * 32, float(i))
        offered_for = time.perf_counter() - started
        assert log.dropped >= 45  # one in the writer's hands, two in the buffer, the rest dropped
    finally:
        blocker.execute(text("ROLLBACK"))
        blocker.close()
    log.flush()
    with log.sessions() as session:
        total = session.scalar(select(func.count()).select_from(PredictionLogRecord))
    assert total == 1 + 50 - log.dropped
    assert offered_for < 5  # never waited for the lock (busy_timeout is 10 s)
    log.close()


def test_a_zero_share_logs_nothing(tmp_path: Path) -> None:
    log = _log(tmp_path, sample=0.0)
    _offer(log, "a" * 32, 0.0)
    log.flush()
    assert log.written == 0
    assert log._thread is None  # no thread either


def test_blank_inputs_are_logged_as_null_on_postgresql_and_read_back_as_missing() -> None:
    # A preprocessed model's raw layout holds NaN for a blank; PostgreSQL's json type
    # refuses the NaN token, so the log writes null (and drift reads it back as NaN).
    from tests.backends import postgres_database
    from trainserve.serving.monitoring import logged_rows

    with postgres_database() as url:
        upgrade_to_head(url)
        engine = make_engine(url)
        settings = LogSettings(sample=1.0, buffer=10, max_rows=100, max_age_s=3600.0, prune_interval_s=3600.0)
        log = PredictionLog(make_session_factory(engine), settings)
        log.offer("c" * 32, "m", 1, np.array([[1.0, np.nan], [np.nan, 2.0]], dtype=np.float32), np.array([0, 1]))
        log.flush()
        assert (log.written, log.dropped) == (1, 0)
        with log.sessions() as session:
            assert recent(session, "c" * 32, 1)[0].inputs == [[1.0, None], [None, 2.0]]
            rows = logged_rows(session, "c" * 32, 10)
        np.testing.assert_array_equal(rows, [[1.0, np.nan], [np.nan, 2.0]])
        log.close()
        engine.dispose()


def test_entries_offered_together_are_written_by_one_insert(tmp_path: Path) -> None:
    # What keeps the log cheap for the API process that runs it: one executemany INSERT in
    # one transaction per batch, not one per entry (bench/predlog_writer.py).
    log = _log(tmp_path)
    inserts: list[str] = []
    event.listen(
        log.sessions.kw["bind"],
        "before_cursor_execute",
        lambda *args: inserts.append(args[2]) if args[2].lstrip().upper().startswith("INSERT") else None,
    )
    for i in range(20):  # well within the writer's wait for more
        _offer(log, "a" * 32, float(i))
    log.flush()
    assert log.written == 20
    assert len(inserts) == 1
    with log.sessions() as session:
        assert [e.inputs[0][0] for e in recent(session, "a" * 32, 3)] == [19.0, 18.0, 17.0]  # order kept
    log.close()
