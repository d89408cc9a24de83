"""The same Alembic migrations on SQLite and on a real PostgreSQL server: up, down, up again,
and the result matches the ORM tables exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from tests.backends import postgres_database
from trainserve.db import Base, make_engine, migrations_dir


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
    else:
        with postgres_database() as url:
            yield url


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", migrations_dir())
    config.set_main_option("sqlalchemy.url", url)
    return config


def columns(url: str, table: str) -> set[str]:
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        return {c["name"] for c in inspector.get_columns(table)} if inspector.has_table(table) else set()
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_match_the_orm(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0001")
    assert "id" in columns(database_url, "jobs")
    assert "lease_expires_at" not in columns(database_url, "jobs")
    command.upgrade(config, "0002")
    assert {"lease_expires_at", "heartbeat_at", "checkpoint_epoch", "name", "notes"} <= columns(database_url, "jobs")
    assert {"name", "version", "code_version", "notes"} <= columns(database_url, "trained_models")
    command.upgrade(config, "0003")
    assert {"name", "alias", "version", "note", "updated_at"} <= columns(database_url, "model_aliases")
    assert {"from_version", "to_version", "note", "who"} <= columns(database_url, "model_alias_events")
    assert {"model_id", "version", "created_at", "inputs", "outputs"} <= columns(database_url, "prediction_log")
    assert "parent_model_id" in columns(database_url, "trained_models")
    command.downgrade(config, "0002")
    assert columns(database_url, "model_aliases") == set()
    assert columns(database_url, "prediction_log") == set()
    assert "parent_model_id" not in columns(database_url, "trained_models")
    command.upgrade(config, "0003")
    command.downgrade(config, "0002")
    command.downgrade(config, "0001")
    assert "lease_expires_at" not in columns(database_url, "jobs")
    assert "version" not in columns(database_url, "trained_models")
    command.downgrade(config, "base")
    assert columns(database_url, "jobs") == set()
    command.upgrade(config, "head")

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_the_workers_table_goes_up_down_and_up(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0004")
    assert columns(database_url, "workers") == {"name", "devices", "heartbeat_at", "started_at"}
    command.downgrade(config, "0003")
    assert columns(database_url, "workers") == set()
    assert "lease_expires_at" in columns(database_url, "jobs")  # 0003 and before untouched
    command.upgrade(config, "0004")
    assert columns(database_url, "workers") == {"name", "devices", "heartbeat_at", "started_at"}
