"""The first thing every request meets, before any of its body is read: the API key, then
the body size.

A pure ASGI middleware rather than a FastAPI dependency, because a dependency runs after
FastAPI has already read (and, for multipart, spooled) the whole body: an unauthenticated
client could make the server swallow gigabytes before hearing 401.

- API key: when any is configured, every path but health and the docs page (with its
  assets and openapi.json) needs ``Authorization: Bearer <key>``, compared in constant time
  with every configured key. The name of the key that matched goes into the scope the
  Starlette way (``scope["user"]``, a ``SimpleUser``; ``request.user`` reads it), so that a
  route can record who did something; without a key it is an ``UnauthenticatedUser``.
- Body size: a ``Content-Length`` over the limit is refused with 413 at once; a body
  without one (chunked) is counted as it streams in and cut with 413 as soon as it
  crosses the limit. Uploads (multipart, or a table as the body of ``POST /datasets``) get
  the upload limit, every other body the (smaller) JSON body limit.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.authentication import AuthCredentials, BaseUser, SimpleUser, UnauthenticatedUser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainserve.api.errors import error_response
from trainserve.errors import InvalidInput, PayloadTooLarge, TrainserveError, Unauthorized

# Reachable without the key: liveness/readiness, and the pages that hold no data (the docs
# and the dashboard, whose script sends the key the user types in) with their assets.
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui", "/ui/"}
)
OPEN_PREFIXES = ("/static/",)
# Room for the multipart boundaries, part headers and the spec field beside the file.
MULTIPART_OVERHEAD = 1024 * 1024
# Where a POST body that is not multipart is a table itself, under the upload limit.
RAW_UPLOAD_PATHS = frozenset({"/datasets"})


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` when the streamed body crosses the limit."""


@dataclass(frozen=True)
class _Limit:
    bytes: int
    message: str

    def exceeded(self) -> PayloadTooLarge:
        return PayloadTooLarge(self.message)


@dataclass(frozen=True)
class GuardSettings:
    api_keys: dict[str, str]  # name -> key; empty: the API is open
    max_body_bytes: int
    max_upload_bytes: int


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings
        self._expected = [(name, b"bearer " + key.encode()) for name, key in settings.api_keys.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        try:
            self._authorize(scope, headers)
            limit = self._limit(scope, headers)
            declared = _content_length(headers)
        except TrainserveError as refused:
            await _refuse(refused, scope, receive, send)
            return
        if declared is not None and declared > limit.bytes:
            await _refuse(limit.exceeded(), scope, receive, send)
            return
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        await self._counted(scope, receive, send, limit, body_expected=chunked or bool(declared))

    def _authorize(self, scope: Scope, headers: dict[bytes, bytes]) -> None:
        _identify(scope, None)
        if not self._expected or _is_open(scope):
            return
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # The scheme is case-insensitive (RFC 7235); the token is compared in constant time,
        # with every key and no early exit, so the time taken tells neither whether nor
        # which key matched.
        presented = scheme.lower() + b" " + token.strip()
        matched = None
        for name, expected in self._expected:
            if hmac.compare_digest(presented, expected):
                matched = name
        if matched is None:
            raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
        _identify(scope, matched)

    def _limit(self, scope: Scope, headers: dict[bytes, bytes]) -> _Limit:
        upload = self.settings.max_upload_bytes
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            return _Limit(upload + MULTIPART_OVERHEAD, f"the upload is larger than the limit of {upload} bytes")
        if scope["method"] == "POST" and _path(scope) in RAW_UPLOAD_PATHS:  # the body is the table itself
            return _Limit(upload, f"the upload is larger than the limit of {upload} bytes")
        body = self.settings.max_body_bytes
        return _Limit(body, f"the request body is larger than the limit of {body} bytes")

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: _Limit, *, body_expected: bool) -> None:
        received = 0
        crossed = False
        started = False
        body_done = not body_expected

        async def counting_receive() -> Message:
            nonlocal received, crossed, body_done
            message = await receive()
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit.bytes:
                    crossed = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if crossed:  # whatever the app makes of the cut body, the client hears 413
                return
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    # Answered before the body ended (an error, e.g. a file over the limit):
                    # the server would otherwise drain the rest, however long, to keep the
                    # connection alive.
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not crossed:
                raise
        if crossed and not started:
            await _refuse(limit.exceeded(), scope, receive, send)


_NOBODY: BaseUser = UnauthenticatedUser()


def _identify(scope: Scope, key_name: str | None) -> None:
    """``request.user`` and ``request.auth``, as Starlette's AuthenticationMiddleware sets them."""
    if key_name is None:
        scope["user"], scope["auth"] = _NOBODY, AuthCredentials()
    else:
        scope["user"], scope["auth"] = SimpleUser(key_name), AuthCredentials(["authenticated"])


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # A repeated header keeps its first value: enough for the four read here.
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.lower(), value)
    return headers


def _path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _is_open(scope: Scope) -> bool:
    path = _path(scope)
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():  # h11 refuses these first; kept for servers that do not
        raise InvalidInput("the Content-Length header is not a number")
    return int(raw)


async def _refuse(error: TrainserveError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(error)
    # The unread body makes the connection unusable for a next request: say so, and close.
    response.headers["Connection"] = "close"
    await response(scope, receive, send)
