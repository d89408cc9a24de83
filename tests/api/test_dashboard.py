"""The /ui dashboard driven in a real headless Chromium against a real server and worker.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run); playwright's Python wheel
only drives it, and downloads no browser. Without Chromium these tests fail: a dashboard
that was never loaded in a browser is not tested.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.conftest import REPO, Server, start_server, stop_server
from trainserve.client import TrainserveClient
from trainserve.examples import guide_moons_spec

CHROMIUM = Path("/usr/bin/chromium")
# Quiet on a machine without internet: no background connections at all.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "dashboard-test-key-0123456789"
TIMEOUT_MS = 120_000  # the machine is shared: generous, never a measurement


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("dashboard"), env={"TRAINSERVE_API_KEY": API_KEY})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); .ci/run does")
    launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    yield launched
    launched.close()


@pytest.fixture
def page(browser: Browser, ui_server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    requested: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("request", lambda request: requested.append(request.url))
    opened.goto(f"{ui_server.url}/ui")
    yield opened
    context.close()
    assert not errors, f"the page's script failed: {errors}"
    # No CDN: everything the page loaded came from the server itself (plots as blob: URLs).
    foreign = [url for url in requested if not url.startswith((f"{ui_server.url}/", "blob:", "data:"))]
    assert not foreign, f"the page reached outside the server: {foreign}"
    assert f"{ui_server.url}/static/ui/app.js" in requested


@pytest.fixture(scope="module")
def moons_csv() -> Path:
    """The shipped table a new user uploads first; the form's default spec fits it."""
    return REPO / "examples" / "moons.csv"


def train_line_pixels(page: Page) -> int:
    """How many pixels of the loss chart have the train line's colour."""
    count: int = page.evaluate(
        """() => { const c = document.getElementById('loss-chart');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let blue = 0; for (let i = 0; i < d.length; i += 4)
                     if (d[i] === 0x2f && d[i + 1] === 0x6f && d[i + 2] === 0xde) blue += 1;
                   return blue; }"""
    )
    return count


def enter_key(page: Page) -> None:
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#connection.ok")


def start_run(page: Page, csv: Path, spec: dict[str, object]) -> str:
    page.set_input_files("#train-file", str(csv))
    page.fill("#train-spec", json.dumps(spec, indent=2))
    page.click("#train-submit")
    page.wait_for_selector("#train-result[data-job-id]")
    job_id = page.get_attribute("#train-result", "data-job-id")
    assert job_id
    return job_id


def test_dashboard_asks_for_the_key_then_trains_a_model(page: Page, ui_server: Server, moons_csv: Path) -> None:
    # Without the key the API refuses the page's calls, and the page says what to do.
    page.wait_for_selector("#connection.bad")
    assert "API key" in page.inner_text("#banner")
    # The form starts with the guide's moons classifier.
    assert json.loads(page.input_value("#train-spec")) == guide_moons_spec()

    enter_key(page)
    assert page.is_hidden("#banner")
    spec = {**guide_moons_spec(), "epochs": 12, "batch_size": 16, "validation_split": 0.2}
    job_id = start_run(page, moons_csv, spec)
    page.wait_for_selector(f'tr[data-job-id="{job_id}"][data-status="succeeded"]')

    with TrainserveClient(ui_server.url, api_key=API_KEY, timeout=60) as ts:
        job = ts.get_job(job_id)
    assert job.status == "succeeded"
    assert job.spec["epochs"] == 12  # what the page sent is what the server ran
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    assert "12/12" in row.inner_text()
    # The loss chart shows the finished job's history, drawn on the canvas.
    page.wait_for_selector(f"#detail-id:text('{job_id}')")
    assert train_line_pixels(page) > 100, "no train-loss line on the chart"

    # The model appears with its decision-region plot, fetched with the key (an <img src>
    # could not send it) and decoded by the browser at the size the server drew it.
    card = page.locator(f'.model[data-model-id="{job.model_id}"]')
    card.wait_for()
    plot = httpx.get(f"{ui_server.url}/models/{job.model_id}/plot.png", headers={"Authorization": f"Bearer {API_KEY}"})
    assert plot.status_code == 200
    image = card.locator("img[data-testid=model-plot]")
    image.wait_for()
    image.evaluate("img => img.decode()")
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(png_size(plot.content))
    assert "classification" in card.inner_text()

    shot = page.screenshot(full_page=True)
    width, height = png_size(shot)
    assert width == 1280
    assert height >= 900


def test_dashboard_cancels_a_running_job(page: Page, ui_server: Server, moons_csv: Path) -> None:
    enter_key(page)
    # The page follows the running job's epochs over its event stream (fetch, with the key).
    with page.expect_request(lambda request: "/events" in request.url) as stream:
        job_id = start_run(page, moons_csv, {**guide_moons_spec(), "epochs": 50_000})
    assert stream.value.url == f"{ui_server.url}/jobs/{job_id}/events"
    assert stream.value.headers["authorization"] == f"Bearer {API_KEY}"
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    page.wait_for_selector(f'tr[data-job-id="{job_id}"][data-status="running"]')
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while train_line_pixels(page) < 50:  # the curve grows while the job runs
        assert time.monotonic() < deadline, "the running job's loss curve was never drawn"
        page.wait_for_timeout(200)
    row.locator("button[data-action=cancel]").click()
    page.wait_for_selector(f'tr[data-job-id="{job_id}"][data-status="cancelled"]')
    assert row.locator("button[data-action=cancel]").is_hidden()
    with TrainserveClient(ui_server.url, api_key=API_KEY, timeout=60) as ts:
        job = ts.get_job(job_id)
    assert job.status == "cancelled"
    assert job.model_id is None


def test_dashboard_shows_why_a_spec_was_refused(page: Page, ui_server: Server, moons_csv: Path) -> None:
    enter_key(page)
    with TrainserveClient(ui_server.url, api_key=API_KEY, timeout=60) as ts:
        jobs_before = len(ts.list_jobs())
    bad = {**guide_moons_spec(), "model": [{"type": "Conv2d", "out_channels": 3}]}
    page.set_input_files("#train-file", str(moons_csv))
    page.fill("#train-spec", json.dumps(bad))
    page.click("#train-submit")
    page.wait_for_selector("#train-result.error")
    assert "Conv2d" in page.inner_text("#train-result")

    page.fill("#train-spec", "{not json")
    page.click("#train-submit")
    page.wait_for_selector("#train-result.error:has-text('not valid JSON')")
    with TrainserveClient(ui_server.url, api_key=API_KEY, timeout=60) as ts:
        assert len(ts.list_jobs()) == jobs_before
