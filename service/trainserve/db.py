"""Relational storage: SQLAlchemy 2.0 tables, engine and session factory; Alembic owns the schema.

The ORM classes end in ``Record`` so that ``ModelRecord`` (a trained ML model's metadata)
is never mistaken for a pydantic model or an ``nn.Module``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Executable

from trainserve.jobs.status import JobStatus

log = logging.getLogger(__name__)

# Stable constraint names, so that Alembic migrations name the same things on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    filename: Mapped[str | None] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    n_rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[Any]]
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # of the bytes the user uploaded
    file_sha256: Mapped[str] = mapped_column(String(64))  # of the parsed table on disk
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Stored as its string value in a VARCHAR(16): no database enum type to migrate when a status is added.
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, create_constraint=False, length=16, values_callable=_values), index=True
    )
    spec: Mapped[dict[str, Any]]
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    model_id: Mapped[str | None] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_metrics: Mapped[dict[str, Any] | None]
    history: Mapped[list[Any]] = mapped_column(default=list)
    device: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    # The claiming worker renews this lease while it trains; a job whose lease lapsed is
    # re-queued by the rescuer (its worker died) until ``attempts`` reaches the limit.
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    heartbeat_at: Mapped[datetime | None]
    checkpoint_epoch: Mapped[int | None] = mapped_column(Integer)  # last epoch saved for resuming
    name: Mapped[str | None] = mapped_column(String(128), index=True)  # the spec's model name
    notes: Mapped[list[Any]] = mapped_column(default=list)  # how it ran: compiled or eager, resumed, ...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelRecord(Base):
    """Metadata of a trained ML model; its weights live in the store."""

    __tablename__ = "trained_models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Successful jobs under one name make versions 1, 2, ... of that model.
    name: Mapped[str | None] = mapped_column(String(128), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    dataset_id: Mapped[str | None] = mapped_column(String(32))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]]
    task: Mapped[str] = mapped_column(String(16))
    features: Mapped[list[Any]]
    targets: Mapped[list[Any]]
    classes: Mapped[list[Any] | None]
    input_mean: Mapped[list[Any] | None]
    input_std: Mapped[list[Any] | None]
    metrics: Mapped[dict[str, Any]]
    n_parameters: Mapped[int] = mapped_column(Integer)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_bytes: Mapped[int] = mapped_column(Integer)
    torch_version: Mapped[str] = mapped_column(String(32))
    code_version: Mapped[str | None] = mapped_column(String(64))  # trainserve's version that trained it
    notes: Mapped[list[Any]] = mapped_column(default=list)
    device: Mapped[str] = mapped_column(String(32))
    train_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The model a warm start (``init_from``) began from; no foreign key: a parent may be
    # deleted while its children live on, and the chain then ends there.
    parent_model_id: Mapped[str | None] = mapped_column(String(32), index=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits out short write locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker:  # type: ignore[type-arg]
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "after_commit", _run_after_commit)
    event.listen(factory, "after_rollback", _run_after_rollback)
    return factory


def rows_changed(session: Session, statement: Executable) -> int:
    """Execute an UPDATE/DELETE and say how many rows it touched (for compare-and-set changes)."""
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount


def on_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the session's transaction commits; never if it rolls back.

    For side effects outside the database (enqueueing, deleting files) that must not
    happen for a transaction that did not.
    """
    session.info.setdefault("on_commit", []).append(action)


def on_rollback(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` if the session's transaction rolls back (undo a file it wrote)."""
    session.info.setdefault("on_rollback", []).append(action)


def _run_all(actions: list[Callable[[], None]]) -> None:
    # The transaction has already ended: one failing action must not skip the others,
    # nor surface as an error of a request whose data is safely committed.
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("action after the transaction ended failed")


def _run_after_commit(session: Session) -> None:
    session.info.pop("on_rollback", None)
    _run_all(session.info.pop("on_commit", []))


def _run_after_rollback(session: Session) -> None:
    session.info.pop("on_commit", None)
    _run_all(session.info.pop("on_rollback", []))


def migrations_dir() -> str:
    """Alembic's scripts: the top-level migrations/ folder, shipped in the wheel as ``trainserve.migrations``."""
    return str(resources.files("trainserve.migrations"))


def upgrade_to_head(url: str) -> None:
    """Bring the schema to the newest migration (what the app does at start)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", migrations_dir())
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


class ModelAliasRecord(Base):
    """A movable pointer from a model name to one of its versions (``moons@production``)."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelAliasEventRecord(Base):
    """One move of an alias (set, moved, or removed: ``to_version`` null), for the audit trail."""

    __tablename__ = "model_alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    alias: Mapped[str] = mapped_column(String(32))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    who: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PredictionLogRecord(Base):
    """A sampled /predict request and its answer, kept for a bounded time and count."""

    __tablename__ = "prediction_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    inputs: Mapped[list[Any]]
    outputs: Mapped[list[Any]]
    # A request answered by a name with a ``shadow`` alias is logged twice under one
    # request_id: the answer it got (role "primary") and the shadow version's ("shadow").
    request_id: Mapped[str | None] = mapped_column(String(32), index=True)
    role: Mapped[str | None] = mapped_column(String(8))


class WorkerRecord(Base):
    """A worker process and the devices it can train on, renewed while it runs: the API
    refuses a job for a device no live worker has (``trainserve.jobs.workers``)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid, as jobs.worker records it
    devices: Mapped[list[Any]]  # ["cpu", "cuda:0", ...]
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
