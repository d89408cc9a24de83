"""Model aliases: movable names for one version of a model (``moons@production``), with history.

A name that has a ``production`` alias answers name-only requests from that version; a
name without one answers from its newest version. Moving an alias is one transaction
(the alias row and its history event together), and other API processes see it within
their name cache's revalidation interval (``NameCache`` in serving/predictor.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from trainserve.db import ModelAliasEventRecord, ModelAliasRecord, ModelRecord, rows_changed, utcnow
from trainserve.errors import Conflict, InvalidInput, NotFound
from trainserve.training.spec import MODEL_NAME_PATTERN

ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
_ALIAS = re.compile(ALIAS_PATTERN)
_NAME = re.compile(MODEL_NAME_PATTERN)
# The alias that name-only requests follow.
DEFAULT_ALIAS = "production"
NOTE_LIMIT = 1000


def check_alias(alias: str, loc: list[str | int] | None = None) -> str:
    if not _ALIAS.fullmatch(alias):
        msg = (
            f"alias {alias[:40]!r} is not a valid alias: lowercase letters, digits, '_' and '-', "
            "starting with a letter, at most 32 characters"
        )
        raise InvalidInput(msg, errors=[{"loc": loc or ["path", "alias"], "msg": msg}])
    return alias


def check_name(name: str, loc: list[str | int] | None = None) -> str:
    if not _NAME.fullmatch(name):
        msg = f"{name[:70]!r} is not a model name"
        raise InvalidInput(msg, errors=[{"loc": loc or ["path", "name"], "msg": msg}])
    return name


def _versions_query(name: str) -> Select[ModelRecord]:
    return select(ModelRecord).where(ModelRecord.name == name, ModelRecord.version.is_not(None))


def version_record(session: Session, name: str, version: int) -> ModelRecord | None:
    return session.scalar(_versions_query(name).where(ModelRecord.version == version))


def newest(session: Session, name: str) -> ModelRecord | None:
    return session.scalar(_versions_query(name).order_by(ModelRecord.version.desc()).limit(1))


def get_alias(session: Session, name: str, alias: str) -> ModelAliasRecord | None:
    return session.get(ModelAliasRecord, (name, alias))


def resolve(session: Session, name: str, *, alias: str | None = None, version: int | None = None) -> ModelRecord:
    """The model ``name`` (+ ``version`` or ``alias``) stands for: the version, the alias's
    version, else the ``production`` alias's, else the newest."""
    if version is not None:
        record = version_record(session, name, version)
        if record is None:
            raise NotFound(f"model {name!r} has no version {version}")
        return record
    pointer = get_alias(session, name, alias or DEFAULT_ALIAS)
    if pointer is None:
        if alias is not None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        record = newest(session, name)
        if record is None:
            raise NotFound(f"no model is named {name!r}")
        return record
    record = version_record(session, name, pointer.version)
    if record is None:  # cannot happen while deletes refuse aliased versions; say so if it does
        raise NotFound(f"alias {name}@{pointer.alias} points to version {pointer.version}, which is gone")
    return record


def set_alias(
    session: Session, name: str, alias: str, version: int, *, note: str | None = None, who: str | None = None
) -> ModelAliasRecord:
    """Point ``name@alias`` at ``version`` (creating it), and record the move."""
    check_name(name)
    check_alias(alias)
    if version_record(session, name, version) is None:
        if newest(session, name) is None:
            raise NotFound(f"no model is named {name!r}")
        msg = f"model {name!r} has no version {version}"
        raise InvalidInput(msg, errors=[{"loc": ["body", "version"], "msg": msg}])
    now = utcnow()
    current = get_alias(session, name, alias)
    if current is None:
        current = ModelAliasRecord(name=name, alias=alias, version=version, note=note, updated_at=now)
        session.add(current)
        previous = None
    else:
        previous = current.version
        # Compare-and-set: two moves racing on one alias both record what they replaced.
        moved = rows_changed(
            session,
            update(ModelAliasRecord)
            .where(
                ModelAliasRecord.name == name,
                ModelAliasRecord.alias == alias,
                ModelAliasRecord.version == previous,
            )
            .values(version=version, note=note, updated_at=now),
        )
        if not moved:
            raise Conflict(f"alias {name}@{alias} was moved by another request just now; try again")
        session.refresh(current)
    session.add(
        ModelAliasEventRecord(
            name=name, alias=alias, from_version=previous, to_version=version, note=note, who=who, created_at=now
        )
    )
    session.flush()  # a concurrent first PUT of the same alias fails here (primary key)
    return current


def delete_alias(session: Session, name: str, alias: str, *, note: str | None = None, who: str | None = None) -> None:
    check_name(name)
    check_alias(alias)
    current = get_alias(session, name, alias)
    if current is None:
        raise NotFound(f"model {name!r} has no alias {alias!r}")
    session.add(
        ModelAliasEventRecord(name=name, alias=alias, from_version=current.version, to_version=None, note=note, who=who)
    )
    session.delete(current)
    session.flush()


def aliases_of(session: Session, name: str) -> list[ModelAliasRecord]:
    query = select(ModelAliasRecord).where(ModelAliasRecord.name == name).order_by(ModelAliasRecord.alias)
    return list(session.scalars(query))


def history(session: Session, name: str, limit: int = 200) -> list[ModelAliasEventRecord]:
    query = (
        select(ModelAliasEventRecord)
        .where(ModelAliasEventRecord.name == name)
        .order_by(ModelAliasEventRecord.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def pointing_at(session: Session, record: ModelRecord) -> list[str]:
    """The aliases that point at this model version (it may not be deleted while any does)."""
    if record.name is None or record.version is None:
        return []
    query = select(ModelAliasRecord.alias).where(
        ModelAliasRecord.name == record.name, ModelAliasRecord.version == record.version
    )
    return sorted(session.scalars(query))


@dataclass(frozen=True)
class Reference:
    """A model as people name it: an id, ``name``, ``name:3`` or ``name@alias``."""

    model_id: str | None = None
    name: str | None = None
    version: int | None = None
    alias: str | None = None


_ID = re.compile(r"^[0-9a-f]{32}$")


def parse_reference(text: str, loc: list[str | int]) -> Reference:
    """``<model id>`` | ``name`` | ``name:3`` | ``name@alias``, or a 422 at ``loc``."""
    if _ID.fullmatch(text):
        return Reference(model_id=text)
    name, at, alias = text.partition("@")
    if at:
        return Reference(name=check_name(name, loc), alias=check_alias(alias, loc))
    name, colon, version = text.partition(":")
    if colon:
        if not (version.isdigit() and 1 <= int(version) < 2**31):
            msg = f"{text[:80]!r}: the version after ':' must be a positive number"
            raise InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])
        return Reference(name=check_name(name, loc), version=int(version))
    return Reference(name=check_name(text, loc))


def find_reference(session: Session, text: str, loc: list[str | int]) -> ModelRecord:
    """The model a reference names; a 422 at ``loc`` naming what is missing."""
    ref = parse_reference(text, loc)
    try:
        if ref.model_id is not None:
            record = session.get(ModelRecord, ref.model_id)
            if record is None:
                raise NotFound(f"model {ref.model_id!r} does not exist (deleted?)")
            return record
        assert ref.name is not None
        return resolve(session, ref.name, alias=ref.alias, version=ref.version)
    except NotFound as exc:
        raise InvalidInput(exc.detail, errors=[{"loc": loc, "msg": exc.detail}]) from None
