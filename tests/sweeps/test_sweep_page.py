"""The /ui sweep page in a real headless Chromium: the leaderboard, the curves and the
parallel coordinates drawn, and the button that names the best trial's model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.api.test_dashboard import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS
from tests.conftest import Server, moons_spec
from trainserve.client import TrainserveClient
from trainserve.storage.base import new_id

# How many pixels of a canvas are not its white background.
INK = """(id) => {
  const canvas = document.getElementById(id);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240) ink++;
  return ink;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1200})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.goto(f"{server.url}/ui")
    yield opened
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def test_the_sweep_page_shows_the_leaderboard_and_charts_and_names_the_best(
    page: Page, client: TrainserveClient, moons: tuple[bytes, int]
) -> None:
    dataset = client.upload_dataset(moons[0], "moons.csv")
    sweep = client.create_sweep(
        {
            "name": "ui-sweep",
            "base": moons_spec(dataset.id, epochs=8, validation_split=0.25),
            "search": {"optimizer.lr": {"log_uniform": [0.001, 0.1]}, "batch_size": {"choice": [16, 32]}},
            "sampler": "random",
            "trials": 3,
        }
    )
    done = client.wait_sweep(sweep.id, timeout=120)
    assert done.best is not None

    page.locator(f"tr[data-sweep-id='{sweep.id}']").click()
    leaderboard = page.get_by_test_id("sweep-leaderboard").locator("tr")
    leaderboard.nth(2).wait_for()
    assert leaderboard.count() == 3
    # Ranked by the objective: the best trial first.
    assert leaderboard.first.get_attribute("data-trial") == str(done.best.number)
    page.wait_for_function(f"() => ({INK})('sweep-curves') > 500")
    page.wait_for_function(f"() => ({INK})('sweep-parallel') > 500")

    name = f"ui-best-{new_id()[:8]}"
    page.fill("#name-best-input", name)
    page.get_by_test_id("name-best").click()
    result = page.locator("#name-best-result")
    result.filter(has_text=f"{name} v1").wait_for()
    named = client.list_models(name=name)
    assert [(m.id, m.version) for m in named] == [(done.best.model_id, 1)]
