"""What surrounds the resources: docs offline, health, OpenAPI, CLI entry points, async client."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Server, moons_spec
from trainserve.client import AsyncTrainserveClient


def test_docs_and_redoc_load_their_assets_from_the_server(server: Server) -> None:
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = httpx.get(server.url + page).text
        assert f"/static/vendor/{asset}" in html
        assert "cdn" not in html.lower()
        assert "googleapis" not in html
        script = httpx.get(f"{server.url}/static/vendor/{asset}")
        assert script.status_code == 200
        assert len(script.content) > 100_000


def test_redoc_loads_nothing_from_a_cdn(server: Server) -> None:
    # ReDoc's sidebar footer shows a logo that the vendored bundle fetched from
    # cdn.redoc.ly: a request to the internet from every docs page. The bundle is patched
    # to a relative URL (see docs/operations-start.md); updating it must keep the patch.
    script = httpx.get(f"{server.url}/static/vendor/redoc.standalone.js").text
    assert re.findall(r'src:"https?://[^"]*"', script) == []
    assert "cdn.redoc.ly" not in script
    logo = re.search(r'"redocly logo",onError:\(\)=>\w+\(!1\),src:"([^"]+)"', script)
    assert logo is not None, "the logo's img element moved: check its src by hand"
    answer = httpx.get(f"{server.url}/{logo.group(1)}")  # relative to /redoc's folder, the root
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("image/svg")


def test_openapi_documents_both_train_bodies(server: Server) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    content = schema["paths"]["/train"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "TrainSpec" in schema["components"]["schemas"]
    assert {"/datasets", "/predict", "/models/{model_id}/weights", "/jobs/{job_id}/cancel"} <= set(schema["paths"])


def test_health_and_readiness(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready"
    assert set(ready["checks"].values()) == {"ok"}


def test_unknown_route_is_json_404(server: Server) -> None:
    response = httpx.get(server.url + "/nope")
    assert response.status_code == 404
    assert response.json()["type"] == "http_error"


def test_cli_entry_points_answer() -> None:
    for command in (
        [sys.executable, "-m", "trainserve", "--help"],
        [str(Path(sys.executable).parent / "trainserve"), "--help"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        assert "serve" in result.stdout
        assert "worker" in result.stdout


def test_async_client_walks_the_whole_path(server: Server, moons: tuple[bytes, int]) -> None:
    async def scenario() -> list[object]:
        async with AsyncTrainserveClient(server.url) as ts:
            dataset = await ts.upload_dataset(moons[0], "moons.csv")
            job = await ts.train(moons_spec(dataset.id, epochs=20))
            done = await ts.wait(job.id)
            assert done.status == "succeeded", done.error
            result = await ts.predict(done.model_id or "", [[0.0, 1.0]])
            return result.predictions

    assert asyncio.run(scenario()) == [0]
