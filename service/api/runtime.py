"""What every request needs, built once per app: settings, database, store, queue, model cache."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.inference import ModelCache
from service.jobs import JobQueue, build_queue
from service.store import Store, open_store


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker  # type: ignore[type-arg]
    store: Store
    queue: JobQueue
    models: ModelCache

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings.resolved_database_url)
        store = open_store(settings)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            store=store,
            queue=build_queue(settings),
            models=ModelCache(store, settings.model_cache_size),
        )
