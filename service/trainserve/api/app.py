"""The FastAPI application: routers, error rendering, offline docs, health checks."""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

import trainserve
from trainserve.api import dashboard, errors, metrics
from trainserve.api.guard import OPEN_PATHS, GuardSettings, RequestGuard
from trainserve.api.routes import aliases, datasets, events, export, jobs, models, plots, predict, workers
from trainserve.api.routes import sweeps as sweep_routes
from trainserve.api.runtime import Runtime
from trainserve.api.schemas import Error, PredictRequest
from trainserve.config import Settings, get_settings
from trainserve.db import upgrade_to_head
from trainserve.serving import predictor
from trainserve.sweeps.space import SweepRequest
from trainserve.training.spec import TrainSpec

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The bearer scheme in /openapi.json: which keys it takes.
DESCRIBE_KEYS = "TRAINSERVE_API_KEY, or one of the named TRAINSERVE_API_KEYS"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    runtime = Runtime.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        predictor.configure_threads(settings.predict_threads)
        await run_in_threadpool(upgrade_to_head, settings.resolved_database_url)
        runtime.store.ensure()
        # Everything imported and built so far lives as long as the process: keep it out of
        # the cyclic collector's full passes, which otherwise ran during large requests and
        # made parsing a 65,536-row JSON body 9x slower (measured). `trainserve serve` starts
        # with the collector off (cli.py): what the start left unreachable (7,462 objects,
        # measured) stays frozen with the rest rather than a full pass before the first
        # answer. The warm-up turns the collector on once it has loaded torch and frozen that too.
        gc.freeze()
        runtime.warmup.start(settings.predict_threads)
        _keep_large_buffers_in_the_heap()
        yield
        # A stop in the first second: let torch's import finish rather than shut the
        # interpreter down under a thread halfway through it.
        await run_in_threadpool(runtime.warmup.wait, 30)
        await run_in_threadpool(runtime.predictions.close)
        runtime.engine.dispose()
        runtime.queue.close()

    app = FastAPI(
        title="trainserve",
        version=trainserve.__version__,
        summary="Train PyTorch models described in JSON, serve their predictions.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    errors.install(app)
    # /predict first: routes are matched in order, and it is the one called most.
    app.include_router(predict.router)
    # Before models.router: /models/by-name/... must not be read as /models/{model_id}/...
    app.include_router(aliases.router)
    for router in (datasets.router, jobs.router, events.router, models.router, plots.router, export.router):
        app.include_router(router)
    app.include_router(workers.router)
    app.include_router(sweep_routes.router)
    # Middleware added later wraps what was added before: the fast path runs inside the
    # guard, and the metrics middleware (added in metrics.install) wraps both, so it counts
    # the guard's 401s and 413s.
    app.add_middleware(predict.PredictFastPath, route=predict.predict_route(predict.router.routes))
    app.add_middleware(
        RequestGuard,
        settings=GuardSettings(settings.keys_by_name(), settings.max_body_bytes, settings.max_upload_bytes),
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    dashboard.install(app)
    metrics.install(app, runtime)
    _add_docs(app)
    _add_health(app, runtime)
    _complete_openapi(app, settings)
    return app


def _keep_large_buffers_in_the_heap() -> None:
    """Have glibc serve buffers up to 32 MiB from its heap and keep 128 MiB of freed memory.

    By default a large request's tensors (a 65,536-row pass makes several of 8 MiB) are
    mmapped fresh and unmapped again every time, so each request paid for page faults on
    all of them: its forward pass took 6.5 ms until glibc's own threshold caught up,
    2.3 ms after (measured). A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 128 * 2**20)


_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _complete_openapi(app: FastAPI, settings: Settings) -> None:
    """Say in the schema what the code does outside FastAPI's view:

    - POST /train reads its body itself (JSON or multipart), so FastAPI cannot see the
      TrainSpec schema; add it, with the layer/loss/optimizer models it refers to;
    - every error is rendered as ``Error`` (api/errors.py), not FastAPI's HTTPValidationError;
    - the guard middleware answers 401 without the key and 413 for bodies over the limits.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            spec_schema = TrainSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {})
            models = components.setdefault("schemas", {})
            models.update(spec_schema.pop("$defs", {}))
            models["TrainSpec"] = spec_schema
            # POST /predict also reads its body itself (JSON, .npy or CSV).
            models["PredictRequest"] = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            # POST /sweeps reads its body itself too (JSON, or multipart with the file).
            sweep_schema = SweepRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(sweep_schema.pop("$defs", {}))
            models["SweepRequest"] = sweep_schema
            models["Error"] = Error.model_json_schema()
            for unused in ("HTTPValidationError", "ValidationError"):
                models.pop(unused, None)
            keyed = bool(settings.keys_by_name())
            if keyed:
                components["securitySchemes"] = {
                    "bearerAuth": {"type": "http", "scheme": "bearer", "description": DESCRIBE_KEYS}
                }
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    if path in OPEN_PATHS:
                        continue
                    if "parameters" in operation or "requestBody" in operation:
                        responses["422"] = _error("The request cannot be used; `errors` says where")
                    responses["4XX"] = _error("A client error: `detail` says what was wrong")
                    if "{" in path:
                        responses["404"] = _error("No such resource")
                    if "requestBody" in operation:
                        responses["413"] = _error("The body is larger than the configured limit")
                        responses["415"] = _error("The body is not in a content type this endpoint takes")
                    if keyed and path not in OPEN_PATHS:
                        operation["security"] = [{"bearerAuth": []}]
                        responses["401"] = _error("The API key is missing or wrong")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_docs(app: FastAPI) -> None:
    # Swagger UI and ReDoc assets ship inside the package: the docs work with no internet.
    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title="trainserve API",
            swagger_js_url=f"{root}/static/vendor/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/vendor/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/vendor/favicon-32x32.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title="trainserve API",
            redoc_js_url=f"{root}/static/vendor/redoc.standalone.js",
            redoc_favicon_url=f"{root}/static/vendor/favicon-32x32.png",
            with_google_fonts=False,
        )


def _add_health(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Something the service needs is down"}})
    def readyz() -> JSONResponse:
        """The database, the model store and the queue answer, and what runs a model is
        loaded (``models``: "loading" for about a second after the start)."""
        checks = {**runtime.check(), "models": runtime.warmup.state}
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)
