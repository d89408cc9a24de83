"""What every request needs, built once per app: settings, database, store, queue, model cache."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from trainserve.config import Settings
from trainserve.db import make_engine, make_session_factory
from trainserve.jobs.queue import JobQueue, build_queue
from trainserve.serving.batching import MicroBatcher
from trainserve.serving.plot_cache import PlotCache
from trainserve.serving.predictor import ModelCache
from trainserve.storage.base import Store
from trainserve.storage.factory import open_store


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker  # type: ignore[type-arg]
    store: Store
    queue: JobQueue
    models: ModelCache
    batcher: MicroBatcher
    plots: PlotCache

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
            models=ModelCache(store, settings.model_cache_size, revalidate_s=settings.model_cache_revalidate_s),
            batcher=MicroBatcher(
                enabled=settings.predict_batching,
                max_wait_s=settings.predict_batch_wait_ms / 1000,
                max_rows=settings.predict_batch_max_rows,
            ),
            # Beside the database, local to this node (as the store's verified copies are).
            plots=PlotCache(settings.data_dir.resolve() / "plot-cache"),
        )

    def check(self) -> dict[str, str]:
        """Whether the database, the model store and the queue answer: "ok" or the error, each."""
        checks: dict[str, str] = {}
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {exc}"
        try:
            self.store.check()
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"error: {exc}"
        try:
            self.queue.huey.pending_count()
            checks["queue"] = "ok"
        except Exception as exc:
            checks["queue"] = f"error: {exc}"
        return checks
