"""The API key and the body limits, checked before any body is read, against a real server.

Raw sockets stand in for hostile clients: they send headers that announce a huge body,
or stream a body that never ends, and read what the server answers.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server
from trainserve.api.uploads import FLUSH_BYTES
from trainserve.client import TrainserveClient

KEY = "s3cret-key-of-some-length"
UPLOAD_LIMIT = 256 * 1024
BODY_LIMIT = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TRAINSERVE_API_KEY": KEY,
        "TRAINSERVE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "TRAINSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
    }
    running = start_server(tmp_path_factory.mktemp("guarded"), workers=0, env=env)
    yield running
    stop_server(running)


def _connect(server: Server) -> socket.socket:
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (status, headers, body) until the server closes."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            # The server closed with our unread body still arriving: its kernel resets the
            # connection, after the response it sent, which is already here.
            if not data:
                raise
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def _announce(path: str, content_length: int, *, content_type: str, auth: bool) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: test",
        "Connection: close",
        f"Content-Type: {content_type}",
        f"Content-Length: {content_length}",
    ]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _nothing_left(server: Server) -> None:
    assert httpx.get(server.url + "/datasets", headers=AUTH).json() == []
    assert httpx.get(server.url + "/jobs", headers=AUTH).json() == []
    assert server.files("datasets") == []
    assert server.files("tmp") == []


# -- the API key ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/datasets", "/jobs", "/models", "/jobs/" + "0" * 32, "/nope"])
def test_without_the_key_every_endpoint_is_401_json(guarded: Server, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": KEY}):
        response = httpx.get(guarded.url + path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["www-authenticate"] == "Bearer"
        body = response.json()
        assert body["type"] == "unauthorized"
        assert "Authorization: Bearer" in body["detail"]


def test_with_the_key_endpoints_answer(guarded: Server) -> None:
    assert httpx.get(guarded.url + "/datasets", headers=AUTH).status_code == 200
    # the scheme is case-insensitive
    assert httpx.get(guarded.url + "/jobs", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    with TrainserveClient(guarded.url, api_key=KEY) as ts:
        dataset = ts.upload_dataset(b"a,b,label\n1,2,0\n3,4,1\n", "t.csv")
        ts.delete_dataset(dataset.id)


def test_every_operation_in_the_schema_needs_the_key_but_health(guarded: Server) -> None:
    """Walks the served schema, so an endpoint added later is covered without a new test."""
    schema = httpx.get(guarded.url + "/openapi.json").json()
    checked = 0
    for path, operations in schema["paths"].items():
        url = guarded.url + path.replace("{", "").replace("}", "")  # {model_id} -> model_id
        for method in operations:
            without = httpx.request(method, url, content=b"{}", headers={"content-type": "application/json"})
            with_key = httpx.request(method, url, content=b"{}", headers={"content-type": "application/json", **AUTH})
            if path in ("/healthz", "/readyz"):
                assert without.status_code == 200, path
                assert "security" not in operations[method]
            else:
                assert without.status_code == 401, (method, path)
                assert operations[method]["security"] == [{"bearerAuth": []}], (method, path)
                assert with_key.status_code != 401, (method, path)
            checked += 1
    assert checked >= 14


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/static/vendor/swagger-ui.css"]
)
def test_health_and_the_docs_page_need_no_key(guarded: Server, path: str) -> None:
    assert httpx.get(guarded.url + path).status_code == 200


def test_openapi_declares_the_bearer_scheme_for_swaggers_authorize_button(guarded: Server) -> None:
    schema = httpx.get(guarded.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "TRAINSERVE_API_KEY, or one of the named TRAINSERVE_API_KEYS",
    }
    assert schema["paths"]["/datasets"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in schema["paths"]["/predict"]["post"]["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_unauthenticated_huge_upload_is_refused_before_its_body_is_read(guarded: Server) -> None:
    with _connect(guarded) as sock:
        # Announce a terabyte and send none of it: the answer must come anyway.
        sock.sendall(_announce("/datasets", 10**12, content_type="multipart/form-data; boundary=x", auth=False))
        status, headers, body = _read_response(sock)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["connection"] == "close"
    assert json.loads(body)["type"] == "unauthorized"


def test_unauthenticated_streamed_upload_is_refused_without_reading_it(guarded: Server) -> None:
    with _connect(guarded) as sock:
        head = "POST /datasets HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        status, _, body = _read_response(sock)
    assert status == 401
    assert json.loads(body)["type"] == "unauthorized"


# -- body limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "limit"),
    [
        ("/datasets", "multipart/form-data; boundary=x", UPLOAD_LIMIT),
        ("/datasets", "text/csv", UPLOAD_LIMIT),  # the table as the body itself
        ("/train", "multipart/form-data; boundary=x", UPLOAD_LIMIT),
        ("/predict", "application/json", BODY_LIMIT),
        ("/train", "application/json", BODY_LIMIT),
    ],
)
def test_declared_length_over_the_limit_is_413_at_once(
    guarded: Server, path: str, content_type: str, limit: int
) -> None:
    with _connect(guarded) as sock:
        sock.sendall(_announce(path, 10 * limit + 2 * 1024 * 1024, content_type=content_type, auth=True))
        status, headers, body = _read_response(sock)
    assert status == 413
    assert headers["connection"] == "close"
    error = json.loads(body)
    assert error["type"] == "payload_too_large"
    assert f"larger than the limit of {limit} bytes" in error["detail"]
    _nothing_left(guarded)


def _stream_until_answered(server: Server, path: str, content_type: str) -> tuple[int, bytes, int]:
    """Send an endless chunked body until the server answers; (status, body, bytes sent)."""
    sock = _connect(server)
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\n"
    sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    prefix = b"--x\r\nContent-Disposition: form-data; name=file; filename=big.csv\r\n\r\na,b\r\n"
    if content_type.startswith("application/json"):
        prefix = b'{"model_id": "' + b"0" * 32 + b'", "inputs": ['
    row = b"1,2\r\n" if prefix.startswith(b"--") else b"[1.0, 2.0],"
    chunk_body = row * (16384 // len(row))
    sent, deadline = 0, time.monotonic() + 60
    sock.setblocking(False)
    pending = b"%x\r\n%s\r\n" % (len(prefix), prefix)
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                pending = b"%x\r\n%s\r\n" % (len(chunk_body), chunk_body)
        sock.settimeout(10)
        status, _, body = _read_response(sock)
    finally:
        sock.close()
    return status, body, sent


@pytest.mark.parametrize(
    ("path", "content_type", "limit"),
    [
        ("/datasets", "multipart/form-data; boundary=x", UPLOAD_LIMIT),
        ("/datasets", "application/octet-stream", UPLOAD_LIMIT),
        ("/predict", "application/json", BODY_LIMIT),
    ],
)
def test_endless_chunked_body_is_cut_with_413_once_past_the_limit(
    guarded: Server, path: str, content_type: str, limit: int
) -> None:
    status, body, sent = _stream_until_answered(guarded, path, content_type)
    assert status == 413
    assert json.loads(body)["type"] == "payload_too_large"
    # The body never ends: an answer at all means the server stopped reading. It came after
    # the limit was crossed, and long before the (large) socket buffers could explain it.
    assert limit < sent < limit + 64 * 1024 * 1024
    _nothing_left(guarded)


def test_file_just_over_the_upload_limit_is_413_and_leaves_nothing(guarded: Server) -> None:
    payload = b"a,b\n" + b"1,2\n" * (UPLOAD_LIMIT // 4)
    response = httpx.post(guarded.url + "/datasets", files={"file": ("big.csv", payload)}, headers=AUTH)
    assert response.status_code == 413
    assert f"limit of {UPLOAD_LIMIT} bytes" in response.json()["detail"]
    _nothing_left(guarded)


def test_file_under_the_upload_limit_is_taken(guarded: Server, tmp_path: Path) -> None:
    rows = (UPLOAD_LIMIT - 100) // 4
    payload = b"a,b\n" + b"1,2\n" * rows
    response = httpx.post(guarded.url + "/datasets", files={"file": ("ok.csv", payload)}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["n_rows"] == rows
    assert httpx.delete(f"{guarded.url}/datasets/{response.json()['id']}", headers=AUTH).status_code == 204
    # as the body itself: the same limit, no multipart framing around it
    raw = httpx.post(guarded.url + "/datasets", content=payload, headers={**AUTH, "content-type": "text/csv"})
    assert raw.status_code == 201, raw.text
    assert raw.json()["n_rows"] == rows
    assert httpx.delete(f"{guarded.url}/datasets/{raw.json()['id']}", headers=AUTH).status_code == 204


def test_json_body_over_the_limit_is_413_even_with_a_valid_request(guarded: Server) -> None:
    inputs = [[1.0, 2.0]] * (BODY_LIMIT // 10)
    response = httpx.post(guarded.url + "/predict", json={"model_id": "0" * 32, "inputs": inputs}, headers=AUTH)
    assert response.status_code == 413
    assert response.json()["type"] == "payload_too_large"


def test_upload_is_streamed_into_the_store_tmp_while_it_arrives(guarded: Server) -> None:
    """Most of a file sent, the request still open: its bytes are already on disk under tmp/,
    all but the last FLUSH_BYTES at most (what an upload may hold in memory)."""
    first, second = b"a,b\n" + b"1,2\n" * 50_000, b"3,4\n" * 2_500
    head = b"--x\r\nContent-Disposition: form-data; name=file; filename=s.csv\r\n\r\n"
    tail = b"\r\n--x--\r\n"
    with _connect(guarded) as sock:
        sock.sendall(
            _announce(
                "/datasets",
                len(head) + len(first) + len(second) + len(tail),
                content_type="multipart/form-data; boundary=x",
                auth=True,
            )
        )
        sock.sendall(head + first)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = guarded.files("tmp")
            if parts and parts[0].stat().st_size >= len(first) - FLUSH_BYTES:
                break
            time.sleep(0.05)
        assert [p.name.endswith(".upload.part") for p in parts] == [True]
        on_disk = parts[0].read_bytes()
        assert len(on_disk) >= len(first) - FLUSH_BYTES
        assert first.startswith(on_disk)
        sock.sendall(second + tail)
        status, _, body = _read_response(sock)
    assert status == 201, body
    dataset = json.loads(body)
    assert dataset["n_rows"] == 52_500
    assert guarded.files("tmp") == []
    assert httpx.delete(f"{guarded.url}/datasets/{dataset['id']}", headers=AUTH).status_code == 204
