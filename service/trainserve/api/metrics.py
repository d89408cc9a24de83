"""``GET /metrics`` in Prometheus' text format.

Two kinds of figures:

- HTTP requests and their latency, counted in this API process by an ASGI middleware,
  labelled by route template (``/jobs/{job_id}``, never the id itself, so the number of
  series stays bounded) and status code;
- jobs, queue and models, read from the database (``trainserve.api.stats``) at scrape time,
  because workers are other processes and the database is what they all share.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import trainserve
from trainserve.api import stats
from trainserve.api.runtime import Runtime
from trainserve.jobs.status import JobStatus
from trainserve.serving import monitoring

# Latency buckets from 5 ms (a cached prediction) to 60 s (a large upload).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The classic text format, which every Prometheus version reads (our names need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "<unmatched>"  # one label for every path no route knows: scanners can't blow up the series


class ServiceCollector(Collector):
    """Reads jobs, queue and models from the database on every scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        yield InfoMetricFamily("trainserve", "The service's version", value={"version": trainserve.__version__})
        with self.runtime.sessions() as session:
            by_status = stats.jobs_by_status(session=session)
            oldest_wait = stats.oldest_queued_age_s(session=session)
            models = stats.model_count(session=session)
            throughput = stats.recent_throughput(session=session)

        jobs = GaugeMetricFamily("trainserve_jobs", "Training jobs by status, from the database", labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "trainserve_queue_depth", "Jobs waiting for a worker (status queued)", value=by_status[JobStatus.QUEUED]
        )
        yield GaugeMetricFamily(
            "trainserve_queue_oldest_age_seconds", "How long the oldest queued job has waited", value=oldest_wait
        )
        yield GaugeMetricFamily(
            "trainserve_training_samples_per_second",
            "Training examples (rows x epochs) per second of engine time, over the recent successful jobs",
            value=throughput.samples_per_second,
        )
        yield GaugeMetricFamily(
            "trainserve_training_epochs_per_second",
            "Epochs per second of engine time, over the recent successful jobs",
            value=throughput.epochs_per_second,
        )
        yield GaugeMetricFamily(
            "trainserve_training_throughput_jobs",
            "How many recent successful jobs the throughput covers",
            value=throughput.jobs,
        )
        yield GaugeMetricFamily("trainserve_models", "Trained models in the registry", value=models)
        yield GaugeMetricFamily(
            "trainserve_models_loaded",
            "Models held in this API process's prediction cache",
            value=len(self.runtime.models),
        )
        yield from self._drift()
        log = self.runtime.predictions
        yield CounterMetricFamily(
            "trainserve_prediction_log_written",
            "Sampled /predict requests this API process wrote to the prediction log",
            value=log.written,
        )
        yield CounterMetricFamily(
            "trainserve_prediction_log_dropped",
            "Sampled /predict requests dropped because the log's buffer was full",
            value=log.dropped,
        )
        yield GaugeMetricFamily(
            "trainserve_model_cache_capacity",
            "How many models the prediction cache keeps",
            value=self.runtime.models.capacity,
        )

    def _drift(self) -> Iterable[Metric]:
        runtime, settings = self.runtime, self.runtime.settings
        reports = runtime.drift_scrape.fresh()
        if reports is None:
            with runtime.sessions() as session:
                reports = monitoring.named_drift(
                    session,
                    runtime.store,
                    runtime.drift_references,
                    window=settings.drift_window,
                    threshold=settings.drift_threshold,
                    limit=settings.drift_metrics_max_models,
                )
            runtime.drift_scrape.store(reports)
        assert isinstance(reports, list)
        labels = ["model", "feature"]
        psi = GaugeMetricFamily(
            "trainserve_feature_drift_psi",
            "Population stability index of a feature: logged requests against the training split (named models)",
            labels=labels,
        )
        missing = GaugeMetricFamily(
            "trainserve_feature_missing_share", "Share of logged rows with the feature missing", labels=labels
        )
        unseen = GaugeMetricFamily(
            "trainserve_feature_unseen_share",
            "Share of logged rows with a category never seen in training (category features only)",
            labels=labels,
        )
        drifted = GaugeMetricFamily(
            "trainserve_feature_drifted", "1 when the feature's PSI is over TRAINSERVE_DRIFT_THRESHOLD", labels=labels
        )
        rows = GaugeMetricFamily(
            "trainserve_drift_window_rows", "Logged input rows the drift figures compare", labels=["model"]
        )
        for report in reports:
            rows.add_metric([report.name], report.window_rows)
            for feature in report.features[:_MAX_FEATURE_LABELS]:
                psi.add_metric([report.name, feature.feature], feature.psi)
                missing.add_metric([report.name, feature.feature], feature.missing_share)
                drifted.add_metric([report.name, feature.feature], float(feature.drifted))
                if feature.unseen_share is not None:
                    unseen.add_metric([report.name, feature.feature], feature.unseen_share)
        yield from (psi, missing, unseen, drifted, rows)


# Per model: a table of thousands of features must not make thousands of series.
_MAX_FEATURE_LABELS = 100


class RequestMetrics:
    """ASGI middleware that counts requests and times them, by method, route template and status.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``), so streamed responses pass
    through untouched. An event stream is timed to its first byte: its length is how long
    a client watched, not how fast the server answered.
    """

    def __init__(
        self, app: ASGIApp, *, requests: Counter, latency: Histogram, templates: Callable[[], Iterable[str]]
    ) -> None:
        self.app, self.requests, self.latency = app, requests, latency
        self._templates = templates
        self._compiled: list[tuple[re.Pattern[str], str]] | None = None

    def _template(self, scope: Scope) -> str:
        # The router leaves the route it picked in the scope (also on a 405); a Mount's
        # path covers every file under it.
        path = getattr(scope.get("route"), "path", None)
        if path:
            return str(path)
        # Answered before routing (a guard in front of the router refused it): find the
        # template by the API's own paths, compiled as the router compiles them.
        if self._compiled is None:
            self._compiled = [(compile_path(template)[0], template) for template in self._templates()]
        for regex, template in self._compiled:
            if regex.match(scope.get("path", "")):
                return template
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        first_byte: float | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    first_byte = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            ended = first_byte or time.perf_counter()
            route, method = self._template(scope), scope.get("method", "")
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(ended - started)


def install(app: FastAPI, runtime: Runtime) -> None:
    """Add the request middleware and ``GET /metrics`` (which needs the API key when one is set:
    the guard in api/guard.py asks for it, as for every route but health and docs)."""
    registry = CollectorRegistry()
    requests = Counter(
        "trainserve_http_requests",
        "HTTP requests answered by this API process",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "trainserve_http_request_duration_seconds",
        "Time to answer an HTTP request in this API process",
        ["method", "route"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    registry.register(ServiceCollector(runtime))
    app.add_middleware(
        RequestMetrics, requests=requests, latency=latency, templates=lambda: [*app.openapi()["paths"], "/ui"]
    )

    router = APIRouter(tags=["health"])

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    )
    def metrics() -> Response:
        """Prometheus metrics: requests, latency, jobs by status, queue depth, throughput, loaded models."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    app.include_router(router)
