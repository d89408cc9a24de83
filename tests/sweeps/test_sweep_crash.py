"""kill -9 of the whole server mid-sweep, then a restart: the sweep goes on from its rows
in the database to exactly ``trials`` trials, none counted twice."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import func, select

from tests.conftest import start_server
from tests.faults import FAST_LEASE, power_cut, slow_spec
from trainserve.client import TrainserveClient
from trainserve.db import JobRecord, TrialRecord, make_engine, make_session_factory


def test_a_sweep_killed_mid_way_finishes_after_a_restart_with_exactly_its_trials(
    tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, env=FAST_LEASE)
    try:
        with TrainserveClient(server.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            sweep = ts.create_sweep(
                {
                    # Each trial trains a second or more (the eager loop, batch 1): the kill lands mid-trial.
                    "base": slow_spec(dataset.id, epochs=15, validation_split=0.25),
                    "search": {"optimizer.lr": {"log_uniform": [0.001, 0.1]}},
                    "sampler": "tpe",
                    "trials": 4,
                    "parallel": 2,
                }
            )
            deadline = time.monotonic() + 120
            while True:  # one trial done, others queued or running
                states = [t.state for t in ts.get_sweep(sweep.id).trials]
                if states.count("complete") >= 1 and "running" in states:
                    break
                assert time.monotonic() < deadline, states
                time.sleep(0.05)
    finally:
        power_cut(server)

    server = start_server(data_dir, env=FAST_LEASE)
    try:
        with TrainserveClient(server.url, timeout=60) as ts:
            done = ts.wait_sweep(sweep.id, timeout=180)
    finally:
        power_cut(server)
    assert done.status == "succeeded"
    assert [t.number for t in done.trials] == [0, 1, 2, 3]
    assert [t.state for t in done.trials] == ["complete"] * 4
    assert len({t.job_id for t in done.trials}) == 4
    assert done.best is not None
    assert done.best.value == min(t.value for t in done.trials if t.value is not None)
    # Exactly one job per trial, and nothing beyond the four.
    engine = make_engine(f"sqlite:///{data_dir / 'trainserve.db'}")
    try:
        with make_session_factory(engine)() as session:
            jobs = session.scalar(select(func.count()).where(JobRecord.sweep_id == sweep.id))
            trials = session.scalar(select(func.count()).where(TrialRecord.sweep_id == sweep.id))
            resumed = session.scalars(select(JobRecord.notes).where(JobRecord.sweep_id == sweep.id)).all()
    finally:
        engine.dispose()
    assert jobs == trials == 4
    assert any("re-queued" in note for notes in resumed for note in notes)  # a trial's worker died with the server
