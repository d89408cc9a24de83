"""What every request needs, built once per app: settings, database, store, queue, model cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from trainserve.config import Settings
from trainserve.db import make_engine, make_session_factory
from trainserve.jobs.queue import JobQueue, build_queue
from trainserve.serving.batching import MicroBatcher
from trainserve.serving.drift import ReferenceCache, TimedCache
from trainserve.serving.plot_cache import PlotCache
from trainserve.serving.predictor import ModelCache, NameCache, Warmup
from trainserve.serving.predlog import LogSettings, PredictionLog
from trainserve.serving.shadow import ShadowResolver
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
    names: NameCache
    predictions: PredictionLog
    drift_references: ReferenceCache
    drift_scrape: TimedCache  # the last drift figures /metrics reported, reused for a few seconds
    plots: PlotCache
    # torch and the model modules, loaded in the background once the app has started
    warmup: Warmup = field(default_factory=Warmup)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings.resolved_database_url)
        store = open_store(settings)
        sessions = make_session_factory(engine)
        models = ModelCache(store, settings.model_cache_size, revalidate_s=settings.model_cache_revalidate_s)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            store=store,
            queue=build_queue(settings),
            models=models,
            batcher=MicroBatcher(
                enabled=settings.predict_batching,
                max_wait_s=settings.predict_batch_wait_ms / 1000,
                max_rows=settings.predict_batch_max_rows,
            ),
            names=NameCache(settings.model_cache_revalidate_s),
            drift_references=ReferenceCache(),
            drift_scrape=TimedCache(10.0),
            predictions=PredictionLog(
                sessions,
                LogSettings(
                    sample=settings.prediction_log_sample,
                    buffer=settings.prediction_log_buffer,
                    max_rows=settings.prediction_log_max_rows,
                    max_age_s=settings.prediction_log_max_age_s,
                    prune_interval_s=settings.prediction_log_prune_interval_s,
                ),
                shadow=ShadowResolver(sessions, models, settings.model_cache_revalidate_s),
            ),
            # Beside the database, local to this node (as the store's verified copies are).
            plots=PlotCache(settings.data_dir.resolve() / "plot-cache"),
        )

    def check(self) -> dict[str, str]:
        """Whether the database, the model store and the queue answer: "ok" or the error, each.
        (`trainserve check` runs it too, in a process that never loads a model; /readyz adds
        the warm-up's state.)"""
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
