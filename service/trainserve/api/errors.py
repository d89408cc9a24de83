"""The one place where errors become HTTP responses: ``{"type", "detail", "errors"}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException

from trainserve.errors import InvalidInput, TrainserveError

log = logging.getLogger(__name__)


def _render(
    status: int,
    error_type: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"type": error_type, "detail": detail, "errors": errors or []}, status, headers=headers)


def error_response(exc: TrainserveError) -> JSONResponse:
    """A domain error as a response; also used by the ASGI guard, which runs outside FastAPI."""
    return _render(exc.status_code, exc.error_type, exc.detail, exc.errors)


def _describe(errors: list[Any]) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"


def invalid_spec(exc: ValidationError, prefix: list[str | int]) -> InvalidInput:
    """A spec that failed pydantic validation, located inside the request."""
    errors = [{**e, "loc": [*prefix, *e["loc"]]} for e in _describe(exc.errors(include_url=False))]
    return InvalidInput(_summary(errors), errors=errors)


def exception_response(exc: Exception) -> JSONResponse:
    """The JSON error a client gets for ``exc``: the one mapping of exceptions to statuses,
    used by the app's handlers and by the /predict fast path, which runs outside them."""
    if isinstance(exc, TrainserveError):
        if exc.status_code >= 500:
            log.error("%s: %s", exc.error_type, exc.detail)
        return error_response(exc)
    if isinstance(exc, RequestValidationError):
        errors = _describe(list(exc.errors()))
        return _render(422, "validation_error", _summary(errors) if errors else "invalid request", errors)
    if isinstance(exc, IntegrityError):
        # e.g. a job submitted for a dataset that another request deleted meanwhile
        return _render(409, "conflict", "the request conflicts with a concurrent change; retry it")
    if isinstance(exc, HTTPException):
        return _render(exc.status_code, "http_error", str(exc.detail), headers=exc.headers)  # e.g. 405's Allow
    log.exception("unhandled error", exc_info=exc)
    return _render(500, "internal_error", "internal server error; the server log has the details")


async def _handle(_request: Request, exc: Exception) -> JSONResponse:
    return exception_response(exc)


def install(app: FastAPI) -> None:
    for handled in (TrainserveError, RequestValidationError, IntegrityError, HTTPException, Exception):
        app.add_exception_handler(handled, _handle)
