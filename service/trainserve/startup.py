"""What ``trainserve serve | worker | migrate | check`` verify before they start, and how they
say what went wrong: one line naming the setting, the URL or the path, never a traceback.

A process that cannot start should tell its operator what to change. Each check here turns
the error of the library underneath (pydantic, SQLAlchemy, sqlite3, psycopg, Huey, an
ImportError) into a ``StartError`` whose message the CLI prints as its only line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError
from pydantic_settings import SettingsError

from trainserve.config import SECRET_SETTINGS, Settings

log = logging.getLogger("trainserve")

T = TypeVar("T")

# The import each URL scheme needs, and the extra that installs it.
_EXTRAS: dict[str, tuple[str, str]] = {
    "postgresql": ("psycopg", "postgres"),
    "postgres": ("psycopg", "postgres"),
    "redis": ("redis", "redis"),
    "rediss": ("redis", "redis"),
    "unix": ("redis", "redis"),
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
}


class StartError(Exception):
    """A reason the process cannot start, in one line for its operator."""


def mask(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def load_settings() -> Settings:
    """The settings, or a StartError naming each bad variable, its value and what is allowed."""
    try:
        return Settings()
    except ValidationError as exc:
        raise StartError(describe_settings_error(exc)) from None
    except SettingsError as exc:  # a JSON-valued setting (store_options) that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        variable = f"TRAINSERVE_{field.group(1).upper()}" if field else "a TRAINSERVE_* variable"
        value = os.environ.get(variable, "")
        raise StartError(f"bad setting: {variable}={value!r} is not allowed: {exc.__cause__ or exc}") from None


def describe_settings_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        allowed = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a check across settings: its message names them
            problems.append(allowed)
            continue
        field = str(error["loc"][0])
        variable = f"TRAINSERVE_{field.upper()}"
        # A key is never repeated, not even a refused one: start errors end up in logs.
        value = "<hidden>" if field in SECRET_SETTINGS else repr(error.get("input"))
        problems.append(f"{variable}={value} is not allowed: {allowed}")
    return "bad setting: " + "; ".join(problems)


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.split("+")[0].lower()


def check_extras(settings: Settings) -> None:
    """Each configured URL's driver imports, or a StartError saying which extra to install."""
    for variable, url in (
        ("TRAINSERVE_DATABASE_URL", settings.database_url),
        ("TRAINSERVE_QUEUE_URL", settings.queue_url),
        ("TRAINSERVE_STORE_URL", settings.store_url),
    ):
        needed = _EXTRAS.get(_scheme(url)) if url else None
        if needed is None:
            continue
        module, extra = needed
        # Looked up, not imported: the driver is imported where it is used.
        try:
            found = importlib.util.find_spec(module)
        except ImportError:  # a broken or blocked installation counts as missing
            found = None
        if found is None:
            raise StartError(
                f"{variable}={mask(url)} needs the {module} package, which is not installed: "
                f"pip install 'trainserve[{extra}]'"
            )


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL; None for another database or an in-memory one."""
    if _scheme(url) != "sqlite":
        return None
    path = urlsplit(url).path
    if path in ("", "/", "/:memory:"):
        return None
    return Path(path[1:] if path.startswith("//") else path)


def check_folder(path: Path, what: str) -> None:
    """``path`` is a folder this process can write in, creating it if needed."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartError(f"cannot create the {what} folder {path}: {exc.strerror}") from None
    probe = path / f".trainserve-write-test-{id(path)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartError(f"cannot write in the {what} folder {path}: {exc.strerror}") from None


def guarded(what: str, where: str, action: Callable[[], T]) -> T:
    """Run ``action``; any error it raises becomes one line naming ``what`` and ``where``."""
    try:
        return action()
    except StartError:
        raise
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise StartError(f"cannot use the {what} at {where}: {reason[0] if reason else type(exc).__name__}") from None


def check_database(url: str, what: str = "database") -> bool:
    """Can the database at ``url`` be opened? For SQLite, its folder must be writable (WAL
    writes beside the file). Returns whether a SQLite file is already there."""
    path = sqlite_path(url)
    if path is None:
        return True
    # Not created here: a database URL naming a folder that is not there is more likely a
    # typo, or a volume that is not mounted, than a wish for a new, empty database.
    if not path.parent.is_dir():
        raise StartError(f"the folder of the {what} {path} does not exist or is not a folder ({mask(url)})")
    check_folder(path.parent, what)
    return path.exists()


def log_locations(settings: Settings, *, database_existed: bool) -> None:
    """Where this process keeps its data: the first thing an operator needs when models 'vanish'."""
    store = mask(settings.store_url) if settings.store_url else str(settings.resolved_store_dir)
    log.info("data dir: %s (TRAINSERVE_DATA_DIR)", settings.data_dir.resolve())
    log.info("database: %s", mask(settings.resolved_database_url))
    log.info("queue:    %s (name %r)", mask(settings.resolved_queue_url), settings.queue_name)
    log.info("store:    %s", store)
    if not database_existed:
        log.warning(
            "no database was at %s: a new, empty one is created there. If you expected your models, "
            "start from the folder that holds trainserve.db or set TRAINSERVE_DATA_DIR",
            sqlite_path(settings.resolved_database_url),
        )


def prepare(settings: Settings, *, migrate: bool = True) -> None:
    """Check everything this process needs before it starts, in the order an operator would
    fix them: the extras, the folders, the database (migrated), the queue, the store."""
    from trainserve.db import upgrade_to_head
    from trainserve.jobs.queue import build_queue

    check_extras(settings)
    if not settings.database_url or not settings.queue_url or settings.store_dir is None:
        check_folder(settings.data_dir.resolve(), "data")  # something defaults to a file under it
    database = settings.resolved_database_url
    existed = check_database(database)
    log_locations(settings, database_existed=existed)
    if migrate:
        guarded("database", mask(database), lambda: upgrade_to_head(database))
    check_database(settings.resolved_queue_url, "queue")

    def probe_queue() -> None:
        queue = build_queue(settings)
        try:
            queue.huey.pending_count()
        finally:
            queue.close()

    guarded("queue", mask(settings.resolved_queue_url), probe_queue)
    where = mask(settings.store_url) if settings.store_url else str(settings.resolved_store_dir)
    # With a store URL, store_dir still holds this node's copies of its files.
    check_folder(settings.resolved_store_dir, "model store")

    def probe_store() -> None:
        from trainserve.storage.factory import open_store  # imports torch: seconds

        store = open_store(settings)
        store.ensure()
        store.check()

    guarded("model store", where, probe_store)
