"""The FastAPI application: routers, error rendering, offline docs, health checks."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

import service
from service.api import dashboard, errors, metrics
from service.api.deps import require_api_key
from service.api.routes import datasets, events, export, jobs, models, plots, predict
from service.api.runtime import Runtime
from service.config import Settings, get_settings
from service.db import upgrade_to_head
from service.schemas import PredictRequest
from service.spec import TrainSpec

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    runtime = Runtime.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.predict_threads)  # this process only predicts; see config
        await run_in_threadpool(upgrade_to_head, settings.resolved_database_url)
        runtime.store.ensure()
        # Everything imported and built so far (torch alone is hundreds of thousands of
        # objects) lives as long as the process: keep it out of the cyclic collector's
        # full passes, which otherwise ran during large requests and made parsing a
        # 65,536-row JSON body 9x slower (measured).
        gc.freeze()
        yield
        runtime.engine.dispose()
        runtime.queue.close()

    app = FastAPI(
        title="trainserve",
        version=service.__version__,
        summary="Train PyTorch models described in JSON, serve their predictions.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    errors.install(app)
    protected = [Depends(require_api_key)]
    # /predict first: routes are matched in order, and it is the one called most. It checks
    # the API key itself (see routes/predict.py).
    app.include_router(predict.router)
    for router in (datasets.router, jobs.router, events.router, models.router, plots.router, export.router):
        app.include_router(router, dependencies=protected)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    dashboard.install(app)
    metrics.install(app, runtime)
    _add_docs(app)
    _add_health(app, runtime)
    _document_train_spec(app)
    return app


def _document_train_spec(app: FastAPI) -> None:
    """POST /train reads its body itself (JSON or multipart), so FastAPI cannot see the
    TrainSpec schema; add it, with the layer/loss/optimizer models it refers to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            spec_schema = TrainSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(spec_schema.pop("$defs", {}))
            components["TrainSpec"] = spec_schema
            # POST /predict also reads its body itself (JSON, .npy or CSV).
            components["PredictRequest"] = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
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

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """The database, the model store and the queue answer."""
        checks = runtime.check()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)
