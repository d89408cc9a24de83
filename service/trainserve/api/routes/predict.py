"""POST /predict: JSON rows, a ``.npy`` matrix or a CSV file in; JSON, ``.npy`` or CSV out.

This is the hot path of the service, so it reads its body itself and stays on the event
loop for a cached model: no per-request database session or thread hop (a cache miss,
a lookup by name, and large requests go to a thread), inputs checked by numpy, answers
written by orjson, small concurrent requests micro-batched (trainserve.serving.batching).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from trainserve.api.deps import get_runtime
from trainserve.api.errors import exception_response
from trainserve.api.runtime import Runtime
from trainserve.api.schemas import PredictResponse
from trainserve.errors import InvalidInput
from trainserve.serving import registry
from trainserve.serving.formats import (
    ModelSelector,
    csv_to_matrix,
    encode_csv,
    encode_json,
    encode_npy,
    json_inputs_to_matrix,
    npy_to_matrix,
    parse_json_request,
)
from trainserve.serving.predictor import Outcome, Predictor
from trainserve.wire import CSV_MEDIA_TYPE, NPY_MEDIA_TYPE

router = APIRouter(tags=["predict"])

# Bodies larger than this are parsed in a thread, so that they don't stall other requests.
_PARSE_INLINE_BYTES = 64 * 1024

_SELECTOR_NOTE = "For .npy and CSV bodies, name the model in the query string: ?model_id=... or ?name=...[&version=N]."
_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            NPY_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "A numpy .npy array of shape (rows, features), integer or float dtype. "
                + _SELECTOR_NOTE,
            },
            CSV_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "A CSV with a header row holding the model's features. " + _SELECTOR_NOTE,
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "CSV with a header row"},
                        "model_id": {"type": "string"},
                        "name": {"type": "string"},
                        "version": {"type": "integer"},
                        "alias": {"type": "string"},
                    },
                }
            },
        },
    }
}
# The query string is read by _query() rather than declared in the signature: FastAPI's
# per-parameter validation cost more than the rest of a cached one-row prediction.
_QUERY_PARAMETERS: list[dict[str, Any]] = [
    {"name": "model_id", "in": "query", "schema": {"type": "string"}, "description": "for .npy and CSV bodies"},
    {"name": "name", "in": "query", "schema": {"type": "string"}, "description": "for .npy and CSV: newest version"},
    {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}, "description": "with name"},
    {"name": "alias", "in": "query", "schema": {"type": "string"}, "description": "with name: e.g. production"},
    {
        "name": "output",
        "in": "query",
        "schema": {"type": "string", "enum": ["predictions", "probabilities"], "default": "predictions"},
        "description": "what a .npy answer holds; probabilities: classifiers only",
    },
]
_QUERY_KEYS = frozenset(p["name"] for p in _QUERY_PARAMETERS)


def _query(request: Request) -> tuple[ModelSelector, str]:
    if not request.scope["query_string"]:
        return ModelSelector(), "predictions"
    params = request.query_params
    for key in params:
        if key not in _QUERY_KEYS:
            raise _bad_query(key, f"unknown query parameter {key!r} (expected {', '.join(sorted(_QUERY_KEYS))})")
    output = params.get("output", "predictions")
    if output not in ("predictions", "probabilities"):
        raise _bad_query("output", "output must be 'predictions' or 'probabilities'")
    version = params.get("version")
    if version is not None and not (version.isdigit() and 1 <= int(version) < 2**31):
        raise _bad_query("version", "version must be a positive integer")
    model_id, name = params.get("model_id"), params.get("name")
    if (model_id is not None and len(model_id) > 64) or (name is not None and len(name) > 128):
        raise _bad_query("name" if model_id is None else "model_id", "model_id or name is too long")
    selector = ModelSelector(model_id, name, int(version) if version is not None else None, params.get("alias"))
    return selector, output


def _bad_query(key: str, msg: str) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": ["query", key], "msg": msg}])


_PREDICT_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON by default; CSV (the rows sent plus prediction columns) for a CSV request; "
        "a .npy array with `Accept: application/x-npy` (predictions, or with output=probabilities the "
        "class probabilities, their labels in the X-Classes header).",
        "content": {CSV_MEDIA_TYPE: {}, NPY_MEDIA_TYPE: {}},
    }
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra={**_PREDICT_BODY, "parameters": _QUERY_PARAMETERS},
    responses=_PREDICT_ANSWERS,
)
async def predict(request: Request) -> Response:
    """Predict with a trained model, named by ``model_id`` or by ``name`` (+ ``version``).

    Send JSON ``{"model_id", "inputs": [[...], ...]}`` (rows as lists or objects keyed by
    feature), a ``.npy`` matrix (``Content-Type: application/x-npy``), or a CSV
    (``text/csv`` body or multipart ``file``) which is answered as CSV.
    """
    # No router dependency: FastAPI's dependency solving alone cost about a fifth of a cached
    # one-row prediction. The API key is checked before routing, by api/guard.py.
    runtime = await get_runtime(request)
    batcher = runtime.batcher
    batcher.arrive()
    settled = False  # every request that arrives at the batcher joins a batch or leaves, once
    try:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        query, output = _query(request)
        if content_type in ("multipart/form-data", CSV_MEDIA_TYPE):
            batcher.leave()
            settled = True
            return await _predict_csv(request, runtime, query, content_type)
        body = await request.body()
        inline = len(body) <= _PARSE_INLINE_BYTES
        if content_type == NPY_MEDIA_TYPE:
            predictor = await _predictor(runtime, query.checked())
            parse: Any = npy_to_matrix
            parsed: Any = body
        elif content_type == "application/json":
            if query != ModelSelector():
                raise InvalidInput("with a JSON body, name the model in the body, not the query string")
            parsed = parse_json_request(body) if inline else await run_in_threadpool(parse_json_request, body)
            predictor = await _predictor(runtime, parsed.selector)
            parse = json_inputs_to_matrix
        else:
            raise InvalidInput(
                f"unsupported content type {content_type!r}: send application/json, {NPY_MEDIA_TYPE}, "
                f"{CSV_MEDIA_TYPE} or multipart/form-data"
            )
        max_rows = runtime.settings.max_predict_rows
        x = (
            parse(parsed, predictor, max_rows=max_rows)
            if inline
            else await run_in_threadpool(parse, parsed, predictor, max_rows=max_rows)
        )
        # Every answer says which model and version answered (a JSON one in its body too).
        headers = dict(predictor.headers)
        wants_npy = NPY_MEDIA_TYPE in request.headers.get("accept", "")
        if batcher.accepts(predictor, len(x)):
            settled = True
            outcome, batch_rows = await batcher.infer(predictor, x)
            headers["X-Batch-Rows"] = str(batch_rows)
        else:
            # A .npy answer of labels alone needs no probabilities: skipping them is a tenth
            # of a 65,536-row request's time.
            infer = partial(predictor.infer, probabilities=not (wants_npy and output == "predictions"))
            outcome = infer(x) if predictor.runs_inline(len(x)) else await run_in_threadpool(infer, x)
        # Sampled answers are logged off the request's path; one asked for by name is also
        # answered by the name's shadow version, if it has one (serving/predlog.py).
        by_name = (parsed.selector if content_type == "application/json" else query).model_id is None
        log = runtime.predictions
        log.offer(predictor.model_id, predictor.name, predictor.version, x, outcome.predictions, by_name=by_name)
        if wants_npy:
            return _npy_answer(predictor, outcome, output, headers)
        content = (
            encode_json(predictor, outcome) if inline else await run_in_threadpool(encode_json, predictor, outcome)
        )
        return Response(content, media_type="application/json", headers=headers)
    finally:
        if not settled:
            batcher.leave()


class PredictFastPath:
    """ASGI middleware that hands ``POST /predict`` straight to :func:`predict`.

    For a cached one-row prediction, Starlette's router, FastAPI's request handler and
    its exception middlewares cost more CPU than the prediction itself (bench/predict.py).
    The endpoint declares no parameters or dependencies and reads its request itself, so
    skipping them skips nothing but dispatch; the route stays registered for the OpenAPI
    schema and for requests the fast path leaves alone (another method: 405; an app under
    a root path). Installed inside the guard and the metrics middleware, so the API key,
    body limits and request counting apply as everywhere; errors are rendered by the same
    mapping as every other route's (api/errors.py).
    """

    def __init__(self, app: ASGIApp, route: APIRoute) -> None:
        self.app, self.route = app, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != "/predict"
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # as the router leaves it: the metrics' route label
        try:
            response = await predict(Request(scope, receive))
        except Exception as exc:  # rendered as the app's handlers render it
            response = exception_response(exc)
        await response(scope, receive, send)


def predict_route(routes: list[Any]) -> APIRoute:
    """The registered ``POST /predict`` route (what :class:`PredictFastPath` stands in for)."""
    return next(r for r in routes if isinstance(r, APIRoute) and r.endpoint is predict)


async def _predictor(runtime: Runtime, selector: ModelSelector) -> Predictor:
    if selector.model_id is None:
        return await _named_predictor(runtime, selector)
    cached = runtime.models.lookup(selector.model_id)
    if cached is not None:
        return cached
    try:
        return await run_in_threadpool(_load_predictor, runtime, selector)
    finally:
        runtime.models.checked(selector.model_id)


async def _named_predictor(runtime: Runtime, selector: ModelSelector) -> Predictor:
    """By name (+ version or alias): the id the name stood for, from the name cache, and the
    model from the model cache; no database query and no thread while both are fresh."""
    assert selector.name is not None
    key = (selector.name, selector.alias, selector.version)
    model_id = runtime.names.lookup(key)
    if model_id is None:  # not known, or due a re-check that falls to this caller
        try:
            return await run_in_threadpool(_load_predictor, runtime, selector)
        finally:
            runtime.names.checked(key)
    cached = runtime.models.lookup(model_id)
    if cached is not None:
        return cached
    try:  # resolving the name again also confirms (or replaces) the model it stands for
        return await run_in_threadpool(_load_predictor, runtime, selector)
    finally:
        runtime.models.checked(model_id)


def _load_predictor(runtime: Runtime, selector: ModelSelector) -> Predictor:
    # A read-only lookup in its own short session: the per-request session dependency would
    # cost every cached prediction a thread hop for a session it never uses.
    with runtime.sessions() as session:
        return registry.load_predictor(
            session=session,
            cache=runtime.models,
            model_id=selector.model_id,
            name=selector.name,
            version=selector.version,
            alias=selector.alias,
            names=runtime.names,
        )


def _model_headers(predictor: Predictor) -> dict[str, str]:
    return dict(predictor.headers)


def _npy_answer(predictor: Predictor, outcome: Outcome, output: str, headers: dict[str, str]) -> Response:
    if output == "probabilities":
        if outcome.probabilities is None:
            raise InvalidInput("output=probabilities is for classifiers; this model is a regression")
        headers["X-Classes"] = orjson.dumps(predictor.classes).decode()
        return Response(encode_npy(outcome.probabilities), media_type=NPY_MEDIA_TYPE, headers=headers)
    return Response(encode_npy(outcome.predictions), media_type=NPY_MEDIA_TYPE, headers=headers)


async def _predict_csv(request: Request, runtime: Runtime, query: ModelSelector, content_type: str) -> Response:
    """A CSV in (a text/csv body, or a multipart file with the model named in form fields or the
    query string), the same CSV out with prediction columns added."""
    if content_type == CSV_MEDIA_TYPE:
        return await _answer_csv(runtime, query, await request.body())
    form = await request.form(max_files=1, max_fields=5)
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            msg = "the multipart form needs a 'file' field holding a CSV"
            raise InvalidInput(msg, errors=[{"loc": ["file"], "msg": "field required"}])
        fields = {
            key: value for key in ("model_id", "name", "version", "alias") if isinstance(value := form.get(key), str)
        }
        version = fields.get("version")
        if version is not None and not (version.isdigit() and int(version) >= 1):
            raise InvalidInput("version must be a positive integer", errors=[{"loc": ["version"]}])
        selector = query
        if fields:
            selector = ModelSelector(
                fields.get("model_id", query.model_id),
                fields.get("name", query.name),
                int(version) if version is not None else query.version,
                fields.get("alias", query.alias),
            )
        return await _answer_csv(runtime, selector, await file.read())
    finally:
        await form.close()


async def _answer_csv(runtime: Runtime, selector: ModelSelector, body: bytes) -> Response:
    predictor = await _predictor(runtime, selector.checked())
    table = await run_in_threadpool(csv_to_matrix, body, predictor, max_rows=runtime.settings.max_predict_rows)
    outcome = await run_in_threadpool(predictor.infer, table.matrix)
    log = runtime.predictions
    by_name = selector.model_id is None
    log.offer(predictor.model_id, predictor.name, predictor.version, table.matrix, outcome.predictions, by_name=by_name)
    content = await run_in_threadpool(encode_csv, table, predictor, outcome)
    return Response(content, media_type=CSV_MEDIA_TYPE, headers=_model_headers(predictor))
